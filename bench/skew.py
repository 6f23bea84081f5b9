"""Learning under label skew: every drift-fighting strategy on the demo task, beside centralized
training of the same number of steps.

    python bench/skew.py [--rounds 6] [--settings dir0.1x3,dir0.5x3,iidx3,dir0.1x10,dir0.5x10,iidx10]
                         [--strategies fedavg,fedavgm,...] [--seeds N | --seed-list S ...] [--out FILE]

The demo task (MiniLM + LoRA r=8 on query/value + head, 3-class tweets, 1000 held-out tweets)
with every fedtune default except the strategy. A setting ``dirAxN`` is N clients with a
Dirichlet(A) label split, ``iidxN`` N clients with an IID split; every client trains every
round. A strategy is a registry name, optionally with options: ``fedadam:server_lr=0.01``.
The ``centralized`` row trains one adapter on the pooled training data with the same
optimizer, batch size and learning rate, for N x local_steps steps per "round", and is evaluated
at the same points. Columns: accuracy after round 3 and after the last round.

A row names one method alone: a strategy that is not a client correction runs without the
classification default correction (``client_correction = "none"``). With ``--seeds N`` every cell
runs once per seed (partition, initial adapter and dropout all follow it; ``bench/seeds.py``): a
cell is the mean ± its 95% interval, the JSON keeps ``<key>_ci95`` and ``<key>_per_seed``, and
each row's final accuracy is compared with fedavg's, paired by seed ("no difference measured"
when the interval contains zero).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedtune.aggregation import STRATEGIES
from fedtune.config import RunConfig
from fedtune.options import parse_scalar
from fedtune.simulation.runner import run_simulation

from seeds import add_arguments, format_mean, paired_difference, seeds_of, summarize

DEFAULT_STRATEGIES = "fedavg,fedavgm,fedadam,fedyogi,fedprox,scaffold,fedlc,hetlora,flexlora"
DEFAULT_SETTINGS = "dir0.1x3,dir0.5x3,iidx3,dir0.1x10,dir0.5x10,iidx10"


def parse_setting(text: str) -> tuple[str, float, int]:
    """``dir0.5x3`` -> ("dirichlet", 0.5, 3); ``iidx10`` -> ("iid", 0, 10)."""
    head, _, clients = text.partition("x")
    if head == "iid":
        return "iid", 0.0, int(clients)
    if head.startswith("dir"):
        return "dirichlet", float(head[3:]), int(clients)
    raise SystemExit(f"bad setting {text!r}: use dirALPHAxN or iidxN")


def parse_strategy(text: str) -> tuple[str, dict]:
    name, *pairs = text.split(":")
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = parse_scalar(value)
    return name, options


def config_for(setting: str, rounds: int, run_dir: str, eval_examples: int, seed: int = 0) -> RunConfig:
    partition, alpha, clients = parse_setting(setting)
    config = RunConfig()
    config.seed = seed
    config.federation.rounds = rounds
    config.simulation.clients = clients
    config.simulation.partition = partition
    if partition == "dirichlet":
        config.simulation.alpha = alpha
    config.simulation.eval_examples = eval_examples
    config.run_dir = run_dir
    return config


def federated(strategy: str, setting: str, rounds: int, tmp: str, eval_examples: int, lr: float | None, seed: int = 0) -> list[float]:
    name, options = parse_strategy(strategy)
    config = config_for(setting, rounds, str(Path(tmp) / f"{strategy}-{setting}-seed{seed}".replace(":", "_")), eval_examples, seed)
    config.federation.strategy = name
    config.federation.options = options
    if STRATEGIES.get(name).axis != "client-correction":  # a row names one method: no default correction beside it
        config.federation.client_correction = "none"
    if lr:
        config.training.learning_rate = lr
    result = run_simulation(config)
    return [r["eval_accuracy"] for r in result.history]


def centralized(setting: str, rounds: int, eval_examples: int, lr: float | None, seed: int = 0) -> list[float]:
    """One adapter on the pooled data, N x local_steps steps per round, evaluated per round."""
    import torch

    from fedtune.adapters import adapter_state, inject_lora
    from fedtune.client.recipes import Recipe, TrainSettings
    from fedtune.client.recipes.base import LocalOptions
    from fedtune.coordinator.app import plan_from_config
    from fedtune.models import ModelStore, resolve_source
    from fedtune.simulation.runner import prepare_data
    from fedtune.tasks import get_task

    config = config_for(setting, rounds, "", eval_examples, seed)
    t = config.training
    train, evals, labels = prepare_data(config)
    store, source, task = ModelStore(seed=config.seed), resolve_source(config.model.source), get_task("seq-cls")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = inject_lora(store.instance(source, "seq-cls", labels), plan_from_config(config), "seq-cls")
    items = store.encode(source, task, train, config.model.max_length, labels)
    eval_items = store.encode(source, task, evals, config.model.max_length, labels)
    pad = store.pad_id(source)
    state, recipe, out = adapter_state(model), Recipe(LocalOptions(), {}), []
    # One AdamW run across all the steps: the recipe trains a "round" at a time, so the optimizer
    # restarts each round, as a client's does; the data order continues from a per-round seed.
    for r in range(1, rounds + 1):
        steps = config.simulation.clients * t.local_steps
        state, _ = recipe.run(model, state, {}, task, items, TrainSettings(steps, t.batch_size, lr or t.learning_rate, t.weight_decay, seed=1000 * seed + r), pad)
        out.append(task.evaluate(model, eval_items, pad, 64)["eval_accuracy"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS)
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated; name:key=value:... for options")
    parser.add_argument("--no-centralized", action="store_true")
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=None, help="client learning rate (default: fedtune's)")
    parser.add_argument("--out", type=Path)
    add_arguments(parser)
    args = parser.parse_args(argv)
    seeds = seeds_of(args)
    settings = args.settings.split(",")
    strategies = args.strategies.split(",") + ([] if args.no_centralized else ["centralized"])
    mid = min(3, args.rounds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in strategies:
            row: dict = {"name": strategy}
            for setting in settings:
                started = time.monotonic()
                by_seed = []
                for seed in seeds:
                    print(f"running {strategy} on {setting} (seed {seed}) ...", file=sys.stderr, flush=True)
                    accs = (centralized(setting, args.rounds, args.eval_examples, args.lr, seed) if strategy == "centralized"
                            else federated(strategy, setting, args.rounds, tmp, args.eval_examples, args.lr, seed))
                    by_seed.append(accs)
                    print(f"  {strategy} {setting} seed {seed}: " + " ".join(f"{a:.3f}" for a in accs), file=sys.stderr, flush=True)
                row.update(summarize({f"{setting}_acc_round{mid}": [a[mid - 1] for a in by_seed],
                                      f"{setting}_acc_round{args.rounds}": [a[-1] for a in by_seed]}))
                row[f"{setting}_acc_by_round"] = [sum(a[i] for a in by_seed) / len(by_seed) for i in range(args.rounds)]
                row[f"{setting}_wall_seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            if args.out:  # after every row, so a run cut short still leaves what it measured
                write_json(args.out, rows, args, settings, seeds)
    header = f"{'strategy':<28}" + "".join(f"{s + ' r' + str(mid):>20}{s + ' r' + str(args.rounds):>20}" for s in settings)
    print(header)
    for row in rows:
        cell = lambda key: format_mean(row[key], row[f"{key}_ci95"], ".3f")  # noqa: E731
        print(f"{row['name']:<28}" + "".join(f"{cell(f'{s}_acc_round{mid}'):>20}{cell(f'{s}_acc_round{args.rounds}'):>20}" for s in settings))
    base = next((r for r in rows if r["name"] == "fedavg"), None)
    comparisons = []
    for row in rows:  # each row's final accuracy against fedavg's, paired by seed
        if base is None or row is base:
            continue
        for s in settings:
            key = f"{s}_acc_round{args.rounds}_per_seed"
            d = paired_difference(row[key], base[key])
            comparisons.append({"row": row["name"], "setting": s, "accuracy_difference": d.mean, "accuracy_difference_ci95": d.ci95,
                                "measured": d.measured, "verdict": f"{s}: " + d.verdict(row["name"], "fedavg", lower_is_better=False)})
            print(comparisons[-1]["verdict"])
    if args.out:
        write_json(args.out, rows, args, settings, seeds, comparisons)
    return 0


def write_json(path: Path, rows: list[dict], args: argparse.Namespace, settings: list[str], seeds: list[int], comparisons: list[dict] | None = None) -> None:
    out = {"rows": rows, "comparisons": comparisons or [], "seeds": seeds, "rounds": args.rounds, "settings": settings,
           "eval_examples": args.eval_examples, "lr": args.lr}
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
