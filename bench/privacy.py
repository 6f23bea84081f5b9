"""Accuracy under differential privacy on the demo task: adapter variants at several epsilons,
sample-level DP on the demo's clients and client-level DP with 100 simulated clients.

    python bench/privacy.py [--levels sample,client] [--variants lora,ffa,fedsb,fedsvd]
                            [--epsilons 1,4,8,inf] [--rounds 4] [--partition iid]
                            [--batch-size B] [--local-steps S] [--sample-clip C]
                            [--seeds N | --seed-list S ...] [--out FILE]
    python bench/privacy.py --table a.json b.json [--out FILE] [--markdown]

Every row is one federated run over loopback gRPC of the demo task (MiniLM, LoRA r=8 on
query/value + head, 3-class tweets, strategy fedavg, 1000 held-out tweets), split IID by default
so that the run without DP is a real ceiling (with ``--partition dirichlet``, Dirichlet(0.5),
plain FedAvg drifts to the majority class on 3 clients and the non-DP row says little). ``eps<E>`` rows ask for ``--target-epsilon E`` (delta 1e-5): fedtune picks the noise
multiplier that ends the run at E, and the row reports the epsilon the run's accountant really
spent (``epsilon``; the largest device's at sample level). ``epsinf`` is the same run without DP.

- sample level: ``--clients`` demo clients (default 3), every client every round, DP-SGD on each
  device with per-example clip ``--sample-clip``;
- client level: 100 simulated clients, 10 expected per round (Poisson, q = 0.1), DP-FedAvg with
  update clip ``--client-clip``.

Columns: ``eval_loss``, ``eval_accuracy`` (final), ``epsilon``, ``noise_multiplier``,
``bytes_up_per_client_round``, ``wall_seconds``. Variants: ``lora`` (plain), ``ffa`` (FFA-LoRA: A
frozen at its seeded init, only B trained and sent), ``fedsb`` (Fed-SB: B and A fixed from the
pretrained weight's SVD, only the r x r cores trained and sent) and ``fedsvd`` (B trained, A
re-factorized by SVD on the coordinator after every round). ``--variant-lr`` sets a variant's
local learning rate (default: fedsb 2e-2, as LoRA-SB/LoRA-XS train their few parameters with a
larger step; the others fedtune's default, 3e-3).

With ``--seeds N`` every row runs once per seed (``bench/seeds.py``; the DP noise itself comes
from secret randomness, as in production, so its spread is part of each interval): each figure is the mean with ``<key>_ci95`` and
``<key>_per_seed``. Comparisons of final accuracy, paired by seed: each DP row against the same
variant's run without DP (what DP costs that variant), and at each level and epsilon every
variant against every other (which adapter to pick under that guarantee; the same seed gives
the variants the same partition and initial adapter).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from fedtune.config import RunConfig
from fedtune.simulation.runner import run_simulation

from seeds import add_arguments, combine, format_mean, merge_documents, paired_difference, seeds_of


def run(level: str, variant: str, eps: float, args, tmp: str, seed: int = 0) -> dict:
    config = RunConfig()
    config.seed = seed
    config.federation.strategy, config.federation.client_correction = "fedavg", "none"
    config.federation.rounds = args.rounds
    config.lora.variant = variant
    config.simulation.eval_examples = 1000
    config.simulation.partition = args.partition
    if args.batch_size:
        config.training.batch_size = args.batch_size
    if args.local_steps:
        config.training.local_steps = args.local_steps
    if args.lr:
        config.training.learning_rate = args.lr
    if variant in args.variant_lr:
        config.training.learning_rate = args.variant_lr[variant]
    if level == "sample":
        config.simulation.clients = args.clients
    else:
        config.simulation.clients, config.federation.clients_per_round = 100, 10
        config.federation.round_timeout_s = 300
    if math.isfinite(eps):
        config.privacy.dp, config.privacy.target_epsilon, config.privacy.delta = level, eps, 1e-5
        config.privacy.clip, config.privacy.sample_clip = args.client_clip, args.sample_clip
    name = f"{variant}-eps{'inf' if not math.isfinite(eps) else f'{eps:g}'}"
    config.run_dir = str(Path(tmp) / f"{level}-{name}-seed{seed}")
    started = time.monotonic()
    result = run_simulation(config.validate())
    rows = result.history
    last = rows[-1]
    if level == "sample" and math.isfinite(eps):
        spent = last.get("dp_sample_epsilon_max")
        sigma = next(iter(last["dp_sample"].values()))["noise_multiplier"] if last.get("dp_sample") else None
    else:
        spent, sigma = last.get("dp_epsilon"), last.get("dp_noise_multiplier")
    return {
        "name": name, "level": level, "variant": variant, "target_epsilon": eps if math.isfinite(eps) else None,
        "learning_rate": config.training.learning_rate,
        "eval_loss": last["eval_loss"], "eval_accuracy": last.get("eval_accuracy"),
        "epsilon": spent if math.isfinite(eps) else None, "noise_multiplier": sigma,
        "bytes_up_per_client_round": sum(r["bytes_up_per_client"] or 0 for r in rows) / len(rows),
        "rounds": len(rows), "wall_seconds": round(time.monotonic() - started, 1),
        "stopped_because": result.stopped_because,
    }


def write_json(args, rows: list[dict], seeds: list[int], comparisons: list[dict] | None = None) -> None:
    args.out.write_text(json.dumps({"rows": rows, "comparisons": comparisons or [], "seeds": seeds, "rounds": args.rounds, "sample_clients": args.clients, "client_level_clients": 100,
                                    "client_level_per_round": 10, "partition": args.partition, "variant_lr": args.variant_lr, "sample_clip": args.sample_clip,
                                    "client_clip": args.client_clip, "delta": 1e-5,
                                    "batch_size": args.batch_size or "default", "lr": args.lr or "default",
                                    "local_steps": args.local_steps or "default"}, indent=2) + "\n")


def _variant_lrs(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        variant, _, lr = item.partition("=")
        try:
            out[variant.strip()] = float(lr)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected VARIANT=LR, got {item!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="sample,client")
    parser.add_argument("--variants", default="lora,ffa,fedsb,fedsvd")
    parser.add_argument("--partition", default="iid", help="iid or dirichlet (alpha 0.5)")
    parser.add_argument("--variant-lr", type=_variant_lrs, default=_variant_lrs("fedsb=2e-2"), metavar="V=LR,...",
                        help="local learning rate per variant (default fedsb=2e-2)")
    parser.add_argument("--epsilons", default="1,4,8,inf")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3, help="sample level: demo clients")
    parser.add_argument("--sample-clip", type=float, default=1.0)
    parser.add_argument("--client-clip", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=0, help="local batch size (default: fedtune's)")
    parser.add_argument("--lr", type=float, default=0.0, help="local learning rate (default: fedtune's)")
    parser.add_argument("--local-steps", type=int, default=0, help="local steps per round (default: fedtune's)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print the table of earlier runs' --out files (other seeds or rows, same settings) instead of running")
    parser.add_argument("--markdown", action="store_true", help="also print the table and the comparisons as markdown")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.table:
        return table(args)
    seeds = seeds_of(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.levels.split(","):
            for variant in args.variants.split(","):
                for text in args.epsilons.split(","):
                    eps = float(text)
                    runs = []
                    for seed in seeds:
                        print(f"running {level} {variant} eps={text} (seed {seed}) ...", file=sys.stderr, flush=True)
                        runs.append(run(level, variant, eps, args, tmp, seed))
                        r = runs[-1]
                        print(f"  acc {r['eval_accuracy']:.3f} loss {r['eval_loss']:.4f} eps {r['epsilon']} sigma {r['noise_multiplier']}", file=sys.stderr, flush=True)
                    rows.append(combine(runs[0]["name"], runs))
                    if args.out:  # after every row, so an interrupted run keeps what it measured
                        write_json(args, rows, seeds)
    report(args, rows, seeds, args.levels.split(","))
    return 0


def accuracy_comparison(row: dict, other: dict) -> dict:
    """``row``'s final accuracy against ``other``'s, paired by seed (one entry of ``comparisons``)."""
    d = paired_difference(row["eval_accuracy_per_seed"], other["eval_accuracy_per_seed"])
    return {"level": row["level"], "row": row["name"], "against": other["name"], "eval_accuracy_difference": d.mean,
            "eval_accuracy_difference_ci95": None if math.isnan(d.ci95) else d.ci95, "measured": d.measured,
            "verdict": f"{row['level']} level: " + d.verdict(row["name"], other["name"], lower_is_better=False)}


def paired_with_plain(rows: list[dict]) -> list[dict]:
    """Each DP row's final accuracy against the same variant's run without DP, paired by seed."""
    comparisons = []
    for r in rows:
        plain = next((x for x in rows if x["level"] == r["level"] and x["variant"] == r["variant"] and x["target_epsilon"] is None), None)
        if plain is not None and r is not plain:
            comparisons.append(accuracy_comparison(r, plain))
    return comparisons


def paired_across_variants(rows: list[dict]) -> list[dict]:
    """At each level and epsilon, each variant's final accuracy against every later row's of
    another variant, paired by seed."""
    return [accuracy_comparison(r, other) for i, r in enumerate(rows) for other in rows[i + 1:]
            if other["level"] == r["level"] and other["target_epsilon"] == r["target_epsilon"] and other["variant"] != r["variant"]]


def markdown(rows: list[dict], comparisons: list[dict]) -> None:
    """The rows as a RESULTS.md table (one level's rows at a time reads best), the comparisons as
    a list under it."""
    def mean(r: dict, key: str, spec: str) -> str:
        return "-" if r[key] is None else format_mean(r[key], r.get(f"{key}_ci95"), spec)

    print("\n| row | lr | eval loss | accuracy | epsilon | sigma | up B/round | wall s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.4g}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        print(f"| {r['name']} | {r['learning_rate']:g} | {mean(r, 'eval_loss', '.4f')} | {mean(r, 'eval_accuracy', '.3f')} | {eps} | {sigma} "
              f"| {r['bytes_up_per_client_round']:.0f} | {r['wall_seconds']:.0f} |")
    print("\nAccuracy, paired by seed (difference ± its 95% interval):")
    for c in comparisons:
        half = c["eval_accuracy_difference_ci95"]
        verdict = c["verdict"].split(": ", 2)[2]
        print(f"- {c['level']} level, {c['row']} − {c['against']} = {c['eval_accuracy_difference']:+.4f}{'' if half is None else f' ± {half:.4f}'}: {verdict};")


def report(args, rows: list[dict], seeds: list[int], levels: list[str]) -> None:
    """The comparisons, the JSON (with ``--out``) and the printed table of ``rows``."""
    comparisons = paired_with_plain(rows) + paired_across_variants(rows)
    if args.out:
        write_json(args, rows, seeds, comparisons)
    for level in levels:
        print(f"\n{level} level")
        print(f"{'row':<14}{'eval loss':>20}{'accuracy':>16}{'epsilon':>10}{'sigma':>8}{'up B/round':>12}")
        for r in (r for r in rows if r["level"] == level):
            eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "inf"
            sigma = f"{r['noise_multiplier']:.3g}" if r["noise_multiplier"] is not None else "-"
            print(f"{r['name']:<14}{format_mean(r['eval_loss'], r['eval_loss_ci95']):>20}{format_mean(r['eval_accuracy'], r['eval_accuracy_ci95'], '.3f'):>16}{eps:>10}{sigma:>8}{r['bytes_up_per_client_round']:>12.0f}")
    for c in comparisons:
        print(c["verdict"])
    if getattr(args, "markdown", False):
        markdown(rows, comparisons)


# The settings of an --out document that runs merged by --table must share.
SETTINGS = ("rounds", "sample_clients", "partition", "variant_lr", "sample_clip", "client_clip", "delta", "batch_size", "lr", "local_steps")


def table(args) -> int:
    """``--table``: earlier runs' ``--out`` files (other seeds or rows of the same settings, run
    on two cores at once, say) merged into one table, compared paired, written with ``--out``."""
    try:
        documents = [json.loads(path.read_text()) for path in args.table]
        rows, seeds = merge_documents(documents, SETTINGS)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--table: {exc}") from None
    first = documents[0]  # the merged document's settings are its parts'
    args.rounds, args.clients, args.partition = first["rounds"], first["sample_clients"], first["partition"]
    args.variant_lr, args.sample_clip, args.client_clip = first["variant_lr"], first["sample_clip"], first["client_clip"]
    args.batch_size, args.lr, args.local_steps = (0 if first[k] == "default" else first[k] for k in ("batch_size", "lr", "local_steps"))
    levels = list(dict.fromkeys(r["level"] for r in rows))
    report(args, rows, seeds, levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
