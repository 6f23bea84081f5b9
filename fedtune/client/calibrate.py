"""Measure what this device's training throughput is, in the cost model's own units.

The planner sizes a device's adapter from the FLOP rate it reports. A datasheet figure says
little about what a CPU or phone sustains on a small transformer, so a client can time a few
real training steps of its model on its own data instead (``fedtune client --calibrate``) and
report ``flops_per_second = cost-model FLOPs of those steps / measured seconds``. The planner's
modeled round times for that device are then anchored to a measurement of the device itself.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

from fedtune.adapters import AdapterPlan, adapter_state, inject_lora
from fedtune.client.recipes.base import LocalOptions, Recipe, TrainSettings
from fedtune.coordinator.planner import CostModel, model_geometry
from fedtune.data import Example
from fedtune.models import ModelSource, ModelStore
from fedtune.tasks import EncodedExample, get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    seconds_per_step: float
    flops_per_step: float

    @property
    def flops_per_second(self) -> float:
        return self.flops_per_step / self.seconds_per_step


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
    """Time ``steps`` AdamW steps (after one warm-up step) of LoRA rank 8 on every block, on
    batches of this device's examples padded to exactly ``seq_len`` tokens."""
    task = get_task(task_name)
    base = store.base(source, task_name, labels)
    geometry, plan = model_geometry(base, AdapterPlan(rank=8, alpha=16.0))
    pad = store.pad_id(source)
    encoded = store.encode(source, task, list(examples)[: max(batch_size * (steps + 1), 1)], seq_len, labels)
    if not encoded:
        raise ValueError("no usable examples to calibrate with")
    items = [EncodedExample((it.input_ids + [pad] * seq_len)[:seq_len], it.target if isinstance(it.target, int) else (list(it.target) + [-100] * seq_len)[:seq_len]) for it in encoded]
    model = inject_lora(store.instance(source, task_name, labels), plan, task_name)
    stamps: list[float] = []

    class Timed(Recipe):
        def after_backward(self, model) -> None:
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    Timed(LocalOptions(), {}).run(model, adapter_state(model), {}, task, items, TrainSettings(steps + 1, batch_size, 1e-4, 0.0, seed=0), pad)
    durations = [b - a for a, b in zip([start, *stamps], stamps)][1:]
    flops = CostModel(batch_size, seq_len, 1).flops_per_step(geometry, plan)
    result = Calibration(statistics.median(durations), flops)
    log.info("calibration: %.3f s per step of LoRA on every block: %.1f GFLOP/s under the cost model", result.seconds_per_step, result.flops_per_second / 1e9)
    return result
