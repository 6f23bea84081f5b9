"""LoRA adapters (and the other adapter kinds) on transformers models, through peft.

An ``AdapterPlan`` (defined in ``fedtune.contract.plans``, re-exported here) says where the
adapter goes (target modules, which blocks), its form (``kind``: LoRA by default, see
``fedtune.contract.adapter_kinds``) and how big it is (rank, optionally per block). peft does the
injection; this module adds what federated training needs on top: the adapter as a flat dict of
named tensors (what crosses the wire and gets averaged), loading such a dict back strictly, and
exporting a standard PEFT adapter folder.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from peft import PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedtune.contract.adapter_kinds import adapter_kind
from fedtune.contract.cost import default_target_modules, is_conv1d
from fedtune.contract.plans import AdapterError, AdapterPlan
from fedtune.durable import fresh_folder, write_file
from fedtune.names import A_SUFFIX, BASE_DELTA, CORE_SUFFIX, FROZEN_A, FROZEN_B, ends_with, is_frozen_update
from fedtune.quantized_base import dense_weight, frozen_delta, is_quantized, set_frozen_delta
from fedtune.rng import seeded

PEFT_TASK_TYPES = {"seq-cls": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM, "seq2seq": TaskType.SEQ_2_SEQ_LM}


def _block_count_attr(config) -> str:
    """The config attribute that holds the number of transformer blocks."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(getattr(config, attr, None), int):
            return attr
    raise AdapterError("cannot tell how many transformer blocks the model has")


def num_blocks(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return getattr(config, _block_count_attr(config))


def keep_first_blocks(config, blocks: int) -> None:
    """Make a model config say it has only its first ``blocks`` blocks."""
    attr = _block_count_attr(config)
    count = getattr(config, attr)
    if not 1 <= blocks <= count:
        raise AdapterError(f"cannot keep {blocks} of the model's {count} blocks")
    setattr(config, attr, blocks)


def peft_config(plan: AdapterPlan, task: str, model: torch.nn.Module):
    """The peft config of ``plan``'s adapter kind on ``model`` (AdapterError when it does not fit)."""
    kind = adapter_kind(plan.kind)
    kind.check(plan)
    if not plan.target_modules:
        # peft's own default covers only the model types it lists; fedtune's also finds the
        # query and value projections of others by name (and is peft's where peft has one).
        try:
            plan = replace(plan, target_modules=default_target_modules(model))
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
    blocks = num_blocks(model)
    bad = [i for i in (*plan.layers, *plan.rank_per_layer) if not 0 <= i < blocks]
    if bad:
        raise AdapterError(f"layer indices {sorted(set(bad))} are outside the model's {blocks} blocks")
    # peft matches rank_pattern keys as regexes against the end of module names; ".{i}." picks
    # out block i in every architecture whose block list is a numbered ModuleList.
    rank_pattern = {rf".*\.{i}\..*": r for i, r in plan.rank_per_layer.items()}
    alpha_pattern = {key: plan.scale * r for key, r in rank_pattern.items()}
    return kind.peft_config(plan, task_type=PEFT_TASK_TYPES[task], rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def inject_lora(model: torch.nn.Module, plan: AdapterPlan, task: str, seed: int | None = None) -> PeftModel:
    """Wrap ``model`` with the plan's adapter (LoRA, or the plan's ``kind``). Base weights stay
    frozen (and, with ``freeze_a``, LoRA's A matrices; with ``core``, both factors, around a
    trained core).

    peft draws the initial A matrices from torch's default generator; with ``seed`` they are
    drawn under the process's RNG lock from that seed (``fedtune.rng.seeded``), the same
    whatever other threads do."""
    try:
        with seeded(seed) if seed is not None else nullcontext():
            peft_model = get_peft_model(model, peft_config(plan, task, model))
            if plan.freeze_a:
                for name, param in peft_model.named_parameters():
                    if ".lora_A." in name:
                        param.requires_grad_(False)
            if plan.core:
                insert_cores(peft_model)
        return peft_model
    except AdapterError:
        raise
    except (ValueError, KeyError) as exc:
        raise AdapterError(f"cannot apply LoRA plan {plan}: {exc}") from exc


class CoreProjection(torch.nn.Module):
    """The A side of a LoRA-SB module: ``x -> R @ (A @ x)`` with A frozen and the square core R
    trained. Sits where peft keeps ``lora_A[adapter]``, so peft's forward computes
    ``B(R(A x)) * scale`` unchanged, the adapter state names it ``<module>.lora_A.core.weight``,
    and Opacus computes per-example gradients of R as of any Linear layer.

    peft 0.21 has no LoRA-SB tuner (its TinyLoRA trains a projected vector, not R), hence this
    small module rather than a new tuner."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        rank = a.shape[0]
        self.weight = torch.nn.Parameter(a.detach().clone(), requires_grad=False)
        self.core = torch.nn.Linear(rank, rank, bias=False, dtype=a.dtype, device=a.device)
        torch.nn.init.zeros_(self.core.weight)  # the adapter starts as the identity function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(torch.nn.functional.linear(x, self.weight))


def insert_cores(model: PeftModel) -> None:
    """Turn every LoRA module into LoRA-SB: B and A from the truncated SVD of the module's
    pretrained weight W (LoRA-XS: ``B = U_r S_r``, ``A = V_r^T``, so the adapter spans W's
    leading directions), both frozen, and a zero-initialized trained core R between them.

    No data is used, so the initialization costs no privacy (LoRA-SB's reference code instead
    initializes from a gradient over all the training data, which a federation does not have)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = out_in_weight(module)
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        for name in list(module.lora_A.keys()):
            a = module.lora_A[name].weight
            rank = a.shape[0]
            if rank > s.shape[0]:
                raise AdapterError(f"LoRA-SB rank {rank} exceeds the rank of a {list(weight.shape)} weight")
            module.lora_A[name] = CoreProjection(vh[:rank].to(a.dtype))
            b = module.lora_B[name].weight
            with torch.no_grad():
                b.copy_((u[:, :rank] * s[:rank]).to(b.dtype))
            b.requires_grad_(False)


def is_transposed(module: torch.nn.Module) -> bool:
    """Whether the (base) weight of ``module`` is stored in x out: transformers' Conv1D (GPT-2's
    attention and MLP), which peft adapts with ``fan_in_fan_out``."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return bool(getattr(module, "fan_in_fan_out", False)) or is_conv1d(base)


def out_in_weight(module: torch.nn.Module) -> torch.Tensor:
    """The base weight of ``module`` as the out x in matrix LoRA's ``B @ A`` adds to, whatever
    its storage (a Conv1D keeps it transposed)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if is_quantized(base):  # held in 8 or 4 bits (fedtune.quantized_base): read dequantized
        return dense_weight(base)
    return base.weight.T if is_transposed(module) else base.weight


def add_to_weight(module: torch.nn.Module, delta: torch.Tensor, original: torch.Tensor | None = None) -> None:
    """Replace the base weight of ``module`` by ``original`` (default: its weight) plus the out x
    in ``delta``, stored in the layer's own layout (transposed for a Conv1D). A quantized layer
    keeps its quantized weight and holds the update beside it in float32 (``frozen_delta``):
    quantized again, most of an update of LoRA's size would be rounded away. Replaced, not
    modified in place: base weights may be shared with other models in this process."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if is_quantized(base):
        carried = frozen_delta(base) if original is None else None  # from ``original``: this delta alone
        total = delta.detach().to(torch.float32) if carried is None else carried + delta.detach().to(carried.device, torch.float32)
        try:
            set_frozen_delta(base, total)
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
        return
    start = base.weight if original is None else original
    step = delta.T if is_transposed(module) else delta
    if tuple(step.shape) != tuple(start.shape):
        raise AdapterError(f"a {list(delta.shape)} update does not fit a weight of shape {list(out_in_weight(module).shape)} (out x in)")
    base.weight = torch.nn.Parameter(start.detach() + step.to(start.dtype), requires_grad=False)


def fold_cores(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA-SB adapter state as a plain LoRA state with the same function: each core R is
    folded into its A (``A <- R @ A``), so plain peft loads it."""
    out = {n: t for n, t in state.items() if not ends_with(n, CORE_SUFFIX)}
    for name, r in state.items():
        if ends_with(name, CORE_SUFFIX):
            a_name = name[: -len(CORE_SUFFIX)] + A_SUFFIX
            if a_name not in state or state[a_name].shape[0] != r.shape[1]:
                raise AdapterError(f"core {name!r} has no A of rank {r.shape[1]} to fold into")
            out[a_name] = (r.double() @ state[a_name].double()).to(state[a_name].dtype)
    return out


def _peft_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """peft's adapter state dict (live tensors), with LoRA-SB cores named
    ``<module>.lora_A.core.weight``: peft strips the adapter name only from its own parameter
    names, and would mangle the core's on loading, so fedtune names and loads cores itself."""
    return {_CORE_KEY.sub(r"\1.core.weight", k): v for k, v in get_peft_model_state_dict(model).items()}


_CORE_KEY = re.compile(r"(\.lora_A)\.[^.]+\.core\.weight$")


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by name: the LoRA matrices plus fully trained modules
    (the classification head). Detached CPU copies, safe to send or store."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _peft_state(model).items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load a state produced by ``adapter_state`` for the same plan; every tensor must match."""
    expected = _peft_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"adapter state does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise AdapterError(f"{name}: shape {list(tensor.shape)} does not fit {list(expected[name].shape)}")
    set_peft_model_state_dict(model, {k: v for k, v in state.items() if not ends_with(k, CORE_SUFFIX)})
    with torch.no_grad():
        for name, tensor in state.items():
            if ends_with(name, CORE_SUFFIX):
                expected[name].copy_(tensor)


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Adapter-state name (as in ``adapter_state``) -> the live trainable parameter. Recipes
    that keep per-tensor state (control variates, proximal anchors) index it by these names."""
    state = _peft_state(model)
    by_storage = {(t.data_ptr(), tuple(t.shape)): name for name, t in state.items()}
    out = {}
    for p in model.parameters():
        if p.requires_grad:
            name = by_storage.get((p.data_ptr(), tuple(p.shape)))
            if name is None:
                raise AdapterError(f"a trainable parameter of shape {list(p.shape)} is not part of the adapter state")
            out[name] = p
    return out


def apply_base_delta(model: PeftModel, deltas: Mapping[str, torch.Tensor]) -> None:
    """Add dense updates to frozen base weights (FLoRA folds each round's update in this way).

    ``deltas`` maps a LoRA module's peft name (``base_model.model....query``) to an out x in
    matrix. The weight is replaced, not modified in place: the base weights may be shared with
    other models in this process (see ``ModelStore``), and those must not change.
    """
    modules = dict(model.named_modules())
    for name, delta in deltas.items():
        module = modules.get(name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear) and not is_conv1d(base):
            raise AdapterError(f"base delta for {name!r}: no such Linear module in the model")
        if tuple(delta.shape) != tuple(out_in_weight(module).shape):
            raise AdapterError(f"base delta for {name!r} has shape {list(delta.shape)}, the weight is {list(out_in_weight(module).shape)} (out x in)")
        add_to_weight(module, delta)


def split_task_tensors(tensors: Mapping[str, torch.Tensor], scale: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate a task's tensors into (adapter state, dense updates of frozen weights by module,
    recipe tensors). Frozen updates are ``<module>.base_delta`` matrices (FLoRA) plus
    ``scale * frozen_B @ frozen_A`` for the parts of the global adapter outside the client's
    plan; recipe tensors have namespaced names (``scaffold.c/...``)."""
    adapter = {k: v for k, v in tensors.items() if not is_frozen_update(k) and "/" not in k}
    extras = {k: v for k, v in tensors.items() if "/" in k}
    deltas = {k[: -len(BASE_DELTA)]: v.clone() for k, v in tensors.items() if ends_with(k, BASE_DELTA)}
    for name, a in tensors.items():
        if ends_with(name, FROZEN_A):
            module = name[: -len(FROZEN_A)]
            b = tensors.get(module + FROZEN_B)
            if b is None or b.shape[1] != a.shape[0]:
                raise AdapterError(f"frozen factors of {module!r} do not pair up")
            product = scale * (b.double() @ a.double())
            deltas[module] = (deltas[module].double() + product).to(a.dtype) if module in deltas else product.to(a.dtype)
    return adapter, deltas, extras


def export_adapter(model: PeftModel, folder: str | Path, metadata: Mapping | None = None) -> Path:
    """Write a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
    plus ``fedtune.json`` with what is needed to rebuild the base (task, labels, model).

    The folder is written afresh and renamed into place whole (``fedtune.durable.fresh_folder``):
    a symbolic link planted at ``folder``, or at a file in it, is replaced, never written
    through (peft's ``save_pretrained`` follows links)."""
    folder = Path(folder)
    with fresh_folder(folder) as staged:
        write_adapter(model, staged, metadata)
    return folder


def write_adapter(model: PeftModel, folder: str | Path, metadata: Mapping | None = None) -> None:
    """``export_adapter``'s files, into ``folder``, a new empty folder of the caller's (from
    ``fresh_folder``; peft follows links, so not a folder others can write into)."""
    model.save_pretrained(str(folder))
    if metadata is not None:
        write_file(Path(folder) / "fedtune.json", (json.dumps(dict(metadata), indent=2) + "\n").encode(), exclusive=True)


def load_exported_adapter(base: torch.nn.Module, folder: str | Path) -> PeftModel:
    """Load an adapter folder written by ``export_adapter`` onto a fresh base model."""
    return PeftModel.from_pretrained(base, str(folder))
