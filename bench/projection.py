"""Communication-efficient updates on the demo task: every update codec and seed method, side
by side in one run.

    python bench/projection.py [--clients 3] [--rounds 4] [--rows fp32,int8,...] [--seeds N | --seed-list S ...] [--out FILE]

The demo task (MiniLM + LoRA r=8 on query/value + head, 3-class tweets, held-out tweets) with
fedtune's defaults except the method: each row is one federated run over loopback gRPC.

Rows: ``fp32`` (no codec), ``int8``, ``int4``, ``compeft-<density>`` (top-k signs),
``randsign-<density>`` (signs at seeded random positions), ``ferret-<K>`` (first-order
local training, updates projected on K seeded directions per tensor, ``--codec projection``),
``fedkseed-<K>`` (zeroth-order steps on a pool of K seeds, ``--strategy fedkseed``). Columns:
the final ``eval_loss`` and ``eval_accuracy``, the wire bytes each client sent and received per
round (``bytes_up_per_client_round``, ``bytes_down_per_client_round``: every byte of the
messages, headers included, as the coordinator counted them), ``upload_ratio`` (fp32's upload
over the row's), ``eval_loss_vs_fp32`` (relative difference of the final eval loss),
``mean_gap_vs_fp32`` (that difference averaged over every round), ``local_seconds`` (a client's
training time per round) and ``encode_seconds``. ``--table a.json b.json [--out FILE]`` merges
earlier runs' ``--out`` files into one table (run other rows on another core, with the same
seeds and settings, and only one of them with ``fp32``), compared paired with its fp32 row.

With ``--seeds N`` every row runs once per seed (``bench/seeds.py``): each figure is the mean,
with ``<key>_ci95`` and ``<key>_per_seed`` in the JSON, and each row's final eval loss is
compared with fp32's paired by seed; a difference whose 95% interval contains zero is printed as
"no difference measured".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedtune.config import RunConfig
from fedtune.simulation.runner import run_simulation

from seeds import add_arguments, compare as compare_paired, format_mean, measure, merge_documents, seeds_of

SETTINGS = ("clients", "rounds", "strategy", "eval_examples", "fedkseed")  # what the documents of one --table must share
DEFAULT_ROWS = "fp32,int8,int4,compeft-0.1,compeft-0.01,ferret-64,ferret-256,ferret-1024,fedkseed-256,fedkseed-4096"
# Zeroth-order settings (fedtune's fedkseed defaults except these): steps per round, step size.
FEDKSEED = {"steps": 200, "lr": 1e-3, "eps": 1e-3}


def configure(row: str, config: RunConfig) -> None:
    """Set ``config`` up for the method a row name describes."""
    kind, _, value = row.partition("-")
    if kind == "fp32":
        return
    if kind in ("int8", "int4", "fp16", "bf16"):
        config.compression.uplink = kind
    elif kind in ("compeft", "randsign"):
        config.compression.uplink, config.compression.uplink_options = kind, {"density": float(value)}
    elif kind == "ferret":
        # One block per tensor (the largest adapter tensor has 3072 elements), as Ferret blocks
        # by parameter.
        config.compression.uplink, config.compression.uplink_options = "projection", {"k": int(value), "block": 4096}
    elif kind == "fedkseed":
        config.federation.strategy, config.federation.options = "fedkseed", {**FEDKSEED, "pool": int(value)}
    else:
        raise SystemExit(f"unknown row {row!r}")


def run_row(row: str, args, tmp: str, seed: int = 0) -> dict:
    config = RunConfig()
    config.seed = seed
    config.federation.rounds = args.rounds
    config.simulation.clients = args.clients
    config.simulation.eval_examples = args.eval_examples
    if args.strategy:
        config.federation.strategy = args.strategy
    config.run_dir = str(Path(tmp) / f"{row}-seed{seed}")
    configure(row, config)
    started = time.monotonic()
    result = run_simulation(config.validate())
    if result.client_errors:
        raise SystemExit(f"{row}: clients failed: {result.client_errors}")
    rows = result.history
    last = rows[-1]
    return {
        "name": row,
        "eval_loss": last["eval_loss"],
        "eval_accuracy": last.get("eval_accuracy"),
        "eval_loss_by_round": [r["eval_loss"] for r in rows],
        "bytes_up_per_client_round": sum(r["bytes_up_per_client"] for r in rows) / len(rows),
        "bytes_down_per_client_round": sum(r["bytes_down_per_client"] for r in rows) / len(rows),
        "local_seconds": sum(r.get("local_seconds", 0.0) for r in rows) / len(rows),
        "encode_seconds": sum(r.get("encode_seconds", 0.0) for r in rows) / len(rows),
        "codec_error": last.get("codec_error"),
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def compare(rows: list[dict]) -> None:
    """Add the columns measured against the run's ``fp32`` row, when it has one:
    ``upload_ratio``, ``eval_loss_vs_fp32`` (final round) and ``mean_gap_vs_fp32`` (the relative
    gap averaged over every round: one round's eval loss moves by several percent from round to
    round, so a single final figure can flatter or wrong a codec)."""
    base = next((r for r in rows if r["name"] == "fp32"), None)
    if base is None:
        return
    for r in rows:
        r["upload_ratio"] = round(base["bytes_up_per_client_round"] / r["bytes_up_per_client_round"], 1)
        r["eval_loss_vs_fp32"] = round(r["eval_loss"] / base["eval_loss"] - 1, 4)
        gaps = [a / b - 1 for a, b in zip(r["eval_loss_by_round"], base["eval_loss_by_round"])]
        r["mean_gap_vs_fp32"] = round(sum(gaps) / len(gaps), 4)


def print_table(rows: list[dict]) -> None:
    print(f"{'row':<16}{'eval loss':>20}{'acc':>7}{'vs fp32':>9}{'mean gap':>10}{'up B/round':>12}{'down B/round':>14}{'up ratio':>10}{'local s':>9}{'encode s':>10}")
    for r in rows:
        vs = f"{100 * r['eval_loss_vs_fp32']:+.2f}%" if "eval_loss_vs_fp32" in r else "-"
        gap = f"{100 * r['mean_gap_vs_fp32']:+.2f}%" if "mean_gap_vs_fp32" in r else "-"
        ratio = f"{r['upload_ratio']:.1f}x" if "upload_ratio" in r else "-"
        print(f"{r['name']:<16}{format_mean(r['eval_loss'], r.get('eval_loss_ci95')):>20}{r['eval_accuracy'] or 0:>7.3f}{vs:>9}{gap:>10}{r['bytes_up_per_client_round']:>12.0f}{r['bytes_down_per_client_round']:>14.0f}{ratio:>10}{r['local_seconds']:>9.2f}{r['encode_seconds']:>10.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--strategy", default="", help="strategy of the first-order rows (default: the demo's)")
    parser.add_argument("--eval-examples", type=int, default=1000)
    add_arguments(parser)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="merge earlier runs' --out files (other rows, the same seeds) into one table instead of running")
    args = parser.parse_args(argv)
    if args.table:
        return merge_tables(args)
    seeds = seeds_of(args)

    def one(name: str, seed: int) -> dict:
        r = run_row(name, args, tmp, seed)
        print(f"  {name} seed {seed}: eval loss {r['eval_loss']:.4f}, up {r['bytes_up_per_client_round']:.0f} B/client/round", file=sys.stderr, flush=True)
        return r

    with tempfile.TemporaryDirectory() as tmp:
        rows = measure([n for n in args.rows.split(",") if n], seeds, one)
    settings = {"clients": args.clients, "rounds": args.rounds, "strategy": args.strategy or "demo default", "eval_examples": args.eval_examples, "fedkseed": FEDKSEED}
    report(rows, seeds, settings, args.out)
    return 0


def report(rows: list[dict], seeds: list[int], settings: dict, out: Path | None) -> None:
    """The table, each row's eval loss against fp32's paired by seed, and the ``--out`` document."""
    compare(rows)
    print_table(rows)
    comparisons = compare_paired(rows, [(r["name"], "fp32") for r in rows if r["name"] != "fp32"])
    for c in comparisons:
        print(c["verdict"])
    if out:
        out.write_text(json.dumps({"rows": rows, "comparisons": comparisons, "seeds": seeds, **settings}, indent=2) + "\n")


def merge_tables(args) -> int:
    """``--table``: the rows of several ``--out`` documents with the same seeds and settings as one
    table. A row may come from one document only: its per-round losses (the mean gap) are means
    over that document's seeds and could not be joined with another's."""
    try:
        documents = [json.loads(path.read_text()) for path in args.table]
        names = [r["name"] for doc in documents for r in doc["rows"]]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rows {twice} are in more than one document: split runs by rows, not by seeds")
        rows, seeds = merge_documents(documents, SETTINGS)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--table: {exc}") from None
    report(rows, seeds, {key: documents[0].get(key) for key in SETTINGS}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
