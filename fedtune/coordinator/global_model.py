"""The coordinator's copy of the model: it produces the initial adapter, scores each round's
global adapter on held-out data, and exports the final adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from fedtune.adapters import AdapterPlan, adapter_state, export_adapter, inject_lora, load_adapter_state
from fedtune.data import Example
from fedtune.models import ModelSource, ModelStore
from fedtune.tasks import get_task

log = logging.getLogger(__name__)


class GlobalModel:
    def __init__(
        self,
        store: ModelStore,
        source: ModelSource,
        task: str,
        labels: Sequence[str],
        plan: AdapterPlan,
        *,
        max_length: int,
        eval_examples: Sequence[Example] = (),
        eval_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.source, self.task_name, self.labels, self.plan = source, task, list(labels), plan
        self.task = get_task(task)
        self.eval_batch_size = eval_batch_size
        base = store.instance(source, task, labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA A matrices are drawn here: the run's initial adapter
            self.model = inject_lora(base, plan, task)
        self.model.eval()
        self.pad_id = store.pad_id(source)
        self.eval_items = store.encode(source, self.task, eval_examples, max_length, self.labels) if eval_examples else []
        if eval_examples:
            log.info("central evaluation on %d held-out examples", len(self.eval_items))

    def initial_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of ``state`` on the held-out data ({} when there is none)."""
        if not self.eval_items:
            return {}
        load_adapter_state(self.model, state)
        return self.task.evaluate(self.model, self.eval_items, self.pad_id, self.eval_batch_size)

    def export(self, state: dict[str, torch.Tensor], folder: Path) -> Path:
        load_adapter_state(self.model, state)
        return export_adapter(
            self.model,
            folder,
            {"model": self.source.name, "task": self.task_name, "labels": self.labels, "plan": self.plan.to_json()},
        )


class FixedTensors:
    """A "model" that is only a dict of tensors: the coordinator serves and aggregates them
    without evaluating anything. Used to measure and test the transport path with payloads of
    any size, independent of a transformers model."""

    def __init__(self, tensors: dict[str, torch.Tensor], plan: AdapterPlan | None = None) -> None:
        self.tensors = tensors
        self.plan = plan or AdapterPlan()

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.tensors.items()}

    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def export(self, state: dict[str, torch.Tensor], folder: Path) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "tensors.safetensors"))
        return folder
