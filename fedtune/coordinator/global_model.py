"""The coordinator's copy of the model: it produces the initial adapter, scores each round's
global adapter on held-out data, and exports the final adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from fedtune.adapters import AdapterPlan, adapter_state, export_adapter, inject_lora, load_adapter_state
from fedtune.adapters.lora import BASE_DELTA
from fedtune.data import Example
from fedtune.models import ModelSource, ModelStore
from fedtune.protocol.tensors import TensorSpec, specs_of
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
        self.store = store
        self.task = get_task(task)
        self._specs: dict[tuple, dict[str, TensorSpec]] = {}
        self._original_weights: dict[str, torch.nn.Parameter] = {}
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

    def spec(self, plan: AdapterPlan) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes of the adapter ``plan`` builds on this model (cached)."""
        key = plan.key()
        if key not in self._specs:
            if key == self.plan.key():
                self._specs[key] = specs_of(adapter_state(self.model))
            else:
                probe = inject_lora(self.store.instance(self.source, self.task_name, self.labels), plan, self.task_name)
                self._specs[key] = specs_of(adapter_state(probe))
        return self._specs[key]

    def _load(self, state: dict[str, torch.Tensor], base_delta: dict[str, torch.Tensor]) -> None:
        # Base deltas replace the frozen weights of this model only (copy-on-write): start from
        # the original weights each time so deltas do not accumulate twice.
        modules = dict(self.model.named_modules())
        for name, delta in base_delta.items():
            layer = modules[name].base_layer
            original = self._original_weights.setdefault(name, layer.weight)
            layer.weight = torch.nn.Parameter(original.detach() + delta.to(original.dtype), requires_grad=False)
        load_adapter_state(self.model, state)

    def evaluate(self, state: dict[str, torch.Tensor], base_delta: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Metrics of ``state`` on the held-out data ({} when there is none)."""
        if not self.eval_items:
            return {}
        self._load(state, base_delta or {})
        return self.task.evaluate(self.model, self.eval_items, self.pad_id, self.eval_batch_size)

    def export(self, state: dict[str, torch.Tensor], folder: Path, base_delta: dict[str, torch.Tensor] | None = None) -> Path:
        """A PEFT adapter folder; with base deltas (FLoRA) also ``base_delta.safetensors``,
        dense updates to add to the base weights before applying the adapter."""
        from safetensors.torch import save_file

        self._load(state, base_delta or {})
        folder = export_adapter(
            self.model,
            folder,
            {
                "model": self.source.name,
                "task": self.task_name,
                "labels": self.labels,
                "plan": self.plan.to_json(),
                "base_delta": "base_delta.safetensors" if base_delta else None,
            },
        )
        if base_delta:
            save_file({k + BASE_DELTA: v.contiguous() for k, v in base_delta.items()}, str(folder / "base_delta.safetensors"))
        return folder


class FixedTensors:
    """A "model" that is only a dict of tensors: the coordinator serves and aggregates them
    without evaluating anything. Used to measure and test the transport path with payloads of
    any size, independent of a transformers model."""

    def __init__(self, tensors: dict[str, torch.Tensor], plan: AdapterPlan | None = None) -> None:
        self.tensors = tensors
        self.plan = plan or AdapterPlan()

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.tensors.items()}

    def spec(self, plan: AdapterPlan) -> dict[str, TensorSpec]:
        return specs_of(self.tensors)

    def evaluate(self, state: dict[str, torch.Tensor], base_delta: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        return {}

    def export(self, state: dict[str, torch.Tensor], folder: Path, base_delta: dict[str, torch.Tensor] | None = None) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "tensors.safetensors"))
        return folder
