"""The cost model: what an adapter plan costs a device in memory, compute and bytes, and how
long its round takes. The coordinator's planner picks plans by it (``fedtune.coordinator.planner``),
the split planner prices cuts with it (``fedtune.split.planning``), a device calibrates its own
figures against it (``fedtune.client.calibrate``), and the simulation's delay model uses it.
Pure arithmetic over a model's geometry: both sides compute the same figures.

For a plan with LoRA on the top ``depth`` blocks (counted from the output side, as LEGEND
recommends: layers near the output matter most and need no backward pass below them) and rank
``r_l`` on block ``l``, with ``T = batch_size * seq_len`` tokens per step:

- LoRA parameters: ``P = sum over LoRA modules of r_l * (in + out)`` (times the adapter kind's
  ``params_per_rank``: 2 for LoHa's two products).
- Memory (bytes, fp32):
    frozen weights ``4 * N_base`` (or the bytes a quantized base really holds)
  + the updates of frozen weights a strategy sends (``frozen_updates``: on every module of the
    global adapter, as FLoRA's folded aggregate, or on the modules where the plan's rank is
    below the global adapter's, as the rest of a wider adapter), ``4 * in * out`` bytes each: a
    quantized layer holds it beside its weight in float32; a float layer gets a new weight
    while the process's frozen base keeps the original (an upper bound: an update that is
    zero, as in the first round, is not sent)
  + adapter, its gradient and AdamW's two moments ``16 * P``
  + activations: ``A = 4 * T * (34 * hidden + 5 * heads * seq_len)`` per block, the figure of
    Korthikanti et al. (2022) for 16-bit training doubled for fp32, kept for each block the
    backward pass crosses, scaled by ``activation_scale`` (0.9: dropout masks stay 1 byte),
    plus ``activation_overhead_blocks`` (1.7) blocks' worth for the embeddings, the head, the
    loss and autograd's bookkeeping:  ``A * (activation_scale * depth + overhead)``.
- Compute per step (FLOPs): forward ``2 * N_block * T`` for every block, backward
  ``backward_factor * 2 * N_block * T`` for each block the backward pass crosses (frozen weights
  need input gradients only), plus ``6 * P * T`` for the adapter.
- The constants are calibrated against measurement (``bench/cost_model.py``: MiniLM, batch
  16, length 64, on the 2-core CPU the benchmarks run on): the backward pass through a frozen
  block cost 0.6x its forward there, and each crossed block kept 0.9 A of activations on top of
  1.7 A. A device can measure its own backward factor and FLOP rate
  (``fedtune client --calibrate``) and report them with its capabilities.
- Bytes per round: the adapter down and up, ``4 * P`` each way (plus the head).
- Round time: ``local_steps * FLOPs_per_step / flops_per_second + bytes_down / downlink +
  bytes_up / uplink``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from fedtune.contract.adapter_kinds import adapter_kind
from fedtune.contract.plans import AdapterPlan
from fedtune.devices import Capabilities
from fedtune.quantized_base import held_bytes, logical_numel

_BLOCK = re.compile(r"\.(\d+)\.")

# Config attribute names, across families, of the block count, the width and the head count
# (configs with an ``attribute_map`` answer the first name too; these cover the others).
_BLOCKS_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model", "dim", "n_embed")
_HEADS_ATTRS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")

# Leaf names of an attention's query and value projections (separate), and of fused
# query-key-value projections, across families: the default LoRA targets of a model type peft
# has no default for (LoRA's paper adapts W_q and W_v; peft's defaults do the same).
_QUERY = re.compile(r"^(q|query|q_proj|query_proj|q_lin|wq|Wq)$")
_VALUE = re.compile(r"^(v|value|v_proj|value_proj|v_lin|wv|Wv)$")
_FUSED = re.compile(r"^(query_key_value|c_attn|qkv_proj|qkv|Wqkv|in_proj|in_proj_weight|qkv_lin)$")


def _config_int(config, names: Sequence[str], what: str) -> int:
    for attr in names:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"the model's config ({type(config).__name__}) names no {what} (looked for {', '.join(names)})")


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt as a matrix: ``nn.Linear`` (weight out x in) or
    transformers' ``Conv1D`` (GPT-2 and kin: a linear layer whose weight is stored transposed,
    in x out); None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def is_conv1d(module: torch.nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (a Linear with its weight transposed)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; kept importable without it
        return False
    return isinstance(module, Conv1D)


def block_linears(model: torch.nn.Module, num_blocks: int) -> list[tuple[int, str, int, int]]:
    """(block, name, in, out) of every matrix layer inside the numbered blocks of ``model``."""
    out = []
    for name, module in model.named_modules():
        match = _BLOCK.search(name + ".")
        if match is None or int(match.group(1)) >= num_blocks:
            continue
        shape = linear_shape(module)
        if shape is not None:
            out.append((int(match.group(1)), name, *shape))
    return out


def default_target_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """LoRA's target modules for ``model`` when the config names none: peft's default for the
    model type where it has one (and the model has those modules), else the attention's query
    and value projections found by name (or its fused query-key-value projection).

    peft keeps a default only for the model types it lists; a user's DistilBERT (``q_lin``,
    ``v_lin``) or any newer family would otherwise need its module names spelled out. Raises
    ValueError naming the setting when no projection is found."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    config = model.config
    model_type = getattr(config, "model_type", "")
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if linear_shape(m) is not None}
    known = DEFAULT_TARGETS.get(model_type)
    if isinstance(known, (list, tuple)) and any(t in leaves for t in known):
        return tuple(t for t in known if t in leaves)
    query = sorted(n for n in leaves if _QUERY.match(n))
    value = sorted(n for n in leaves if _VALUE.match(n))
    if query and value:
        return (query[0], value[0])
    fused = sorted(n for n in leaves if _FUSED.match(n))
    if fused:
        return (fused[0],)
    raise ValueError(f"lora.target_modules: no default for model type {model_type!r} and no attention query/value projection found by name; "
                     f"name the modules (--target-modules, or all-linear); its matrix layers are named: {', '.join(sorted(leaves)) or 'none'}")


def check_target_modules(model: torch.nn.Module, targets: Sequence[str]) -> None:
    """Refuse (ValueError naming ``lora.target_modules``) a target name no matrix layer of
    ``model`` carries; ``all-linear`` (peft's: every linear layer but the output head) passes."""
    if tuple(targets) == ("all-linear",):
        return
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if linear_shape(m) is not None}
    names = {name for name, m in model.named_modules() if linear_shape(m) is not None}
    missing = [t for t in targets if t not in leaves and not any(n.endswith("." + t) or n == t for n in names)]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"lora.target_modules: the model ({model_type}) has no Linear module named {', '.join(repr(m) for m in missing)}; "
                         f"its matrix layers are named: {', '.join(sorted(leaves))}")


def _targeted(name: str, targets: tuple[str, ...], head_names: frozenset[str]) -> bool:
    if targets == ("all-linear",):  # peft's every-linear-layer shorthand
        return name.rsplit(".", 1)[-1] not in head_names
    return name.rsplit(".", 1)[-1] in targets or any(name.endswith("." + t) for t in targets)


@dataclass(frozen=True)
class ModelGeometry:
    """What the cost model needs to know about a model."""

    num_blocks: int
    hidden: int
    heads: int
    base_params: int                                  # all frozen parameters
    block_params: int                                 # parameters of one transformer block
    modules: tuple[tuple[int, str, int, int], ...]    # (block, name, in, out) of each LoRA target
    head_params: int = 0                              # trained head (modules_to_save)
    base_bytes: int = 0                               # bytes the frozen base occupies as held (0: fp32)

    @classmethod
    def from_model(cls, model: torch.nn.Module, target_modules: Sequence[str], head_params: int = 0) -> "ModelGeometry":
        """The geometry of ``model`` with LoRA on ``target_modules``: Linear layers (weight out
        x in), transformers' Conv1D (GPT-2's, weight in x out) and fused attention projections
        (GPT-NeoX's and Falcon's ``query_key_value``, GPT-2's ``c_attn``: one matrix, out = 3
        x hidden) all count by their (in, out)."""
        config = model.config
        num_blocks = _config_int(config, _BLOCKS_ATTRS, "block count")
        hidden = _config_int(config, _HIDDEN_ATTRS, "hidden width")
        heads = _config_int(config, _HEADS_ATTRS, "attention head count")
        targets = tuple(target_modules)
        per_block = [0] * num_blocks
        heads_out = frozenset({"lm_head", "score", "classifier", "out_proj", "embed_out"})
        modules = [m for m in block_linears(model, num_blocks) if _targeted(m[1], targets, heads_out)]
        for name, p in model.named_parameters():
            match = _BLOCK.search(name)
            if match is not None and int(match.group(1)) < num_blocks:
                per_block[int(match.group(1))] += logical_numel(p)
        if not modules:
            raise ValueError(f"no Linear or Conv1D modules named {list(targets)} inside numbered blocks")
        return cls(
            num_blocks=num_blocks,
            hidden=hidden,
            heads=heads,
            base_params=sum(logical_numel(p) for p in model.parameters()),
            block_params=max(per_block),
            modules=tuple(modules),
            head_params=head_params,
            base_bytes=held_bytes(model),  # what the device holds: fewer bytes when quantized
        )


def activation_bytes_per_block(batch_size: int, seq_len: int, hidden: int, heads: int) -> int:
    """A: Korthikanti et al.'s activation bytes of one transformer block, doubled for fp32."""
    return 4 * batch_size * seq_len * (34 * hidden + 5 * heads * seq_len)


# Which dense updates of the frozen weights a client is sent (``CostModel.frozen_updates``):
# none; the rest of the global adapter outside its plan; or an update of every module of the
# global adapter. Read from what the run's strategy declares (``frozen_updates_of``).
FROZEN_UPDATES = ("none", "remainder", "all")


@dataclass(frozen=True)
class CostModel:
    batch_size: int
    seq_len: int
    local_steps: int
    backward_factor: float = 0.6             # backward FLOPs of a crossed frozen block / its forward
    activation_scale: float = 0.9            # activations kept per crossed block, in units of A
    activation_overhead_blocks: float = 1.7  # activations independent of depth, in units of A
    frozen_updates: str = "none"             # one of FROZEN_UPDATES

    def __post_init__(self) -> None:
        if self.frozen_updates not in FROZEN_UPDATES:
            raise ValueError(f"frozen_updates must be one of {', '.join(FROZEN_UPDATES)}, got {self.frozen_updates!r}")

    def activations_per_block(self, g: ModelGeometry) -> int:
        return activation_bytes_per_block(self.batch_size, self.seq_len, g.hidden, g.heads)

    def lora_params(self, g: ModelGeometry, plan: AdapterPlan) -> int:
        """Adapter parameters on the device: A and B of every LoRA module (plus Fed-SB's cores),
        or what the plan's adapter kind puts there per unit of rank (LoHa: two such pairs)."""
        ranks = plan_ranks(plan, g.num_blocks)
        cores = sum(ranks[b] ** 2 for b, _, _, _ in g.modules if b in ranks) if plan.core else 0
        per_rank = adapter_kind(plan.kind).params_per_rank
        return per_rank * sum(ranks[b] * (i + o) for b, _, i, o in g.modules if b in ranks) + cores

    def trained_params(self, g: ModelGeometry, plan: AdapterPlan) -> int:
        """The adapter parameters the device trains and sends back: all of them, B only
        (FFA-LoRA's ``freeze_a``) or the r x r cores only (Fed-SB's ``core``)."""
        ranks = plan_ranks(plan, g.num_blocks)
        if plan.core:
            return sum(ranks[b] ** 2 for b, _, _, _ in g.modules if b in ranks)
        if plan.freeze_a:
            return sum(ranks[b] * o for b, _, _, o in g.modules if b in ranks)
        return self.lora_params(g, plan)

    def depth(self, g: ModelGeometry, plan: AdapterPlan) -> int:
        """Blocks the backward pass crosses: from the lowest LoRA block to the top."""
        ranks = plan_ranks(plan, g.num_blocks)
        return g.num_blocks - min(ranks) if ranks else 0

    def frozen_update_elements(self, g: ModelGeometry, plan: AdapterPlan, global_plan: AdapterPlan | None = None) -> int:
        """Elements of the dense updates of frozen weights a client on ``plan`` may be sent, with
        ``global_plan`` the global adapter's (default: ``plan``): on every module of the global
        adapter ("all"), on those where ``plan`` has a lower rank than the global adapter
        ("remainder"), or none. A bound: an update that is zero is not sent."""
        if self.frozen_updates == "none":
            return 0
        everywhere = plan_ranks(global_plan or plan, g.num_blocks)
        if self.frozen_updates == "all":
            return sum(i * o for b, _, i, o in g.modules if b in everywhere)
        own = plan_ranks(plan, g.num_blocks)
        return sum(i * o for b, _, i, o in g.modules if own.get(b, 0) < everywhere.get(b, 0))

    def memory_bytes(self, g: ModelGeometry, plan: AdapterPlan, global_plan: AdapterPlan | None = None) -> int:
        """Peak bytes of a device training ``plan`` (``global_plan``: the global adapter it is a
        part of, for the updates of frozen weights it may be sent)."""
        activations = self.activations_per_block(g) * (self.activation_scale * self.depth(g, plan) + self.activation_overhead_blocks)
        # trained parameters: weight, gradient and two AdamW moments; frozen adapter factors: weight
        trained = self.trained_params(g, plan) + g.head_params
        frozen = self.lora_params(g, plan) - self.trained_params(g, plan)
        base = g.base_bytes or 4 * g.base_params  # the base as held (int8, 4-bit) or in fp32
        # an update of a frozen weight: float32 beside a quantized weight, or a new float weight
        # (the shared frozen base keeps the original)
        held_updates = 4 * self.frozen_update_elements(g, plan, global_plan)
        return int(base + held_updates + 16 * trained + 4 * frozen + activations)

    def flops_per_step(self, g: ModelGeometry, plan: AdapterPlan, backward_factor: float | None = None) -> float:
        tokens = self.batch_size * self.seq_len
        factor = self.backward_factor if backward_factor is None else backward_factor
        forward = 2.0 * g.block_params * g.num_blocks * tokens
        backward = factor * 2.0 * g.block_params * self.depth(g, plan) * tokens
        return forward + backward + 6.0 * self.lora_params(g, plan) * tokens

    def bytes_down(self, g: ModelGeometry, plan: AdapterPlan) -> int:
        """What a client receives: the whole adapter (frozen factors included)."""
        return 4 * (self.lora_params(g, plan) + g.head_params)

    def bytes_up(self, g: ModelGeometry, plan: AdapterPlan) -> int:
        """What a client sends back: what it trained."""
        return 4 * (self.trained_params(g, plan) + g.head_params)

    def round_seconds(self, g: ModelGeometry, plan: AdapterPlan, caps: Capabilities) -> float:
        """Compute plus transfer time of one round on ``caps`` (inf when a figure is unknown)."""
        if caps.flops_per_second <= 0:
            return float("inf")
        factor = caps.backward_factor if caps.backward_factor > 0 else None  # the device's own, if measured
        seconds = self.local_steps * self.flops_per_step(g, plan, factor) / caps.flops_per_second
        for nbytes, rate in ((self.bytes_down(g, plan), caps.downlink_bytes_per_second), (self.bytes_up(g, plan), caps.uplink_bytes_per_second)):
            seconds += nbytes / rate if rate > 0 else 0.0
        return seconds


def resolve_targets(base: torch.nn.Module, plan: AdapterPlan) -> AdapterPlan:
    """``plan`` with its target modules made explicit: the config's, checked against ``base``,
    or the default for the architecture (``default_target_modules``). ValueError naming
    ``lora.target_modules`` when they do not fit."""
    if plan.target_modules:
        check_target_modules(base, plan.target_modules)
        return plan
    return replace(plan, target_modules=default_target_modules(base))


def model_geometry(base, plan: AdapterPlan) -> tuple[ModelGeometry, AdapterPlan]:
    """The cost model's view of ``base``, and ``plan`` with its target modules made explicit
    (``resolve_targets``)."""
    plan = resolve_targets(base, plan)
    head = sum(p.numel() for n, p in base.named_parameters() if n.split(".")[0] in ("classifier", "score"))
    return ModelGeometry.from_model(base, plan.target_modules, head_params=head), plan


def plan_ranks(plan: AdapterPlan, num_blocks: int) -> dict[int, int]:
    """Block index -> rank for every block that carries LoRA under ``plan``."""
    layers = plan.layers or tuple(range(num_blocks))
    return {layer: plan.rank_per_layer.get(layer, plan.rank) for layer in layers}
