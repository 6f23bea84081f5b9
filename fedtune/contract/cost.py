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
    frozen weights ``4 * N_base``
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

_BLOCK = re.compile(r"\.(\d+)\.")


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

    @classmethod
    def from_model(cls, model: torch.nn.Module, target_modules: Sequence[str], head_params: int = 0) -> "ModelGeometry":
        config = model.config
        num_blocks = next(getattr(config, a) for a in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, a))
        hidden = next(getattr(config, a) for a in ("hidden_size", "n_embd", "d_model") if hasattr(config, a))
        heads = next(getattr(config, a) for a in ("num_attention_heads", "n_head") if hasattr(config, a))
        targets = tuple(target_modules)
        modules, per_block = [], [0] * num_blocks
        for name, module in model.named_modules():
            match = _BLOCK.search(name + ".")
            if match is None or int(match.group(1)) >= num_blocks:
                continue
            block = int(match.group(1))
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
                modules.append((block, name, module.in_features, module.out_features))
        for name, p in model.named_parameters():
            match = _BLOCK.search(name)
            if match is not None and int(match.group(1)) < num_blocks:
                per_block[int(match.group(1))] += p.numel()
        if not modules:
            raise ValueError(f"no Linear modules named {list(targets)} inside numbered blocks")
        return cls(
            num_blocks=num_blocks,
            hidden=hidden,
            heads=heads,
            base_params=sum(p.numel() for p in model.parameters()),
            block_params=max(per_block),
            modules=tuple(modules),
            head_params=head_params,
        )


def activation_bytes_per_block(batch_size: int, seq_len: int, hidden: int, heads: int) -> int:
    """A: Korthikanti et al.'s activation bytes of one transformer block, doubled for fp32."""
    return 4 * batch_size * seq_len * (34 * hidden + 5 * heads * seq_len)


@dataclass(frozen=True)
class CostModel:
    batch_size: int
    seq_len: int
    local_steps: int
    backward_factor: float = 0.6             # backward FLOPs of a crossed frozen block / its forward
    activation_scale: float = 0.9            # activations kept per crossed block, in units of A
    activation_overhead_blocks: float = 1.7  # activations independent of depth, in units of A

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

    def memory_bytes(self, g: ModelGeometry, plan: AdapterPlan) -> int:
        activations = self.activations_per_block(g) * (self.activation_scale * self.depth(g, plan) + self.activation_overhead_blocks)
        # trained parameters: weight, gradient and two AdamW moments; frozen adapter factors: weight
        trained = self.trained_params(g, plan) + g.head_params
        frozen = self.lora_params(g, plan) - self.trained_params(g, plan)
        return int(4 * g.base_params + 16 * trained + 4 * frozen + activations)

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


def model_geometry(base, plan: AdapterPlan) -> tuple[ModelGeometry, AdapterPlan]:
    """The cost model's view of ``base``, and ``plan`` with its target modules made explicit
    (peft's default for the architecture when the config names none)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    targets = plan.target_modules or tuple(DEFAULT_TARGETS.get(base.config.model_type, ()))
    if not targets:
        raise ValueError(f"lora.target_modules: no default for model type {base.config.model_type!r}; name the modules")
    head = sum(p.numel() for n, p in base.named_parameters() if n.split(".")[0] in ("classifier", "score"))
    return ModelGeometry.from_model(base, targets, head_params=head), replace(plan, target_modules=tuple(targets))


def plan_ranks(plan: AdapterPlan, num_blocks: int) -> dict[int, int]:
    """Block index -> rank for every block that carries LoRA under ``plan``."""
    layers = plan.layers or tuple(range(num_blocks))
    return {layer: plan.rank_per_layer.get(layer, plan.rank) for layer in layers}
