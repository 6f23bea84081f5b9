"""Measure what this device's training throughput is, in the cost model's own units.

The planner sizes a device's adapter from the FLOP rate it reports. A datasheet figure says
little about what a CPU or phone sustains on a small transformer, so a client can time a few
real training steps of its model on its own data instead (``fedtune client --calibrate``):
once with LoRA on the top block only and once on every block. The difference is what the
backward pass through the other blocks costs, which gives the device's ``backward_factor``
(backward cost of a frozen block relative to its forward), and the all-blocks time gives
``flops_per_second = cost-model FLOPs of that step / measured seconds``. The planner's modeled
round times for that device are then anchored to a measurement of the device itself.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from typing import Sequence

from fedtune.adapters import AdapterPlan, adapter_state, inject_lora
from fedtune.client.recipes.base import LocalOptions, Recipe, TrainSettings
from fedtune.contract.cost import CostModel, model_geometry
from fedtune.data import Example
from fedtune.models import ModelSource, ModelStore
from fedtune.tasks import EncodedExample, Task, get_task
from fedtune.tasks.base import without_window_warnings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    seconds_per_step: float         # LoRA on every block
    seconds_per_step_top: float     # LoRA on the top block only
    backward_factor: float
    flops_per_step: float           # cost-model FLOPs of the every-block step, at backward_factor

    @property
    def flops_per_second(self) -> float:
        return self.flops_per_step / self.seconds_per_step


def backward_factor(top_seconds: float, all_seconds: float, num_blocks: int) -> float:
    """From t(d) = a + b d (d: blocks the backward pass crosses, a: the forward through all
    ``num_blocks`` blocks), the backward cost of one block relative to its forward: b / (a / L)."""
    if num_blocks < 2:
        return 1.0
    per_block = max(all_seconds - top_seconds, 0.0) / (num_blocks - 1)
    forward = max(top_seconds - per_block, 1e-12)
    return per_block * num_blocks / forward


def fixed_length(items: Sequence[EncodedExample], seq_len: int, pad_id: int) -> list[EncodedExample]:
    """``items`` padded or cut to exactly ``seq_len`` tokens: the shapes the cost model assumes."""
    def cut(seq: list, fill) -> list:
        return (list(seq) + [fill] * seq_len)[:seq_len]

    return [EncodedExample(cut(it.input_ids, pad_id), it.target if isinstance(it.target, int) else cut(it.target, -100)) for it in items]


def median_step_seconds(model, task: Task, items: Sequence[EncodedExample], pad_id: int, *, batch_size: int, steps: int, warmup: int = 1) -> float:
    """Median wall time of ``steps`` AdamW steps of fedtune's local recipe on ``model``, after
    ``warmup`` untimed steps."""
    stamps: list[float] = []

    class Timed(Recipe):
        def after_backward(self, model) -> None:
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    Timed(LocalOptions(), {}).run(model, adapter_state(model), {}, task, items, TrainSettings(steps + warmup, batch_size, 1e-4, 0.0, seed=0), pad_id)
    return statistics.median([b - a for a, b in zip([start, *stamps], stamps)][warmup:])


def calibrate(
    store: ModelStore,
    source: ModelSource,
    task_name: str,
    labels: Sequence[str],
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    seq_len: int = 64,
    steps: int = 4,
) -> Calibration:
    """Time ``steps`` AdamW steps (after one warm-up step) of LoRA rank 8 on the top block and
    on every block, on batches of this device's examples padded to exactly ``seq_len`` tokens."""
    task = get_task(task_name)
    base = store.base(source, task_name, labels)
    geometry, plan = model_geometry(base, AdapterPlan(rank=8, alpha=16.0))
    top_plan = replace(plan, layers=(geometry.num_blocks - 1,))
    pad = store.pad_id(source)
    with without_window_warnings():  # a timing sample at seq_len, not the run's --max-length
        encoded = store.encode(source, task, list(examples)[: max(batch_size * (steps + 1), 1)], seq_len, labels)
    if not encoded:
        raise ValueError("no usable examples to calibrate with")
    items = fixed_length(encoded, seq_len, pad)

    def step_seconds(p: AdapterPlan) -> float:
        model = inject_lora(store.instance(source, task_name, labels), p, task_name, seed=0)  # never the global generator's draws
        return median_step_seconds(model, task, items, pad, batch_size=batch_size, steps=steps)

    top, every = step_seconds(top_plan), step_seconds(plan)
    factor = backward_factor(top, every, geometry.num_blocks)
    flops = CostModel(batch_size, seq_len, 1).flops_per_step(geometry, plan, factor)
    result = Calibration(every, top, factor, flops)
    log.info("calibration: %.3f s per step (top block), %.3f s (every block): backward factor %.2f, %.1f GFLOP/s", top, every, factor, result.flops_per_second / 1e9)
    return result
