"""Many registered clients, few trained per round: what idle simulated devices cost.

    python bench/scale.py [--clients 10,100,1000] [--rounds 3] [--out FILE]

Workload: all-MiniLM-L6-v2 with LoRA r=8 on query/value plus the classifier head; the 38k-tweet
sentiment corpus split Dirichlet(0.5) over N registered clients; 10 clients trained per round,
2 local steps of batch 16, max length 64; a central evaluation on 200 held-out tweets. Each N
runs `fedtune simulate`'s code (run_simulation) in its own child process.

Per row (named by the client count):
- peak_mib: peak resident memory of the child process;
- seconds_per_round: a round from opening to the aggregate, central evaluation excluded (it
  is the same work at every N and reported apart as eval_seconds_per_round);
- overhead_share: the share of seconds_per_round not spent training, training being the sum of
  the trained clients' own local_seconds (they train one at a time, `simulation.parallel` 1).
Round 1 is left out of the per-round means: it also tokenizes and warms up.
Ratios: memory per idle client, (peak at the largest N - peak at the smallest) / (difference in N).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from measure import run_worker


def worker(clients: int, rounds: int, out: Path) -> None:
    from fedtune.config import RunConfig
    from fedtune.simulation.runner import run_simulation

    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = "minilm", "seq-cls", 64
    config.lora.rank, config.lora.alpha, config.lora.target_modules = 8, 16.0, ["query", "value"]
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 2, 16, 1e-3
    config.federation.rounds, config.federation.clients_per_round = rounds, 10
    config.simulation.clients, config.simulation.partition, config.simulation.alpha = clients, "dirichlet", 0.5
    config.simulation.eval_examples = 200
    config.run_dir = str(out.parent / f"run-{clients}")
    started = time.monotonic()
    result = run_simulation(config)
    out.write_text(json.dumps({"history": result.history, "wall_seconds": time.monotonic() - started,
                               "errors": result.client_errors}))


def summarize(clients: int, result: dict) -> dict:
    rows = result["history"][1:] or result["history"]
    round_s = [r["seconds"] - r["eval_seconds"] for r in rows]
    train_s = [r.get("local_seconds", 0.0) * r["clients"] for r in rows]
    per_round = sum(round_s) / len(rows)
    return {
        "name": str(clients),
        "clients": clients,
        "peak_mib": round(result["peak_mib"], 1),
        "seconds_per_round": round(per_round, 3),
        "train_seconds_per_round": round(sum(train_s) / len(rows), 3),
        "overhead_share": round(1 - sum(train_s) / sum(round_s), 4),
        "eval_seconds_per_round": round(sum(r["eval_seconds"] for r in rows) / len(rows), 3),
        "wall_seconds": round(result["wall_seconds"], 1),
        "final_eval_loss": rows[-1]["eval_loss"],
        "client_errors": len(result["errors"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000", help="registered clients per run, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rounds, args.worker_out)
        return 0

    counts = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            print(f"running {n} clients ...", flush=True)
            result = run_worker(__file__, ["--worker", str(n), "--rounds", str(args.rounds)], Path(tmp) / f"{n}.json")
            rows.append(summarize(n, result))
    print(f"{'clients':>8} {'peak MiB':>9} {'s/round':>8} {'train s':>8} {'overhead':>9} {'eval s':>7} {'wall s':>7} {'eval loss':>9}")
    for r in rows:
        print(f"{r['clients']:>8} {r['peak_mib']:>9.0f} {r['seconds_per_round']:>8.2f} {r['train_seconds_per_round']:>8.2f} "
              f"{r['overhead_share']:>9.1%} {r['eval_seconds_per_round']:>7.2f} {r['wall_seconds']:>7.1f} {r['final_eval_loss']:>9.4f}")
    ratios = {}
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        ratios["mib_per_idle_client"] = round((last["peak_mib"] - first["peak_mib"]) / (last["clients"] - first["clients"]), 4)
        ratios["round_time_largest_vs_smallest"] = round(last["seconds_per_round"] / first["seconds_per_round"], 3)
        for k, v in ratios.items():
            print(f"{k}: {v}")
    result = {"rounds": args.rounds, "clients_per_round": 10, "local_steps": 2, "rows": rows, "ratios": ratios}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
