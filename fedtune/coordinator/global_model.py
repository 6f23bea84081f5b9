"""The coordinator's copy of the model: it produces the initial adapter, scores each round's
global model on held-out data, and exports the final adapter."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from fedtune.adapters import AdapterError, AdapterPlan, adapter_state, fold_cores, inject_lora, load_adapter_state
from fedtune.adapters.lora import add_to_weight, write_adapter
from fedtune.aggregation.lora_math import low_rank, product
from fedtune.allocator import release_free_memory
from fedtune.contract.specs import TensorSpec, specs_of
from fedtune.data import Example
from fedtune.durable import fresh_folder
from fedtune.models import ModelSource, ModelStore
from fedtune.names import A_SUFFIX, B_SUFFIX, ends_with, lora_modules
from fedtune.tasks import EvalOptions, get_task

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
        eval_options: EvalOptions | None = None,
    ) -> None:
        """``eval_options``: the chat template mode the held-out data is encoded with (the
        clients' training data takes the same) and the task's extra evaluations (causal LM:
        generation, multiple choice); default: the template when the tokenizer has one, no
        generation."""
        eval_options = eval_options or EvalOptions()
        self.source, self.task_name, self.labels, self.plan = source, task, list(labels), plan
        self.store = store
        self.task = get_task(task)
        self._specs: dict[tuple, dict[str, TensorSpec]] = {}
        self._original_weights: dict[str, torch.nn.Parameter] = {}
        self.eval_batch_size = eval_batch_size
        base = store.instance(source, task, labels)
        self.model = inject_lora(base, plan, task, seed=seed)  # LoRA's A matrices drawn here: the run's initial adapter
        self.model.eval()
        self.pad_id = store.pad_id(source)
        self.eval_items = store.encode(source, self.task, eval_examples, max_length, self.labels, chat_template=eval_options.chat_template) if eval_examples else []
        self.eval_cases = store.prepare_eval(source, self.task, eval_examples, max_length, eval_options) if eval_examples else None
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
                # seeded: an unseeded draw here, from a client thread, could land inside another
                # thread's seeded block and change the values that block draws
                probe = inject_lora(self.store.instance(self.source, self.task_name, self.labels), plan, self.task_name, seed=0)
                self._specs[key] = specs_of(adapter_state(probe))
        return self._specs[key]

    def _load(self, state: dict[str, torch.Tensor], base_delta: dict[str, torch.Tensor]) -> None:
        # Base deltas replace the frozen weights of this model only (copy-on-write): start from
        # the original weights each time so deltas do not accumulate twice.
        modules = dict(self.model.named_modules())
        for name, delta in base_delta.items():
            original = self._original_weights.setdefault(name, modules[name].base_layer.weight)
            add_to_weight(modules[name], delta, original)  # in the layer's layout (Conv1D: transposed)
        load_adapter_state(self.model, state)

    def evaluate(self, state: dict[str, torch.Tensor], base_delta: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Metrics of ``state`` on the held-out data ({} when there is none): the task's loss
        metrics, and those of its extra evaluations (causal LM: generation exact match,
        multiple-choice accuracy) when they were asked for and the data has what they need."""
        if not self.eval_items and self.eval_cases is None:
            return {}
        self._load(state, base_delta or {})
        metrics = self.task.evaluate(self.model, self.eval_items, self.pad_id, self.eval_batch_size) if self.eval_items else {}
        if self.eval_cases is not None:
            metrics.update(self.task.evaluate_prepared(self.model, self.eval_cases, self.pad_id, self.eval_batch_size,
                                                       lambda ids: self.store.decode(self.source, ids)))
        release_free_memory()
        return metrics

    def export(
        self,
        state: dict[str, torch.Tensor],
        folder: Path,
        base_delta: dict[str, torch.Tensor] | None = None,
        *,
        rank: int = 0,
        merged_folder: Path | None = None,
    ) -> Path:
        """A standard PEFT adapter folder that plain peft loads onto the base model, giving the
        model this coordinator evaluates.

        When the global model has dense base-weight deltas (FLoRA's folded updates, FlexLoRA's
        dense mean), each LoRA module's whole update ``scale * B @ A + delta`` is refactored by
        truncated SVD into a LoRA adapter of rank ``rank`` (0: the numerical rank, exact to
        rounding); the relative error is recorded in ``fedtune.json``. With ``merged_folder``,
        the merged model (base weights + update) is also written as a transformers folder, in
        fp32 whatever the precision the run held its base at (a merged quantized model would be
        a bitsandbytes checkpoint that plain transformers cannot load); ``fedtune.json`` records
        that precision (``base_precision``): the adapter reproduces the run's evaluation on a base
        held the same way.
        """
        metadata = {"model": self.source.name, "task": self.task_name, "labels": self.labels, "plan": self.plan.to_json(),
                    "base_precision": self.source.precision}
        if base_delta:
            plan, state, errors = fold_deltas(self.plan, state, base_delta, rank)
            model = inject_lora(self.store.instance(self.source, self.task_name, self.labels), plan, self.task_name, seed=0)
            load_adapter_state(model, state)
            metadata.update(plan=plan.to_json(), folded_base_delta=True, export_rank=plan.rank, relative_error=max(errors.values(), default=0.0), relative_error_per_module=errors)
            log.info("folded the base deltas into a rank-%d adapter (largest relative error %.2e)", plan.rank, metadata["relative_error"])
        elif self.plan.core:
            # Fed-SB: fold each core into its A (A <- R @ A), a plain LoRA adapter with the
            # same function, since peft has no LoRA-SB tuner to load cores with.
            plan = replace(self.plan, core=False)
            model = inject_lora(self.store.instance(self.source, self.task_name, self.labels), plan, self.task_name, seed=0)
            load_adapter_state(model, fold_cores(state))
            metadata.update(plan=plan.to_json(), folded_cores=True)
        else:
            self._load(state, {})
            model = self.model
        # Each folder is written afresh and renamed into place whole (fresh_folder): peft and
        # transformers follow symbolic links, and the run folder may hold links planted since
        # the run started. The merged model is built from the adapter just written (the staged
        # copy, not whatever stands at ``folder``), and renamed into place before it.
        folder = Path(folder)
        with fresh_folder(folder) as staged:
            write_adapter(model, staged, metadata)
            if merged_folder is not None:
                from peft import PeftModel

                dense = self.source.held_at("fp32")
                merged = PeftModel.from_pretrained(self.store.instance(dense, self.task_name, self.labels), str(staged)).merge_and_unload()
                with fresh_folder(merged_folder) as merged_staged:
                    merged.save_pretrained(str(merged_staged))
                    self.store.tokenizer(self.source).save_pretrained(str(merged_staged))
        return folder


def fold_deltas(plan: AdapterPlan, adapter: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], rank: int = 0) -> tuple[AdapterPlan, dict[str, torch.Tensor], dict[str, float]]:
    """Refactor ``scale * B @ A + delta`` of every LoRA module into one LoRA adapter of a common
    rank with scale 1 (``rank`` 0: the largest numerical rank among the modules). Returns the
    new plan, its state (other tensors, such as heads, unchanged) and each module's relative
    Frobenius error."""
    modules = lora_modules(adapter)
    unknown = sorted(set(deltas) - set(modules))
    if unknown:
        raise AdapterError(f"base deltas for modules without LoRA: {unknown[:3]}")
    wholes = {}
    for m in modules:
        whole = plan.scale * product(adapter, m)
        if m in deltas:
            whole = whole + deltas[m].double()
        wholes[m] = whole
    factors = {m: low_rank(w, rank or None) for m, w in wholes.items()}
    k = max([f[1].shape[0] for f in factors.values()] + [1])
    state = {n: t for n, t in adapter.items() if not (ends_with(n, A_SUFFIX) or ends_with(n, B_SUFFIX))}
    for m, (b, a, _) in factors.items():
        dtype = adapter[m + A_SUFFIX].dtype
        a_k = torch.zeros(k, a.shape[1], dtype=torch.float64)
        b_k = torch.zeros(b.shape[0], k, dtype=torch.float64)
        a_k[: a.shape[0]], b_k[:, : b.shape[1]] = a, b
        state[m + A_SUFFIX], state[m + B_SUFFIX] = a_k.to(dtype), b_k.to(dtype)
    return replace(plan, rank=k, alpha=float(k), rank_per_layer={}), state, {m: f[2] for m, f in factors.items()}


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

    def export(self, state: dict[str, torch.Tensor], folder: Path, base_delta: dict[str, torch.Tensor] | None = None, **_: object) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        with fresh_folder(folder) as staged:  # as GlobalModel.export: never through a planted link
            save_file({k: v.contiguous() for k, v in state.items()}, str(staged / "tensors.safetensors"))
        return folder
