"""Heterogeneous devices on the demo task: one uniform adapter for all versus a plan per device.

    python bench/heterogeneity.py [--rounds 3] [--clients-per-tier 2] [--seeds N | --seed-list S ...] [--out FILE]
    python bench/heterogeneity.py --table a.json b.json [--only ROW ...] [--out FILE]

The demo task (MiniLM + LoRA on the 3-class tweet corpus, Dirichlet(0.5) split) on a fleet of
phones, laptops and servers (``fedtune.devices.TIERS``). Rows:

- uniform-weakest: fedavg, every client trains the plan the phone can afford;
- uniform-largest: fedavg, every client trains the largest plan; devices that cannot finish
  it within the deadline (the phones) are dropped by the emulated deadline;
- uniform-largest-no-deadline: the same with no deadline (every round waits for the phones);
- hetlora, flexlora, flora: the planner gives every device the largest plan it affords;
- with ``--no-freeze-rows``: hetlora and flexlora without the frozen remainder (clients see only
  their slice of the global adapter, as in the HetLoRA paper).

LEGEND's measure: simulated seconds until the eval accuracy first reaches the final accuracy of
uniform-largest-no-deadline (the target), summed over the rounds it took.

Simulated seconds come from the cost model (``fedtune.coordinator.planner``) applied to each
tier's compute and link speed: a round lasts as long as its slowest accepted client, capped by
the deadline. Wall seconds are this machine's real time, where every client trains in turn.

With ``--seeds N`` every row runs once per seed (``bench/seeds.py``); the target and the time to
reach it are taken within each seed (against that seed's uniform-largest-no-deadline run), then
each figure is the mean with ``<key>_ci95`` and ``<key>_per_seed``; a row that misses the target
in some seed has no mean for it (its per-seed list says which). Each row's final accuracy is
compared with uniform-largest-no-deadline's, paired by seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedtune.adapters import AdapterPlan
from fedtune.config import RunConfig
from fedtune.coordinator.app import model_geometry
from fedtune.coordinator.planner import CostModel, Planner
from fedtune.devices import TIERS
from fedtune.models import ModelStore, resolve_source
from fedtune.simulation.runner import run_simulation

from seeds import add_arguments, combine, compare, format_mean, merge_documents, seeds_of

TIER_ORDER = ("phone", "laptop", "server")


def base_config(rounds: int, clients_per_tier: int, lr: float, run_dir: str, seed: int = 0) -> RunConfig:
    config = RunConfig()
    config.seed = seed
    config.federation.rounds = rounds
    config.federation.client_correction = "none"  # the rows compare aggregation rules alone
    config.training.learning_rate = lr
    config.simulation.tiers = [t for t in TIER_ORDER for _ in range(clients_per_tier)]
    config.simulation.clients = len(config.simulation.tiers)
    config.simulation.eval_examples = 500
    config.simulation.deadline_s = config.planner.round_budget_s
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.run_dir = run_dir
    return config


def phone_plan(config: RunConfig) -> AdapterPlan:
    store = ModelStore()
    from fedtune.data import TWEETS_LABELS

    geometry, plan = model_geometry(store.base(resolve_source("minilm"), "seq-cls", TWEETS_LABELS), AdapterPlan(rank=8, alpha=16.0))
    cost = CostModel(config.training.batch_size, config.model.max_length, config.training.local_steps)
    planner = Planner(geometry, cost, plan, min_rank=config.planner.min_rank, max_rank=config.planner.max_rank, round_budget_s=config.planner.round_budget_s)
    return planner.assign(TIERS["phone"]).plan


def run_row(name: str, config: RunConfig) -> dict:
    started = time.monotonic()
    result = run_simulation(config)
    wall = time.monotonic() - started
    rows = result.history
    n = len(rows)
    return {
        "name": name,
        "final_eval_loss": rows[-1]["eval_loss"],
        "final_eval_accuracy": rows[-1]["eval_accuracy"],
        "mb_up_per_round": sum(r["bytes_up"] for r in rows) / n / 1e6,
        "mb_down_per_round": sum(r["bytes_down"] for r in rows) / n / 1e6,
        "sim_seconds_per_round": sum(r.get("sim_seconds", 0.0) for r in rows) / n,
        "wall_seconds": wall,
        "clients_per_round": sum(r["clients"] for r in rows) / n,
        "eval_loss_by_round": [r["eval_loss"] for r in rows],
        "eval_accuracy_by_round": [r["eval_accuracy"] for r in rows],
        "sim_seconds_by_round": [r.get("sim_seconds", 0.0) for r in rows],
    }


def settings_for(args: argparse.Namespace, tmp: str, seed: int) -> list[tuple[str, RunConfig]]:
    """The rows of one seed: (name, config)."""
    def cfg(name: str) -> RunConfig:
        return base_config(args.rounds, args.clients_per_tier, args.lr, str(Path(tmp) / name), seed)

    weakest = cfg("uniform-weakest")
    plan = phone_plan(weakest)
    weakest.federation.strategy = "fedavg"
    weakest.lora.layers = list(plan.layers)
    weakest.lora.rank = plan.rank
    weakest.lora.alpha = plan.alpha
    largest = cfg("uniform-largest")
    largest.federation.strategy = "fedavg"
    largest.lora.rank = largest.planner.max_rank
    largest.lora.alpha = largest.lora.rank * 2.0
    patient = cfg("uniform-largest-no-deadline")
    patient.federation.strategy = "fedavg"
    patient.lora.rank, patient.lora.alpha = largest.lora.rank, largest.lora.alpha
    patient.simulation.deadline_s = 0.0
    settings = [("uniform-weakest", weakest), ("uniform-largest", largest), ("uniform-largest-no-deadline", patient)]
    for strategy in ("hetlora", "flexlora", "flora"):
        c = cfg(strategy)
        c.federation.strategy = strategy
        settings.append((strategy, c))
    if args.no_freeze_rows:
        for strategy in ("hetlora", "flexlora"):
            c = cfg(strategy + "-no-freeze")
            c.federation.strategy = strategy
            c.federation.options = {"freeze_remainder": False}
            settings.append((strategy + "-no-freeze", c))
    return settings


def add_targets(results: list[dict]) -> None:
    """LEGEND's measure within one seed: simulated time (and traffic) until the accuracy the
    uniform-largest plan ends with when nobody is dropped."""
    baseline = next((r for r in results if r["name"] == "uniform-largest-no-deadline"), None)
    target = baseline["final_eval_accuracy"] if baseline else None
    for r in results:
        hit = next((i + 1 for i, acc in enumerate(r["eval_accuracy_by_round"]) if target is not None and acc >= target - 1e-9), None)
        r["rounds_to_target"] = hit
        r["sim_seconds_to_target"] = sum(r["sim_seconds_by_round"][:hit]) if hit else None
        r["mb_to_target"] = hit * (r["mb_up_per_round"] + r["mb_down_per_round"]) if hit else None
    for r in results:
        reached = baseline is not None and baseline["sim_seconds_to_target"] and r["sim_seconds_to_target"]
        r["speedup_vs_uniform_largest"] = baseline["sim_seconds_to_target"] / r["sim_seconds_to_target"] if reached else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-tier", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="local learning rate (3e-3 destabilizes the deeper adapters)")
    parser.add_argument("--only", nargs="+", help="run (or, with --table, print) only these settings")
    parser.add_argument("--no-freeze-rows", action="store_true", help="also run hetlora and flexlora without the frozen remainder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print the table of earlier runs' --out files (other seeds of the same settings) instead of running")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.table:
        return table(args)
    seeds = seeds_of(args)
    by_name: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs = []
            for name, config in settings_for(args, str(Path(tmp) / f"seed{seed}"), seed):
                if args.only and name not in args.only:
                    continue
                print(f"running {name} (seed {seed}) ...", file=sys.stderr, flush=True)
                runs.append(run_row(name, config))
            add_targets(runs)
            for r in runs:
                by_name.setdefault(r["name"], []).append(r)
    report(args, [combine(name, runs) for name, runs in by_name.items()], seeds)
    return 0


def report(args: argparse.Namespace, results: list[dict], seeds: list[int]) -> None:
    """The comparisons, the printed table and (with ``--out``) the JSON of ``results``."""
    target = next((r["final_eval_accuracy"] for r in results if r["name"] == "uniform-largest-no-deadline"), None)
    comparisons = compare(results, [(r["name"], "uniform-largest-no-deadline") for r in results if r["name"] != "uniform-largest-no-deadline"],
                          key="final_eval_accuracy", lower_is_better=False)

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"target eval accuracy (uniform-largest-no-deadline after {args.rounds} rounds, mean over {len(seeds)} seed(s)): {f(target, '.4f')}")
    print(f"{'setting':<28} {'eval loss':>17} {'eval acc':>13} {'MB up/rd':>9} {'MB down/rd':>10} {'sim s/rd':>9} {'clients/rd':>10} {'wall s':>7} {'rds to tgt':>10} {'sim s to tgt':>12} {'speedup':>7}")
    for r in results:
        print(
            f"{r['name']:<28} {format_mean(r['final_eval_loss'], r['final_eval_loss_ci95']):>17} {format_mean(r['final_eval_accuracy'], r['final_eval_accuracy_ci95'], '.3f'):>13} {r['mb_up_per_round']:>9.2f} "
            f"{r['mb_down_per_round']:>10.2f} {r['sim_seconds_per_round']:>9.1f} {r['clients_per_round']:>10.1f} {r['wall_seconds']:>7.0f} "
            f"{f(r['rounds_to_target'], '.1f'):>10} {f(r['sim_seconds_to_target'], '.0f'):>12} {f(r.get('speedup_vs_uniform_largest'), '.2f'):>7}"
        )
    for c in comparisons:
        print(c["verdict"])
    out = {"target_eval_accuracy": target, "seeds": seeds, "comparisons": comparisons, "rounds": args.rounds, "clients_per_tier": args.clients_per_tier, "lr": args.lr, "tiers": {k: vars(v) for k, v in TIERS.items()}, "rows": results}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


# Figures a row lacks in a seed that never reached the target (None).
TARGET_FIGURES = ("rounds_to_target", "sim_seconds_to_target", "mb_to_target", "speedup_vs_uniform_largest")


def _missed_every_seed(row: dict, seeds: int) -> dict:
    """``row`` with a per-seed list of None for each target figure that every one of its document's
    seeds missed: ``combine`` keeps no per-seed list for a figure no seed has, and merging needs
    one per seed."""
    missing = {f"{key}_per_seed": [None] * seeds for key in TARGET_FIGURES
               if key in row and row[key] is None and f"{key}_per_seed" not in row}
    return {**row, **missing}


# The settings of an --out document that runs merged by --table must share.
SETTINGS = ("rounds", "clients_per_tier", "lr", "tiers")


def table(args: argparse.Namespace) -> int:
    """``--table``: earlier runs' ``--out`` files (other seeds of the same rows, run on two cores
    at once, say) merged into one table, compared paired, written with ``--out``. Targets and
    times to reach them were taken within each seed when it ran, so merging keeps them."""
    try:
        documents = [json.loads(path.read_text()) for path in args.table]
        if args.only:  # rows some documents ran with fewer seeds are left out of the merge
            documents = [{**doc, "rows": [r for r in doc["rows"] if r["name"] in args.only]} for doc in documents]
        documents = [{**doc, "rows": [_missed_every_seed(r, len(doc["seeds"])) for r in doc["rows"]]} for doc in documents]
        rows, seeds = merge_documents(documents, SETTINGS)
        for row in rows:  # a per-round figure is the mean over every seed, not the first document's
            for key in ("eval_loss_by_round", "eval_accuracy_by_round", "sim_seconds_by_round"):
                parts = [(r[key], len(doc["seeds"])) for doc in documents for r in doc["rows"] if r["name"] == row["name"]]
                row[key] = [sum(v[i] * n for v, n in parts) / sum(n for _, n in parts) for i in range(len(parts[0][0]))]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SystemExit(f"--table: {exc}") from None
    args.rounds, args.clients_per_tier, args.lr = (documents[0][k] for k in ("rounds", "clients_per_tier", "lr"))
    report(args, rows, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
