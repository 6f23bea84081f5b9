"""fedtune beside Flower on the same work, measured in one run: FedAvg aggregation, and a whole
simulated federation.

    python bench/vs_flower.py [--part agg|sim|both] [--out FILE]

Aggregation (``agg-<system>-<N>x<MB>``): N client updates of the same tensors (eight float32
matrices of 1024 columns, 1 or 32 MiB per client), example-weighted mean. fedtune: its FedAvg
strategy's ``aggregate`` on the tensors its coordinator holds after receiving updates. Flower:
``aggregate_arrayrecords``, what Flower's message-API FedAvg runs on the ArrayRecords its
ServerApp holds after receiving replies. Beside both, a memcpy of the same bytes into one
update-sized buffer (``torch``'s copy, the machine's threads), the physical limit. ``gb_s`` is
input bytes (N x MiB) per second, best of ``--repeats`` (more for quick cases), each repeat started after the previous
result was freed (as a coordinator drops the global state it replaced); the two systems'
results are checked to agree.

Simulation (``sim-<system>-<N>``): the workload of bench/simulate.py (all-MiniLM-L6-v2, LoRA
r=8 on query/value plus the head, tweets split Dirichlet(0.5), 20 local steps of batch 16,
central evaluation on 1000 held-out tweets each round) with N clients, 5 trained per round,
FedAvg, 3 rounds. Both train two clients at a time on the machine's two cores. fedtune:
``fedtune simulate --parallel 2`` (coordinator and clients over loopback gRPC, one process,
with the malloc settings its command line applies, ``fedtune.allocator``). Flower: Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend, one CPU
per virtual client, two CPUs) running fedtune's ServerApp and ClientApp
(``fedtune.flower``), so both train, aggregate and evaluate with the same code and the
difference is the engine (Flower's processes keep glibc's malloc defaults, as a Flower user's
would). ``seconds_per_round`` is the mean round time (open to close,
evaluation included) over all rounds, ``steady_seconds_per_round`` leaves round 1 (start-up)
out; with ``--fedtune-p1`` a row ``sim-fedtune-p1-<N>`` adds fedtune at its default
``--parallel 1`` (one client at a time with both cores); ``peak_mib`` is the resident memory of the whole process tree (Ray's processes included),
sampled every 50 ms; ``mb_per_round`` the adapter bytes sent and received per round. The time
and memory comparison is void unless the final eval losses agree within ``--loss-tolerance``:
the script says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from measure import run_worker

MIB = 1024 * 1024
COLUMNS, MATRICES = 1024, 8
PARALLEL = 2  # clients training at once in both systems (Flower: two one-CPU actors)
QUIET = {"FLWR_LOG_LEVEL": "ERROR", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
         "RAY_DEDUP_LOGS": "0", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- aggregation


def client_tensors(n: int, mib: int) -> list[tuple[dict, int]]:
    """N updates of MATRICES float32 matrices adding up to ``mib`` MiB each, with example counts."""
    import torch

    g = torch.Generator().manual_seed(n * 1000 + mib)
    rows = mib * MIB // 4 // COLUMNS // MATRICES
    return [({f"layer.{i}.weight": torch.randn(rows, COLUMNS, generator=g) for i in range(MATRICES)}, 10 + k % 90) for k in range(n)]


def best_seconds(fn, repeats: int, min_total_s: float = 0.5) -> tuple[float, object]:
    """Best time of at least ``repeats`` calls, more for quick ones (until ``min_total_s`` of
    timed work, at most 100 calls), as ``timeit`` does."""
    times, result = [], None
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < 100):
        result = None  # the previous result is freed first, as a coordinator drops the old state
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def aggregation_rows(n: int, mib: int, repeats: int) -> list[dict]:
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedtune.adapters import AdapterPlan
    from fedtune.aggregation import ClientInfo, ClientUpdate, RoundContext
    from fedtune.aggregation.base import build_strategy
    from fedtune.protocol.tensors import specs_of

    clients = client_tensors(n, mib)
    spec = specs_of(clients[0][0])
    state = {name: torch.zeros_like(t) for name, t in clients[0][0].items()}
    infos = {f"c{k}": ClientInfo(f"c{k}", AdapterPlan(), spec, num_examples=count) for k, (_, count) in enumerate(clients)}
    ctx = RoundContext(1, infos, global_spec=spec)
    updates = [ClientUpdate(f"c{k}", tensors, count, {"train_loss": 1.0}) for k, (tensors, count) in enumerate(clients)]
    fedavg = build_strategy("fedavg")
    fed_s, (fed_state, _) = best_seconds(lambda: fedavg.aggregate(ctx, state, updates), repeats)

    buffers = {name: torch.empty_like(t) for name, t in state.items()}

    def memcpy() -> None:
        for tensors, _ in clients:
            for name, t in tensors.items():
                buffers[name].copy_(t)

    copy_s, _ = best_seconds(memcpy, repeats)

    records = [RecordDict({"arrays": ArrayRecord({name: Array(t.numpy()) for name, t in tensors.items()}),
                           "metrics": MetricRecord({"num-examples": count})}) for tensors, count in clients]
    updates.clear()  # free fedtune's copy of the updates before building Flower's
    clients.clear()
    gc.collect()
    flower_s, flower_record = best_seconds(lambda: aggregate_arrayrecords(records, "num-examples"), repeats)
    for name, t in fed_state.items():
        np.testing.assert_allclose(t.numpy(), flower_record[name].numpy(), rtol=1e-4, atol=1e-6)

    gb = n * mib * MIB / 1e9
    tag = f"{n}x{mib}"
    return [
        {"name": f"agg-fedtune-{tag}", "clients": n, "mib_per_client": mib, "seconds": fed_s, "gb_s": gb / fed_s},
        {"name": f"agg-flower-{tag}", "clients": n, "mib_per_client": mib, "seconds": flower_s, "gb_s": gb / flower_s},
        {"name": f"agg-memcpy-{tag}", "clients": n, "mib_per_client": mib, "seconds": copy_s, "gb_s": gb / copy_s},
    ]


# ---------------------------------------------------------------- simulation


def sim_config(clients: int, rounds: int, run_dir: str, parallel: int = PARALLEL):
    from simulate import workload_config

    config = workload_config(rounds, run_dir)
    config.simulation.clients = clients
    config.simulation.parallel = parallel
    config.federation.clients_per_round = 5
    config.federation.min_clients = clients
    return config


def worker_fedtune(clients: int, rounds: int, out: Path, parallel: int = PARALLEL) -> None:
    from fedtune.allocator import tune_allocator
    from fedtune.simulation.runner import run_simulation

    tune_allocator()  # as `fedtune simulate` does at start

    result = run_simulation(sim_config(clients, rounds, str(out.parent / f"fedtune-{clients}-p{parallel}"), parallel))
    out.write_text(json.dumps({"history": result.history}))


def worker_flower(clients: int, rounds: int, out: Path) -> None:
    os.environ.update(QUIET)
    from flwr.simulation import run_simulation

    from fedtune.flower import client_app, server_app

    config = sim_config(clients, rounds, str(out.parent / f"flower-{clients}"))
    server = server_app(config)
    run_simulation(server_app=server, client_app=client_app(config), num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": False}})
    out.write_text(json.dumps({"history": server.fedtune_history}))


def sim_row(system: str, clients: int, result: dict) -> dict:
    rows = result["history"]
    seconds = [r["seconds"] for r in rows]
    return {
        "name": f"sim-{system}-{clients}",
        "clients": clients,
        "rounds": len(rows),
        "seconds_per_round": sum(seconds) / len(seconds),
        "steady_seconds_per_round": sum(seconds[1:]) / max(len(seconds) - 1, 1),
        "peak_mib": result["peak_mib"],
        "mb_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in rows) / len(rows) / 1e6,
        "final_eval_loss": rows[-1]["eval_loss"],
        "final_eval_accuracy": rows[-1].get("eval_accuracy"),
    }


# ---------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["agg", "sim", "both"], default="both")
    parser.add_argument("--agg-clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--agg-mib", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sim-clients", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loss-tolerance", type=float, default=0.05, help="largest relative difference of the final eval losses")
    parser.add_argument("--fedtune-p1", action="store_true", help="also run fedtune at --parallel 1 (its default), rows sim-fedtune-p1-<N>")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", choices=["fedtune", "flower"], help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=PARALLEL, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker == "fedtune":
            worker_fedtune(args.clients, args.rounds, args.worker_out, args.parallel)
        else:
            worker_flower(args.clients, args.rounds, args.worker_out)
        return 0

    import torch

    rows, verdicts = [], []
    if args.part in ("agg", "both"):
        for n in args.agg_clients:
            for mib in args.agg_mib:
                new = aggregation_rows(n, mib, args.repeats)
                rows += new
                fed, flower, copy = (r["gb_s"] for r in new)
                verdicts.append(f"agg {n}x{mib}: fedtune {fed / copy:.0%} of memcpy (goal 50%), {fed / flower:.1f}x Flower (goal 3x)")
                print(f"measured aggregation {n}x{mib} MiB", file=sys.stderr)
    if args.part in ("sim", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.sim_clients:
                pair = {}
                for system in ("fedtune", "flower"):
                    result = run_worker(__file__, ["--worker", system, "--clients", str(n), "--rounds", str(args.rounds)], Path(tmp) / f"{system}-{n}.json",
                                        env=QUIET)
                    pair[system] = sim_row(system, n, result)
                    print(f"measured simulation {system} {n} clients", file=sys.stderr)
                if args.fedtune_p1:
                    result = run_worker(__file__, ["--worker", "fedtune", "--parallel", "1", "--clients", str(n), "--rounds", str(args.rounds)],
                                        Path(tmp) / f"fedtune-p1-{n}.json", env=QUIET)
                    pair["fedtune-p1"] = sim_row("fedtune-p1", n, result)
                    print(f"measured simulation fedtune --parallel 1, {n} clients", file=sys.stderr)
                rows += pair.values()
                fed, flower = pair["fedtune"], pair["flower"]
                gap = abs(fed["final_eval_loss"] - flower["final_eval_loss"]) / flower["final_eval_loss"]
                if gap > args.loss_tolerance:
                    verdicts.append(f"sim {n}: VOID, final eval losses differ by {gap:.1%} (tolerance {args.loss_tolerance:.0%}): not the same work")
                else:
                    verdicts.append(f"sim {n}: eval losses agree within {gap:.1%}; fedtune {fed['seconds_per_round'] / flower['seconds_per_round']:.2f}x Flower's "
                                    f"seconds per round (steady {fed['steady_seconds_per_round'] / flower['steady_seconds_per_round']:.2f}x; goal 0.6x), "
                                    f"{fed['peak_mib'] / flower['peak_mib']:.2f}x its peak memory (goal 0.33x)")
                    if "fedtune-p1" in pair:
                        p1 = pair["fedtune-p1"]
                        verdicts.append(f"sim {n}, fedtune --parallel 1: {p1['seconds_per_round'] / flower['seconds_per_round']:.2f}x Flower's seconds per round, "
                                        f"{p1['peak_mib'] / flower['peak_mib']:.2f}x its peak memory, final eval loss {p1['final_eval_loss']:.4f}")

    agg = [r for r in rows if r["name"].startswith("agg-")]
    if agg:
        print(f"\n{'aggregation':<24} {'GB/s':>7} {'seconds':>9}")
        for r in agg:
            print(f"{r['name']:<24} {r['gb_s']:>7.2f} {r['seconds']:>9.4f}")
    sim = [r for r in rows if r["name"].startswith("sim-")]
    if sim:
        print(f"\n{'simulation':<21} {'s/round':>8} {'steady':>7} {'peak MiB':>9} {'MB/round':>9} {'eval loss':>10} {'eval acc':>9}")
        for r in sim:
            print(f"{r['name']:<21} {r['seconds_per_round']:>8.1f} {r['steady_seconds_per_round']:>7.1f} {r['peak_mib']:>9.0f} {r['mb_per_round']:>9.2f} "
                  f"{r['final_eval_loss']:>10.4f} {r['final_eval_accuracy']:>9.3f}")
    print()
    for v in verdicts:
        print(v)
    result = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats, "rounds": args.rounds,
              "loss_tolerance": args.loss_tolerance, "verdicts": verdicts, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
