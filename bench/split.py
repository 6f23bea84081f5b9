"""Split learning on the demo task: what each activation/gradient codec costs in eval loss,
bytes per step and step time.

    python bench/split.py [--rows fp32,uniform3,amaq3,uniform3-anneal,amaq3.13,...] [--rounds 4]
                          [--model minilm|smollm2] [--clients 3] [--cut 3] [--local-steps N]
                          [--head client|server] [--partition iid|dirichlet]
                          [--seeds N | --seed-list S ...] [--out FILE] [--markdown]
    python bench/split.py --table a.json b.json [--markdown]

Every row is one split run over loopback gRPC of the demo task (MiniLM, 6 blocks, LoRA r=8 on
query/value + head, 3-class tweets, 1000 held-out tweets, FedAvg of both halves), with the same
codec on both directions. The clients' data is split IID by default (``--partition``): with
three Dirichlet(0.5) clients FedAvg itself collapses to the majority class (bench/skew.py), and
a codec's effect on the loss cannot be read off a run that does not learn.
With ``--model smollm2`` the split is a causal LM's: SmolLM2-135M-Instruct (a Llama decoder, 30
blocks) fine-tuned on the same tweets as instructions ("Tweet: ... Is the sentiment of this tweet
negative, neutral or positive?" -> the word; bench/quantized_base.py's data), LoRA on q/v, the
embeddings, the blocks below the cut and the LM head on the device; ``eval_loss`` is the loss on
150 held-out answers and ``eval_accuracy`` the three-way multiple-choice accuracy by
log-likelihood. A decoder's activations are where the AMAQ paper reports its gains. ``amaqB`` anneals the budget from 8 bits per
element to B (scales and bit map included) over the first half of the run's steps;
AMAQ rows use its default allocation (``exact``: the bit regularizer's minimizer at the budget);
``-gates`` rows the paper's trainable gates. ``uniformB-anneal`` is uniform on that schedule, in
whole bits (the control that separates AMAQ's schedule from its mixed widths); ``amaq3.13`` and
``amaq2.13`` are AMAQ at uniform's measured bits per element (codes plus scales), so the two send
the same bytes in the last round.
``amaq4-shared`` is ``amaq4`` with one server-side adapter per round stepped by one client at a
time (``split.server_adapter = "shared"``) instead of a copy per client session: its clients'
steps take turns in the order they arrive, so unlike every other row a seed does not repeat it
bit for bit.
Columns: ``eval_loss`` (final), ``eval_accuracy``, ``bytes_up_per_step`` and
``bytes_down_per_step`` (last round, when AMAQ runs at its target budget; mean over clients, as
the clients' links framed them), ``run_bytes_up_per_step`` / ``run_bytes_down_per_step`` (the
same averaged over all rounds, annealing included), ``mean_bits`` (payload bits per element,
both directions, last round),
``codec_share`` (codec time / step time on the client), ``step_ms`` and its parts
(``client_ms``, ``wire_ms``, ``server_ms``).

With ``--seeds N`` every row runs once per seed (the seed decides the partition, the initial
adapter and every dropout mask; ``bench/seeds.py``): each figure is the mean, with
``<key>_ci95`` and ``<key>_per_seed`` in the JSON, and each row's eval loss is compared with
fp32's, each AMAQ row with the uniform rows of its bits (plain and scheduled) and each scheduled
uniform row with the plain one, paired by seed: a difference whose
95% interval contains zero is printed as "no difference measured".
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

from seeds import add_arguments, format_mean, paired_difference, seeds_of, summarize

def _row(codec: str, bits: float, server_adapter: str = "copies", anneal_uniform: bool = False, allocation: str = "exact") -> tuple:
    return codec, bits, server_adapter, anneal_uniform, allocation


ROWS = {  # name: (codec, bits, server adapter, uniform on AMAQ's schedule, AMAQ's allocation)
    "fp32": _row("fp32", 32), "fp16": _row("fp16", 16), "uniform8": _row("uniform", 8),
    "uniform4": _row("uniform", 4), "uniform3": _row("uniform", 3), "uniform2": _row("uniform", 2),
    "amaq4": _row("amaq", 4), "amaq3": _row("amaq", 3), "amaq2": _row("amaq", 2),
    # AMAQ at uniform's measured bits per element (B-bit codes plus a float32 minimum and step per
    # channel: B + 0.13 on this task), so the two send the same bytes in the last round
    "amaq4.13": _row("amaq", 4.13), "amaq3.13": _row("amaq", 3.13), "amaq2.13": _row("amaq", 2.13),
    # the same with the paper's trainable gates instead of the exact allocation
    "amaq3.13-gates": _row("amaq", 3.13, allocation="gates"), "amaq2.13-gates": _row("amaq", 2.13, allocation="gates"),
    # uniform on AMAQ's schedule (8 bits down to B over the first half, in whole bits): what
    # AMAQ's schedule alone buys, apart from its mixed widths
    "uniform4-anneal": _row("uniform", 4, anneal_uniform=True), "uniform3-anneal": _row("uniform", 3, anneal_uniform=True),
    "uniform2-anneal": _row("uniform", 2, anneal_uniform=True),
    "amaq4-shared": _row("amaq", 4, "shared"),
}


# model -> (task, max_length, batch size, learning rate, local steps) for --model
MODELS = {"minilm": ("seq-cls", 64, 16, 3e-3, 20), "smollm2": ("causal-lm", 128, 8, 1e-3, 20)}  # smollm2: see bench/quantized_base.py


def run(name: str, args, tmp: str, seed: int = 0) -> dict:
    codec, bits, server_adapter, anneal_uniform, allocation = ROWS[name]
    config = RunConfig()
    config.seed = seed
    config.federation.rounds = args.rounds
    config.simulation.clients = args.clients
    config.simulation.eval_examples = 1000
    if args.model != "minilm":  # the demo task is RunConfig's default
        from quantized_base import write_data  # the tweets as instructions, held out as choices

        task, max_length, batch_size, lr, _ = MODELS[args.model]
        train, held = write_data(args.model, Path(tmp), 600, 150)
        config.model.source, config.model.task, config.model.max_length = args.model, task, max_length
        config.simulation.data, config.eval.data = train, held
        config.training.batch_size, config.training.learning_rate = batch_size, lr
    config.training.local_steps = args.local_steps or MODELS[args.model][4]
    config.eval.every = args.rounds  # the table reads the last round's evaluation only
    config.simulation.partition = args.partition
    config.split.mode, config.split.cut, config.split.head = "split", args.cut, args.head
    config.federation.client_correction = "none"  # FedAvg of both halves: the codec alone differs between rows
    config.split.act_codec = config.split.grad_codec = codec
    config.split.act_bits = config.split.grad_bits = bits
    config.split.server_adapter = server_adapter
    config.split.anneal_uniform = anneal_uniform
    config.split.amaq_allocation = allocation
    config.run_dir = str(Path(tmp) / f"{name}-seed{seed}")
    started = time.monotonic()
    result = run_simulation(config.validate())
    rows = result.history
    last = rows[-1]
    mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
    step_ms = last["split_client_ms"] + last["split_wire_ms"] + last["split_server_ms"]
    down_bits = last.get("split_bits_down", last["split_bits_up"])
    return {
        "name": name, "eval_loss": last["eval_loss"], "eval_accuracy": last.get("eval_accuracy", last.get("eval_choice_accuracy")),
        "bytes_up_per_step": last["split_bytes_up_per_step"], "bytes_down_per_step": last["split_bytes_down_per_step"],
        "run_bytes_up_per_step": mean("split_bytes_up_per_step"), "run_bytes_down_per_step": mean("split_bytes_down_per_step"),
        "mean_bits": (last["split_bits_up"] + down_bits) / 2,
        "codec_share": last["split_codec_ms"] / max(step_ms, 1e-9), "step_ms": step_ms,
        "client_ms": last["split_client_ms"], "wire_ms": last["split_wire_ms"], "server_ms": last["split_server_ms"],
        "codec_ms": last["split_codec_ms"], "wall_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default="minilm", choices=sorted(MODELS), help="minilm: the demo task; smollm2: a causal-LM split")
    parser.add_argument("--local-steps", type=int, default=0, help="steps per client per round (default: 20)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--cut", type=int, default=3)
    parser.add_argument("--head", default="client", choices=["client", "server"])
    parser.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print the table of earlier runs' --out files (same seeds and settings) instead of running, compared paired")
    parser.add_argument("--markdown", action="store_true", help="also print the table and the comparisons as markdown")
    add_arguments(parser)
    args = parser.parse_args(argv)
    seeds = seeds_of(args)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.table:
        rows, _ = load_tables(args.table)
        report(rows, markdown=args.markdown)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            runs = []
            for seed in seeds:
                print(f"running {name} (seed {seed}) ...", file=sys.stderr, flush=True)
                runs.append(run(name, args, tmp, seed))
            figures = {k: [r[k] for r in runs] for k, v in runs[0].items() if isinstance(v, (int, float)) and v is not None}
            rows.append({"name": name, **summarize(figures)})
    comparisons = report(rows, markdown=args.markdown)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "comparisons": comparisons, "seeds": seeds, "rounds": args.rounds, "clients": args.clients, "cut": args.cut, "head": args.head, "partition": args.partition,
                                        "local_steps": args.local_steps or MODELS[args.model][4], "model": args.model,
                                        "task": "demo tweets (3 classes)" if args.model == "minilm" else "tweets as instructions (causal LM)"}, indent=2) + "\n")
    return 0


def load_tables(paths: list[Path]) -> tuple[list[dict], list[int]]:
    """The rows of earlier ``--out`` files, as one table; they must share their seeds (and
    so can be compared paired) and their settings."""
    rows, seeds, settings = [], None, None
    for path in paths:
        try:
            data = json.loads(path.read_text())
            found = data["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}: not a bench/split.py --out file ({exc})") from None
        these = {k: data.get(k) for k in ("rounds", "clients", "cut", "head", "partition", "model", "local_steps")}
        if seeds is not None and (data.get("seeds") != seeds or these != settings):
            raise SystemExit(f"{path}: other seeds or settings than {paths[0]} ({data.get('seeds')} {these} against {seeds} {settings})")
        seeds, settings = data.get("seeds"), these
        rows += [r for r in found if r["name"] not in {x["name"] for x in rows}]
    return rows, seeds or []


def uniform_partners(name: str) -> list[str]:
    """The rows a row is compared with besides fp32: an AMAQ row with uniform at its whole bits
    (plain and on AMAQ's schedule) and a gates row also with the exact allocation at its budget;
    a scheduled uniform row with the plain one."""
    codec, bits, _, anneal_uniform, allocation = ROWS.get(name, _row("", 0))
    if codec == "amaq":
        exact = [name.removesuffix("-gates")] if allocation == "gates" else []  # the gates against the exact allocation
        return [f"uniform{int(bits)}", f"uniform{int(bits)}-anneal", *exact]
    if codec == "uniform" and anneal_uniform:
        return [f"uniform{int(bits)}"]
    return []


def report(rows: list[dict], markdown: bool = False) -> list[dict]:
    """Print the table (and, with ``markdown``, a RESULTS.md table) and the paired comparisons:
    each row against fp32, each AMAQ row against uniform at its bits (``uniform_partners``). ``run bits``: payload bits
    per element over the whole run (annealing included), from the bytes against fp32's."""
    base = next((r for r in rows if r["name"] == "fp32"), None)

    def ratio(r: dict, prefix: str = "") -> float | None:
        if base is None:
            return None
        return (base[f"{prefix}bytes_up_per_step"] + base[f"{prefix}bytes_down_per_step"]) / (r[f"{prefix}bytes_up_per_step"] + r[f"{prefix}bytes_down_per_step"])

    def text(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    print(f"{'row':<13}{'eval loss':>20}{'vs fp32':>9}{'acc':>15}{'up B/step':>11}{'down B/step':>12}{'x fewer':>8}{'run x':>6}{'bits':>6}{'run bits':>9}{'codec':>7}{'step ms':>9}{'client':>8}{'wire':>7}{'server':>8}{'wall s':>8}")
    lines = []
    for r in rows:
        rel = f"{100 * (r['eval_loss'] / base['eval_loss'] - 1):+.2f}%" if base else "-"
        run_x = ratio(r, "run_")
        run_bits = 32 / run_x if run_x else None
        acc = format_mean(r["eval_accuracy"], r.get("eval_accuracy_ci95"), ".3f")
        print(f"{r['name']:<13}{format_mean(r['eval_loss'], r.get('eval_loss_ci95')):>20}{rel:>9}{acc:>15}{r['bytes_up_per_step']:>11.0f}{r['bytes_down_per_step']:>12.0f}"
              f"{text(ratio(r), '.1f'):>8}{text(run_x, '.1f'):>6}{r['mean_bits']:>6.2f}{text(run_bits, '.2f'):>9}{100 * r['codec_share']:>6.1f}%{r['step_ms']:>9.1f}{r['client_ms']:>8.1f}{r['wire_ms']:>7.1f}{r['server_ms']:>8.1f}{r['wall_seconds']:>8.1f}")
        lines.append(f"| {r['name']} | {format_mean(r['eval_loss'], r.get('eval_loss_ci95'))} | {rel} | {acc} | {text(ratio(r), '.1f')} | {text(run_x, '.1f')} | "
                     f"{r['mean_bits']:.2f} | {text(run_bits, '.2f')} | {100 * r['codec_share']:.1f}% | {r['step_ms']:.0f} |")
    comparisons = []
    for r in rows:  # paired by seed: each row against fp32, each AMAQ row against uniform at its bits
        others = ["fp32"] if r["name"] != "fp32" else []
        others += [o for o in uniform_partners(r["name"]) if o in {x["name"] for x in rows}]
        for other in others:
            o = next((x for x in rows if x["name"] == other), None)
            if o is not None:
                d = paired_difference(r["eval_loss_per_seed"], o["eval_loss_per_seed"])
                comparisons.append({"row": r["name"], "against": other, "eval_loss_difference": d.mean,
                                    "eval_loss_difference_ci95": None if math.isnan(d.ci95) else d.ci95,
                                    "measured": d.measured, "verdict": d.verdict(r["name"], other)})
                print(comparisons[-1]["verdict"])
    if markdown:
        print()
        print("| row | eval loss | vs fp32 | acc | x fewer | run x | bits | run bits | codec | step ms |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))
        print()
        print("| comparison (eval loss, paired by seed) | difference | 95% interval | verdict |")
        print("|---|---|---|---|")
        for c in comparisons:
            half = c["eval_loss_difference_ci95"]
            verdict = c["verdict"].split(": ", 1)[1]
            print(f"| {c['row']} - {c['against']} | {c['eval_loss_difference']:+.4f} | {'-' if half is None else f'± {half:.4f}'} | {verdict} |")
    return comparisons


if __name__ == "__main__":
    sys.exit(main())
