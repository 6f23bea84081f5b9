"""What holding the frozen base in 8 or 4 bits saves a device, and what it costs the model.

    python bench/quantized_base.py [--models minilm,smollm2] [--precisions fp32,int8,4bit,gguf]
                                   [--rounds 4] [--clients 3] [--local-steps 20] [--seeds 5] [--out FILE]
    python bench/quantized_base.py --table a.json b.json [--out FILE]

One row per ``<model>-<precision>``, each in a child process of its own (so its peak memory is
its own), through fedtune's own code paths (``fedtune.quantized_base`` via ``--base-precision``).
``gguf`` (the file's own blocks) applies to models shipped as GGUF files only (SmolLM2 here):

- ``minilm``: the demo task (the embedded MiniLM encoder, 3-class tweet sentiment);
- ``smollm2``: the embedded SmolLM2-135M-Instruct (a Llama decoder, shipped as a Q4_1 GGUF file)
  fine-tuned as a causal LM on the same tweets as instructions ("Tweet: ... Sentiment:" ->
  "negative" / "neutral" / "positive"), its held-out records multiple-choice questions over the
  three answers, scored by log-likelihood.

Columns:

- ``base_mib``: the bytes the frozen base weights occupy as held (``held_bytes``: quantized
  codes, their scales and the layers left in fp32; a tied table counted once);
- ``peak_mib``: the peak resident memory of a client process while it trains the adapter for a
  few steps on the loaded base (Python, torch and the tokenizer included, which every row
  shares); ``load_peak_mib``: its peak while loading the base, which holds the fp32 weights
  for a moment before they are quantized (a GGUF file arrives dequantized from transformers'
  loader);
- ``step_ms``: that client's median AdamW step (fedtune's calibration routine);
- ``eval_loss`` (and ``eval_accuracy``: class accuracy for MiniLM, multiple-choice accuracy for
  SmolLM2) after a federated run of ``--rounds`` rounds of ``--clients`` clients (FedAvg, the
  same seed, data split and schedule for every precision of a model), evaluated centrally with
  the coordinator's base held at the same precision as the clients'.

With ``--seeds N`` every row runs once per seed (``RunConfig.seed``: the partition, the adapter's
initialization and the dropout masks; the data drawn from the corpus stays the same) and reports
means with 95% intervals (``bench/seeds.py``). ``base_ratio`` and ``loss_vs_fp32`` compare each
row with its model's fp32 row; ``eval_loss_vs_fp32`` is the paired difference seed by seed,
printed as "no difference measured" when its interval contains zero.
Goal: the 4-bit base at most 1/4 of the fp32 base's bytes, its eval loss within 1% of fp32's.

``--table`` merges earlier runs' ``--out`` files (other rows of the same settings and seeds, run
on two cores at once, say) into one table, compared as if run together.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seeds import add_arguments, combine, format_mean, merge_documents, paired_difference, seeds_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    # model -> (task, max_length, batch size, learning rate, eval examples)
    "minilm": ("seq-cls", 64, 16, 3e-3, 400),   # fedtune's defaults for the demo task
    # 128 tokens: the chat template's system prompt and markers take about 45 of them (at 64, seven
    # tweets in eight no longer fit with their answer)
    "smollm2": ("causal-lm", 128, 8, 1e-3, 150),
}
# The settings of an --out document that runs merged by --table must share.
SETTINGS = ("rounds", "clients", "local_steps", "train_examples", "rank")
GGUF_MODELS = {"smollm2"}  # shipped as a .gguf file: the gguf precision applies
PRECISIONS = ("fp32", "int8", "4bit", "gguf")
ANSWERS = ["negative", "neutral", "positive"]


def _tweets(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (text, sentiment) pairs drawn from the embedded tweet corpus, balanced over the three
    classes, the same for a given seed."""
    from fedtune.data import embedded_tweets

    by_label: dict[str, list[str]] = {}
    for e in embedded_tweets():
        by_label.setdefault(str(e.label), []).append(e.text)
    rng = random.Random(seed)
    out = []
    for label in ANSWERS:
        out += [(t, label) for t in rng.sample(by_label[label], n // 3)]
    rng.shuffle(out)
    return out


def _prompt(text: str) -> str:
    return f"Tweet: {text.strip()}\nIs the sentiment of this tweet negative, neutral or positive?"


def write_data(model: str, folder: Path, train_n: int, eval_n: int) -> tuple[str, str]:
    """The training and held-out files of ``model``'s task, as JSONL."""
    task = MODELS[model][0]
    pairs = _tweets(train_n + eval_n, seed=7)
    train, held = pairs[:train_n], pairs[train_n:]
    if task == "seq-cls":
        train_rows = [{"text": t, "label": y} for t, y in train]
        eval_rows = [{"text": t, "label": y} for t, y in held]
    else:
        train_rows = [{"prompt": _prompt(t), "response": y} for t, y in train]
        eval_rows = [{"prompt": _prompt(t), "choices": ANSWERS, "answer": ANSWERS.index(y)} for t, y in held]
    paths = []
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths[0], paths[1]


def _client_measure(model: str, precision: str, data: str) -> dict:
    """Load the base at ``precision`` as a client does, train the adapter a few steps: the held
    bytes of the base, the median step and the process's peak memory so far."""
    from fedtune.adapters import AdapterPlan, inject_lora
    from fedtune.allocator import release_free_memory
    from fedtune.client.calibrate import fixed_length, median_step_seconds
    from fedtune.data import load_examples, resolve_labels
    from fedtune.models import ModelStore, resolve_source
    from fedtune.quantized_base import held_bytes
    from fedtune.tasks import get_task

    task_name, max_length, batch_size, _, _ = MODELS[model]
    store, source, task = ModelStore(), resolve_source(model, precision), get_task(task_name)
    examples = load_examples(data, task=task_name)[:64]
    labels = resolve_labels(examples) if task_name == "seq-cls" else []
    items = fixed_length(store.encode(source, task, examples, max_length, labels), max_length, store.pad_id(source))
    base = store.base(source, task_name, labels)
    base_mib = held_bytes(base) / 2**20
    release_free_memory()
    load_peak = _peak_mib()
    _reset_peak()
    adapted = inject_lora(store.instance(source, task_name, labels), AdapterPlan(rank=8, alpha=16.0), task_name, seed=0)
    seconds = median_step_seconds(adapted, task, items, store.pad_id(source), batch_size=batch_size, steps=5, warmup=1)
    return {"base_mib": round(base_mib, 2), "step_ms": round(1000 * seconds, 1), "peak_mib": round(_peak_mib(), 1), "load_peak_mib": round(load_peak, 1)}


def _peak_mib() -> float:
    """This process's peak resident memory (Linux: VmHWM, which ``_reset_peak`` can reset; else
    the high-water mark since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start the peak over from the current resident memory (Linux 4.0+: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _federated(model: str, precision: str, train: str, held: str, args, run_dir: Path) -> dict:
    """A FedAvg run with the base held at ``precision``: the last round's central evaluation."""
    from fedtune.config import RunConfig
    from fedtune.simulation.runner import run_simulation

    task, max_length, batch_size, lr, _ = MODELS[model]
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = model, task, max_length
    config.model.base_precision = precision
    config.federation.rounds, config.federation.aggregation = args.rounds, "fedavg"
    config.federation.client_correction = "none"  # the plain objective: what differs is the base
    config.simulation.clients, config.simulation.partition, config.simulation.data = args.clients, "iid", train
    config.eval.data = held
    config.eval.every = args.rounds  # the table reads the last round's evaluation only
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = args.local_steps, batch_size, lr
    config.run_dir, config.seed = str(run_dir), args.seed
    result = run_simulation(config)
    if result.client_errors or not result.history:
        raise RuntimeError(f"the federated run failed: {(result.client_errors or ['no round completed'])[0]}")
    last = result.history[-1]
    accuracy = last.get("eval_accuracy", last.get("eval_choice_accuracy"))
    return {"eval_loss": round(float(last["eval_loss"]), 5), "eval_accuracy": None if accuracy is None else round(float(accuracy), 4)}


def run_row(model: str, precision: str, args, tmp: Path) -> dict:
    import logging

    import torch

    logging.getLogger("fedtune").setLevel(logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train, held = write_data(model, tmp, args.train_examples, MODELS[model][4])
    row = {"name": f"{model}-{precision}", **_client_measure(model, precision, train)}
    started = time.monotonic()
    row.update(_federated(model, precision, train, held, args, tmp / "run"))
    row["run_seconds"] = round(time.monotonic() - started, 1)
    return row


def _row_in_child(model: str, precision: str, args, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"fedtune-qbase-{model}-{precision}-") as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--worker", f"{model}:{precision}", "--worker-out", str(out),
                   "--rounds", str(args.rounds), "--clients", str(args.clients), "--local-steps", str(args.local_steps),
                   "--train-examples", str(args.train_examples), "--seed", str(seed)]
        try:
            proc = subprocess.run(command, timeout=args.timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"name": f"{model}-{precision}", "error": f"ran past {args.timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return {"name": f"{model}-{precision}", "error": tail[:300]}
        return json.loads(out.read_text())


def compare(rows: list[dict]) -> None:
    """Each row against its model's fp32 row: base bytes ratio, relative eval loss and the paired
    difference of eval loss over the seeds (``eval_loss_vs_fp32``, with its interval and verdict)."""
    fp32 = {r["name"].rsplit("-", 1)[0]: r for r in rows if r["name"].endswith("-fp32") and "error" not in r}
    for r in rows:
        ref = fp32.get(r["name"].rsplit("-", 1)[0])
        if ref is None or "error" in r:
            continue
        r["base_ratio"] = round(r["base_mib"] / ref["base_mib"], 4)
        r["loss_vs_fp32_pct"] = round(100 * (r["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"], 2)
        if r is not ref:
            d = paired_difference(r["eval_loss_per_seed"], ref["eval_loss_per_seed"])
            r["eval_loss_vs_fp32"] = d.mean
            r["eval_loss_vs_fp32_ci95"] = None if d.ci95 != d.ci95 else d.ci95
            r["verdict"] = d.verdict(r["name"], ref["name"])


def table(rows: list[dict]) -> str:
    head = ["row", "base_mib", "base_ratio", "peak_mib", "load_peak_mib", "step_ms", "eval_loss", "loss_vs_fp32", "eval_accuracy"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["name"], f"failed: {r['error']}"])
            continue
        acc = "-" if r.get("eval_accuracy") is None else format_mean(r["eval_accuracy"], r.get("eval_accuracy_ci95"), ".3f")
        lines.append([r["name"], f"{r['base_mib']:.1f}", f"{r.get('base_ratio', 1.0):.3f}", f"{r['peak_mib']:.0f}", f"{r['load_peak_mib']:.0f}", f"{r['step_ms']:.0f}",
                      format_mean(r["eval_loss"], r.get("eval_loss_ci95")), f"{r.get('loss_vs_fp32_pct', 0.0):+.2f}%", acc])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if len(l) == len(head))) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) if len(l) == len(head) else "  ".join(l) for l in lines]
    out += [r["verdict"] for r in rows if "verdict" in r]
    return "\n".join(out)


def _measure(model: str, precision: str, args, seeds: list[int]) -> dict:
    """One row: the run of every seed in a child process, combined (means, intervals, per seed);
    the first failure ends the row."""
    runs = []
    for seed in seeds:
        run = _row_in_child(model, precision, args, seed)
        print(f"{model}-{precision} seed {seed}: {json.dumps({k: v for k, v in run.items() if k != 'name'})}", file=sys.stderr, flush=True)
        if "error" in run:
            return {"name": f"{model}-{precision}", "error": f"seed {seed}: {run['error']}"}
        runs.append(run)
    return combine(f"{model}-{precision}", runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated: {', '.join(PRECISIONS)}")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--train-examples", type=int, default=600, help="training examples shared among the clients")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a worker's seed
    add_arguments(parser)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one row may take")
    parser.add_argument("--out", default="", help="write the rows and settings as JSON here")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print the table of earlier runs' --out files (other rows, same settings and seeds) instead of running")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model, precision = args.worker.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            row = run_row(model, precision, args, Path(tmp))
        Path(args.worker_out).write_text(json.dumps(row))
        return 0
    if args.table:
        return merged_table(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [m for m in models if m not in MODELS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown model or precision: {', '.join(unknown)}")
    seeds = seeds_of(args)
    rows, started = [], time.monotonic()
    for model in models:
        for precision in precisions:
            if precision == "gguf" and model not in GGUF_MODELS:
                print(f"{model}-gguf: skipped, {model} is not shipped as a GGUF file", file=sys.stderr, flush=True)
                continue
            rows.append(_measure(model, precision, args, seeds))
    compare(rows)
    print(table(rows))
    if args.out:
        settings = {"rounds": args.rounds, "clients": args.clients, "local_steps": args.local_steps, "train_examples": args.train_examples,
                    "seeds": seeds, "rank": 8, "seconds": round(time.monotonic() - started, 1),
                    "models": {m: dict(zip(("task", "max_length", "batch_size", "learning_rate", "eval_examples"), MODELS[m])) for m in models}}
        Path(args.out).write_text(json.dumps({"rows": rows, **settings}, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


def merged_table(args) -> int:
    """``--table``: earlier runs' ``--out`` files merged into one table (``merge_documents``),
    each row compared with its model's fp32 row, written with ``--out``."""
    try:
        documents = [json.loads(path.read_text()) for path in args.table]
        rows, seeds = merge_documents(documents, SETTINGS)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--table: {exc}") from None
    order = {f"{m}-{p}": i for i, (m, p) in enumerate((m, p) for m in MODELS for p in PRECISIONS)}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    compare(rows)
    print(table(rows))
    if args.out:
        settings = {k: documents[0][k] for k in SETTINGS}
        models = {k: v for doc in documents for k, v in doc.get("models", {}).items()}
        merged = {"rows": rows, **settings, "seeds": seeds, "models": models, "merged_from": [str(p) for p in args.table]}
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
