"""What choosing each channel's width can gain over one width for all, at a real split cut, and
what AMAQ's gates choose.

    python bench/amaq_allocation.py [--models minilm,smollm2] [--bits 3,4] [--batches 40]
                                    [--settle 100] [--cut N] [--warmup N] [--out FILE]

AMAQ gives each channel of the hidden states at the cut its own width, from gates trained on the
task's gradient and a bit regularizer (``fedtune.compression.amaq``). Mixed widths can only beat
one width for all (uniform quantization, which also keeps a minimum and step per channel) when
the channels' costs differ: channel ``c`` quantized at ``w`` bits adds about
``I_c * span_c**2 / (2**w - 1)**2 / 12`` to the loss (``I_c``: the mean squared loss gradient
reaching it, ``span_c``: its range). This script measures, on the model's own activations and
gradients at the cut, how much any allocation can gain, and how much the gates do gain.

For each of ``--batches`` held-out batches (the real tokens only, N x C, as they cross the wire)
and each budget ``b`` of code bits per element, three allocations of the same mean width:

- ``uniform``: every channel at ``b`` bits;
- ``best``: the integer widths in [``--b-min``, 8] that minimize the cost above, with ``I`` the
  running mean of earlier batches' squared gradients (what a sender can know before sending):
  ``fedtune.compression.amaq.water_fill``, AMAQ's default ``"exact"`` allocation. No allocation
  of that mean does better on this cost;
- ``gates``: the paper's gates (``MixedBitQuantizer(allocation="gates")``), stepped on every
  batch from the task loss through the quantized activations and the bit regularizer, as in
  training; its budget is ``b`` plus its frame overhead, so its codes average ``b`` bits. The
  first ``--settle`` batches let the gates settle and are not scored.

Figures per row (mean ± 95% interval over batches; each allocation compared with uniform at the
same bits, paired by batch):

- ``weighted_error``: ``sum_c I_c |x_hat_c - x_c|^2 / sum_c I_c |x_c - mean_c|^2`` with this
  batch's own ``I``: the second-order loss cost of the quantization, relative to the signal;
- ``loss_increase``: the task loss with the quantized activations minus without (the frozen
  model; noisy, since the first-order term has either sign);
- ``grad_error``: ``|g_hat - g|^2 / |g|^2`` for the gradient sent back down, quantized at the
  same bits (``best`` with ``I = 1``: the gradient's own error is what matters there;
  ``gates``: a gradient-direction quantizer, regularizer only, as the coordinator runs one);
- ``code_bits``: the mean width.

``cost_spread`` in the settings: quantiles of ``I_c * span_c**2`` over its mean (the last
batch). When it is flat, no allocation can do much better than uniform.

Models: ``minilm`` (the demo task: MiniLM, 3-class tweets, its new head first trained for
``--warmup`` steps with the whole model so the gradient at the cut is a trained model's) and
``smollm2`` (SmolLM2-135M, a Llama decoder, as a causal LM on the tweets' text, no warmup).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fedtune.compression.amaq import BitBudget, MixedBitQuantizer, dequantize_channels, overhead_bits, quantize_channels, water_fill  # noqa: E402
from fedtune.data import TWEETS_LABELS, embedded_tweets  # noqa: E402
from fedtune.models import load_base_model, load_tokenizer, resolve_source  # noqa: E402
from fedtune.split.segments import bottom_forward, top_forward  # noqa: E402

from seeds import ci95, format_mean, paired_difference  # noqa: E402

MODELS = {  # model -> (task, cut, warmup steps, batch size, max length)
    "minilm": ("seq-cls", 3, 60, 16, 64),
    "smollm2": ("causal-lm", 15, 0, 8, 64),
}
ALLOCATIONS = ("uniform", "best", "gates")
FIGURES = ("weighted_error", "loss_increase", "grad_error", "code_bits")


def quantize(x: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``x`` (N x C) as the receiver decodes it at ``widths`` per channel."""
    return dequantize_channels(*quantize_channels(x, widths))


def batches(model_name: str, tokenizer, task: str, batch_size: int, max_length: int, seed: int):
    """Endless batches of tweets (labels: the sentiment for seq-cls, the text for causal LM)."""
    examples = embedded_tweets()
    random.Random(seed).shuffle(examples)
    label = {name: i for i, name in enumerate(TWEETS_LABELS)}
    for start in range(0, len(examples) - batch_size, batch_size):
        chunk = examples[start : start + batch_size]
        enc = tokenizer([e.text for e in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        if task == "seq-cls":
            enc["labels"] = torch.tensor([label[e.label] for e in chunk])
        else:
            enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield dict(enc)


def warm_up(model, stream, steps: int) -> None:
    """Train the whole model briefly (a new classification head is random; its gradients at
    the cut would say little about a trained model's)."""
    if steps <= 0:
        return
    model.train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    for step in range(steps):
        model(**next(stream)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 20 == 0:
            print(f"  warm-up step {step + 1}/{steps}", file=sys.stderr, flush=True)
    for p in params:
        p.requires_grad_(False)
    model.eval()


def measure(model_name: str, args) -> tuple[list[dict], dict]:
    task, cut, warmup, batch_size, max_length = MODELS[model_name]
    cut = args.cut or cut
    warmup = warmup if args.warmup is None else args.warmup
    source = resolve_source(model_name)
    tokenizer = load_tokenizer(source)
    model = load_base_model(source, task, TWEETS_LABELS if task == "seq-cls" else (), seed=args.seed)
    pad = model.config.pad_token_id or 0
    stream = batches(model_name, tokenizer, task, batch_size, max_length, args.seed)
    torch.manual_seed(args.seed)
    warm_up(model, stream, warmup)
    bits = [int(b) for b in args.bits.split(",")]
    values = {(a, b): {k: [] for k in FIGURES} for a in ALLOCATIONS for b in bits}
    act_gates: dict[int, MixedBitQuantizer] = {}
    grad_gates: dict[int, MixedBitQuantizer] = {}
    importance = None
    cost = None
    for number in range(args.settle + args.batches):
        batch = next(stream)
        mask = batch["attention_mask"]
        real = mask.bool()
        hidden = bottom_forward(model, batch, cut).detach()
        with torch.enable_grad():
            at_cut = hidden.clone().requires_grad_(True)
            loss = top_forward(model, at_cut, mask, batch["labels"], cut, pad).loss
            (g_full,) = torch.autograd.grad(loss, at_cut)
        x, g = hidden[real].float(), g_full[real].float()
        n, channels = x.shape
        g2 = g.pow(2).mean(0)
        g2 = g2 / g2.mean().clamp_min(1e-30)
        known = importance if importance is not None else torch.ones(channels)
        span, grad_span = x.max(0).values - x.min(0).values, g.max(0).values - g.min(0).values
        cost = known * span.pow(2)
        centred = (x - x.mean(0)).pow(2).sum(0)
        signal = (g2 * centred).sum().clamp_min(1e-30)

        def loss_with(x_hat: torch.Tensor) -> float:
            replaced = hidden.clone()
            replaced[real] = x_hat.to(hidden.dtype)
            with torch.no_grad():
                return top_forward(model, replaced, mask, batch["labels"], cut, pad).loss.item() - loss.item()

        for b in bits:
            b_min = args.b_min
            for gates in (act_gates, grad_gates):
                if b not in gates:
                    gates[b] = MixedBitQuantizer(channels, BitBudget(8, 8, 0), b_min=b_min, allocation="gates")
            quantizers = (act_gates[b], grad_gates[b])
            for q in quantizers:  # codes averaging b bits: the budget is b plus the frame's overhead
                q.budget = BitBudget(b + overhead_bits(n), b + overhead_bits(n), 0)
            # the gates' activation widths, stepped from the task loss as in training
            with torch.enable_grad():
                x_hat, _, act_widths = quantizers[0].quantize(x, number)
                replaced = hidden.clone()
                replaced[real] = x_hat
                top_forward(model, replaced, mask, batch["labels"], cut, pad).loss.backward()
            quantizers[0].learn(x, g)
            _, _, grad_widths = quantizers[1].quantize(g, number)
            quantizers[1].learn(g, None)
            if number < args.settle:
                continue
            widths = {
                "uniform": (torch.full((channels,), b), torch.full((channels,), b)),
                "best": (water_fill(cost, b, b_min), water_fill(grad_span.pow(2), b, b_min)),
                "gates": (act_widths, grad_widths),
            }
            for allocation, (aw, gw) in widths.items():
                x_q, g_q = quantize(x, aw), quantize(g, gw)
                row = values[(allocation, b)]
                row["weighted_error"].append(float((g2 * (x_q - x).pow(2).sum(0)).sum() / signal))
                row["loss_increase"].append(loss_with(x_q))
                row["grad_error"].append(float((g_q - g).pow(2).sum() / g.pow(2).sum().clamp_min(1e-30)))
                row["code_bits"].append(float(aw.float().mean()))
        importance = g2 if importance is None else 0.9 * importance + 0.1 * g2
        if (number + 1) % 10 == 0:
            print(f"  {model_name}: batch {number + 1}/{args.settle + args.batches}", file=sys.stderr, flush=True)
    rows = []
    for (allocation, b), figures in values.items():
        row = {"name": f"{model_name}-{allocation}{b}", "model": model_name, "allocation": allocation, "bits": b}
        for key, per_batch in figures.items():
            mean, half = ci95(per_batch)
            row[key], row[f"{key}_ci95"], row[f"{key}_per_batch"] = mean, half, per_batch
        rows.append(row)
    relative = (cost / cost.mean()).double()
    quantiles = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    settings = {"task": task, "cut": cut, "warmup_steps": warmup, "batch_size": batch_size, "max_length": max_length,
                "channels": channels, "cost_spread": dict(zip([f"q{int(100 * q)}" for q in quantiles],
                                                              [round(float(v), 3) for v in torch.quantile(relative, torch.tensor(quantiles, dtype=torch.float64))]))}
    return rows, settings


def comparisons(rows: list[dict]) -> list[dict]:
    """Each mixed allocation against uniform at the same model and bits, paired by batch."""
    out = []
    for row in rows:
        if row["allocation"] == "uniform":
            continue
        base = next(r for r in rows if r["model"] == row["model"] and r["bits"] == row["bits"] and r["allocation"] == "uniform")
        for key in ("weighted_error", "loss_increase", "grad_error"):
            d = paired_difference(row[f"{key}_per_batch"], base[f"{key}_per_batch"])
            out.append({"row": row["name"], "against": base["name"], "figure": key, "difference": d.mean,
                        "difference_ci95": d.ci95, "measured": d.measured, "verdict": d.verdict(row["name"], base["name"])})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| row | code bits | weighted error | vs uniform | loss increase | grad error | vs uniform |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["bits"] == r["bits"] and x["allocation"] == "uniform")
        rel = lambda key: f"{100 * (r[key] / base[key] - 1):+.1f}%"  # noqa: E731
        lines.append(f"| {r['name']} | {r['code_bits']:.2f} | {format_mean(r['weighted_error'], r['weighted_error_ci95'])} | {rel('weighted_error')} | "
                     f"{format_mean(r['loss_increase'], r['loss_increase_ci95'], '+.4f')} | {format_mean(r['grad_error'], r['grad_error_ci95'])} | {rel('grad_error')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--bits", default="3,4", help="code bits per element to compare at (above --b-min, at most 8)")
    parser.add_argument("--b-min", type=int, default=2, help="the narrowest width a channel may get (AMAQ's default: 2)")
    parser.add_argument("--batches", type=int, default=40, help="batches scored")
    parser.add_argument("--settle", type=int, default=100, help="batches the gates learn on first, unscored (a split run steps them 80 times per half run)")
    parser.add_argument("--cut", type=int, default=0, help="the cut (default: 3 for minilm, 15 for smollm2's 30 blocks)")
    parser.add_argument("--warmup", type=int, default=None, help="whole-model training steps before measuring (default: 60 for minilm, 0 for smollm2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if not 1 <= args.b_min < 8 or any(not args.b_min <= int(b) <= 8 for b in args.bits.split(",")):
        parser.error("--bits: each in --b-min..8, --b-min in 1..7")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows, settings = [], {}
    for model in models:
        print(f"measuring {model} ...", file=sys.stderr, flush=True)
        found, settings[model] = measure(model, args)
        rows += found
    compared = comparisons(rows)
    print(table(rows))
    print()
    for c in compared:
        print(f"- {c['figure']}: {c['verdict']}")
    for model, s in settings.items():
        print(f"- {model}: cut {s['cut']}, {s['channels']} channels, cost I*span^2 over its mean at quantiles 0/10/50/90/99/100%: "
              + ", ".join(f"{v:g}" for v in s["cost_spread"].values()))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "comparisons": compared, "models": settings, "bits": args.bits,
                                        "batches": args.batches, "settle": args.settle, "seed": args.seed}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
