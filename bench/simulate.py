"""Cost of a federated round: fedtune's loopback simulation beside a plain single-process loop
doing the same training and evaluation, measured in the same run.

    python bench/simulate.py [--rounds 3] [--out FILE]

Workload (fixed, so figures compare across systems): all-MiniLM-L6-v2 with LoRA r=8 on
query/value plus the classifier head; the 38k-tweet sentiment corpus split Dirichlet(0.5)
over 5 clients, all 5 trained every round; 20 local steps of batch 16, max length 64, AdamW
1e-3; a central evaluation on 1000 held-out tweets after each round.

Each system runs in its own child process; the parent samples the resident memory of the
child and all its descendants every 50 ms and reports the peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from measure import run_worker

def workload_config(rounds: int, run_dir: str):
    from fedtune.config import RunConfig

    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = "minilm", "seq-cls", 64
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.lora.target_modules = ["query", "value"]
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 20, 16, 1e-3
    config.federation.rounds, config.federation.strategy = rounds, "fedavg"  # the plain loop below is FedAvg
    config.federation.client_correction = "none"
    config.simulation.clients, config.simulation.partition, config.simulation.alpha = 5, "dirichlet", 0.5
    config.simulation.eval_examples = 1000
    config.run_dir = run_dir
    return config


def worker_fedtune(rounds: int, out: Path) -> None:
    from fedtune.allocator import tune_allocator
    from fedtune.simulation.runner import run_simulation

    tune_allocator()  # as `fedtune simulate` does at start
    started = time.monotonic()
    result = run_simulation(workload_config(rounds, str(out.parent / "run")))
    out.write_text(json.dumps({"history": result.history, "wall_seconds": time.monotonic() - started}))


def worker_plain(rounds: int, out: Path) -> None:
    """The same training and evaluation in one loop: no gRPC, no threads, no serialization
    (and the same malloc settings and trims, so the comparison is of the work, not the
    allocator)."""
    import torch

    from fedtune.allocator import release_free_memory, tune_allocator

    tune_allocator()

    from fedtune.adapters import AdapterPlan, adapter_state, inject_lora, load_adapter_state
    from fedtune.aggregation.lora_math import weighted_average
    from fedtune.client.recipes import Recipe, TrainSettings
    from fedtune.client.recipes.base import LocalOptions
    from fedtune.data import label_ids
    from fedtune.models import ModelStore, resolve_source
    from fedtune.simulation.partition import partition
    from fedtune.simulation.runner import prepare_data
    from fedtune.tasks import get_task

    started = time.monotonic()
    config = workload_config(rounds, "")
    train, evals, labels = prepare_data(config)
    parts = partition("dirichlet", len(train), 5, config.seed, labels=label_ids(train, labels), alpha=0.5)
    store, source, task = ModelStore(), resolve_source("minilm"), get_task("seq-cls")
    pad = store.pad_id(source)
    plan = AdapterPlan(rank=8, alpha=16.0, target_modules=("query", "value"))
    model = inject_lora(store.instance(source, "seq-cls", labels), plan, "seq-cls")
    items = [store.encode(source, task, [train[i] for i in p], 64, labels) for p in parts]
    eval_items = store.encode(source, task, evals, 64, labels)
    state, history = adapter_state(model), []
    for r in range(1, rounds + 1):
        t0 = time.monotonic()
        updates = []
        for c, client_items in enumerate(items):
            sent, _ = Recipe(LocalOptions(), {}).run(model, state, {}, task, client_items, TrainSettings(20, 16, 1e-3, 0.0, seed=r * 100 + c), pad)
            updates.append((sent, len(client_items)))
            release_free_memory()  # where fedtune's agent does
        state = {n: weighted_average([u[n] for u, _ in updates], [k for _, k in updates]) for n in state}
        t1 = time.monotonic()
        load_adapter_state(model, state)
        metrics = task.evaluate(model, eval_items, pad, 64)
        release_free_memory()
        history.append({"round": r, "seconds": time.monotonic() - t0, "eval_seconds": time.monotonic() - t1, **metrics, "bytes_up": 0, "bytes_down": 0})
    del torch
    out.write_text(json.dumps({"history": history, "wall_seconds": time.monotonic() - started}))


def run_child(kind: str, rounds: int, tmp: Path) -> dict:
    return run_worker(__file__, ["--worker", kind, "--rounds", str(rounds)], tmp / f"{kind}.json")


def summarize(name: str, result: dict) -> dict:
    rows = result["history"]
    n = len(rows)
    per_round = sum(r["seconds"] for r in rows) / n
    eval_s = sum(r.get("eval_seconds", 0.0) for r in rows) / n
    return {
        "system": name,
        "seconds_per_round": per_round,
        "train_seconds_per_round": per_round - eval_s,
        "eval_seconds_per_round": eval_s,
        "peak_mib": result["peak_mib"],
        "mb_up_per_round": sum(r["bytes_up"] for r in rows) / n / 1e6,
        "mb_down_per_round": sum(r["bytes_down"] for r in rows) / n / 1e6,
        "final_eval_loss": rows[-1]["eval_loss"],
        "final_eval_accuracy": rows[-1]["eval_accuracy"],
        "wall_seconds": result["wall_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", choices=["fedtune", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (worker_fedtune if args.worker == "fedtune" else worker_plain)(args.rounds, args.worker_out)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            summarize("fedtune simulate (loopback gRPC)", run_child("fedtune", args.rounds, Path(tmp))),
            summarize("plain loop, one process", run_child("plain", args.rounds, Path(tmp))),
        ]
    fed, plain = rows
    ratios = {
        "fedtune_vs_plain_time": fed["seconds_per_round"] / plain["seconds_per_round"],
        "fedtune_vs_plain_memory": fed["peak_mib"] / plain["peak_mib"],
    }
    print(f"{'system':<34} {'s/round':>8} {'train s':>8} {'eval s':>7} {'peak MiB':>9} {'MB up':>7} {'MB down':>8} {'eval loss':>9} {'eval acc':>8}")
    for r in rows:
        print(
            f"{r['system']:<34} {r['seconds_per_round']:>8.1f} {r['train_seconds_per_round']:>8.1f} {r['eval_seconds_per_round']:>7.1f} "
            f"{r['peak_mib']:>9.0f} {r['mb_up_per_round']:>7.2f} {r['mb_down_per_round']:>8.2f} {r['final_eval_loss']:>9.4f} {r['final_eval_accuracy']:>8.3f}"
        )
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    result = {"rounds": args.rounds, "rows": rows, "ratios": ratios}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
