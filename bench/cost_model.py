"""The planner's cost model against measurement: modeled and measured step time and training
memory for several LoRA plans on this machine, as ratios to the smallest plan.

    python bench/cost_model.py [--steps 6] [--out FILE]

Each plan is LEGEND-style (LoRA on the top ``depth`` blocks of MiniLM, rank 8 above and 4
below, plus the classification head), trained with fedtune's local recipe on batches of 16
tweets padded to exactly 64 tokens, the shapes the cost model assumes. Every plan runs in a
fresh child process: step time is the median of ``--steps`` (12) timed AdamW steps after two warm-up
steps; training memory is the child's peak resident set during training minus its peak before
training (the frozen weights are loaded by then, so this is the adapter, its optimizer state
and the activations: the part of the modeled memory that differs between plans).
Absolute FLOP rates differ between machines, so the comparison is between ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

DEPTHS = (1, 2, 4, 6)
BATCH, SEQ = 16, 64


def plan_for(depth: int):
    from fedtune.adapters import AdapterPlan
    from fedtune.coordinator.planner import legend_plan

    return legend_plan(AdapterPlan(rank=8, alpha=16.0, target_modules=("query", "value")), 6, depth, 8, 2)


def measure_one(depth: int, steps: int) -> dict:
    """In this process: train ``plan_for(depth)`` and measure (runs in a child)."""
    from fedtune.adapters import inject_lora
    from fedtune.client.calibrate import fixed_length, median_step_seconds
    from fedtune.data import TWEETS_LABELS, embedded_tweets
    from fedtune.models import ModelStore, resolve_source
    from fedtune.tasks import get_task

    store, source, task = ModelStore(), resolve_source("minilm"), get_task("seq-cls")
    pad = store.pad_id(source)
    items = fixed_length(store.encode(source, task, embedded_tweets()[:400], SEQ, TWEETS_LABELS), SEQ, pad)
    model = inject_lora(store.instance(source, "seq-cls", TWEETS_LABELS), plan_for(depth), "seq-cls")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = median_step_seconds(model, task, items, pad, batch_size=BATCH, steps=steps, warmup=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_seconds": seconds, "train_mib": (peak - peak_before) / 1024}


def modeled(depth: int) -> dict:
    from fedtune.coordinator.app import model_geometry
    from fedtune.coordinator.planner import CostModel
    from fedtune.data import TWEETS_LABELS
    from fedtune.models import ModelStore, resolve_source

    base = ModelStore().base(resolve_source("minilm"), "seq-cls", TWEETS_LABELS)
    geometry, _ = model_geometry(base, plan_for(depth))
    cost = CostModel(BATCH, SEQ, 1)
    plan = plan_for(depth)
    trained = cost.memory_bytes(geometry, plan) - 4 * geometry.base_params
    return {"flops_per_step": cost.flops_per_step(geometry, plan), "train_mib": trained / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per plan (fewer are noisy on a shared CPU)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_one(args.child, args.steps)))
        return 0
    rows = []
    for depth in DEPTHS:
        print(f"measuring depth {depth} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(depth), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"name": f"top {depth} blocks", "depth": depth, **{f"modeled_{k}": v for k, v in modeled(depth).items()}, **{f"measured_{k}": v for k, v in measured.items()}})
    ref = rows[0]
    print(f"{'plan':<14} {'measured ms':>11} {'time ratio':>10} {'modeled':>8} {'off':>6} {'measured MiB':>12} {'mem ratio':>9} {'modeled':>8} {'off':>6}")
    for r in rows:
        r["measured_time_ratio"] = r["measured_step_seconds"] / ref["measured_step_seconds"]
        r["modeled_time_ratio"] = r["modeled_flops_per_step"] / ref["modeled_flops_per_step"]
        r["measured_memory_ratio"] = r["measured_train_mib"] / ref["measured_train_mib"]
        r["modeled_memory_ratio"] = r["modeled_train_mib"] / ref["modeled_train_mib"]
        r["time_ratio_error"] = r["modeled_time_ratio"] / r["measured_time_ratio"] - 1
        r["memory_ratio_error"] = r["modeled_memory_ratio"] / r["measured_memory_ratio"] - 1
        print(
            f"{r['name']:<14} {1000 * r['measured_step_seconds']:>11.1f} {r['measured_time_ratio']:>10.2f} {r['modeled_time_ratio']:>8.2f} {100 * r['time_ratio_error']:>5.0f}% "
            f"{r['measured_train_mib']:>12.0f} {r['measured_memory_ratio']:>9.2f} {r['modeled_memory_ratio']:>8.2f} {100 * r['memory_ratio_error']:>5.0f}%"
        )
    result = {"rows": rows, "batch_size": BATCH, "seq_len": SEQ, "steps": args.steps}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
