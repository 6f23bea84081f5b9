"""Where to cut: the split-learning cost model and the choice of each device's cut layer.

A client cut at ``k`` runs the embeddings and blocks ``[0, k)`` with their LoRA (and the head
in the U-shaped split); the coordinator runs blocks ``[k, L)`` for every session at once. With
``T = batch_size * seq_len`` tokens per step (an upper bound: only real tokens travel), ``H``
the hidden width, ``P_b`` a block's frozen parameters and ``R_b`` its LoRA parameters:

- Device memory: frozen weights ``4 * (P_embed + k * P_b [+ P_head])``, the adapter with its
  gradient and AdamW moments ``16 * (k * R_b [+ head])``, and activations
  ``A * (activation_scale * k + activation_overhead_blocks)`` with the per-block ``A`` and the
  constants of the federated cost model (fedtune.contract.cost), which were calibrated
  on the same models.
- Device compute per step: ``(1 + backward_factor) * 2 * P_b * k * T + 6 * R_b * k * T``;
  the coordinator's the same for ``L - k`` blocks, shared by every session of the round.
- Activation traffic per step, each way: ``T * H`` elements at the direction's budget in bits
  (AMAQ's budget counts scales and bit map, so it is exact for AMAQ and uniform up to their
  scales). The plain split sends activations up and gradients down; the U-shaped one also
  sends the top activations down and their gradients up.
- Step time: device compute / device FLOP rate + coordinator compute x sessions / coordinator
  FLOP rate + up bytes / uplink + down bytes / downlink; a figure a device does not report (0)
  is left out. Round time: ``local_steps`` steps plus the device's half of the adapter down
  and up once.

The choice (``choose_cut``): the deepest cut up to ``max_cut`` whose memory fits the device
and whose modeled round time stays within the round budget. Deeper is preferred because every
block a device runs is one the shared coordinator does not, and activations deeper in the
network say less about the raw input. The activation traffic is the same at every cut (a
transformer's width does not change with depth), so a slow link cannot be helped by moving
the cut: it can only make a device miss the budget, which ``choose_cut`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.contract.cost import CostModel, activation_bytes_per_block, model_geometry, plan_ranks
from fedtune.contract.plans import AdapterPlan
from fedtune.devices import Capabilities
from fedtune.quantized_base import logical_numel
from fedtune.split.segments import anatomy


@dataclass(frozen=True)
class SplitGeometry:
    """What the split cost model needs to know about a model and its adapter plan."""

    num_blocks: int
    hidden: int
    heads: int
    embed_params: int
    block_params: int
    lora_per_block: int   # LoRA parameters of one block under the plan (the largest block)
    head_params: int
    first_lora_block: int = 0  # the lowest block holding a LoRA target: a cut must lie above it

    @classmethod
    def from_model(cls, model: torch.nn.Module, plan: AdapterPlan) -> "SplitGeometry":
        g, plan = model_geometry(model, plan)
        parts = anatomy(model)
        ranks = plan_ranks(plan, g.num_blocks)
        per_block = [sum(ranks[b] * (i + o) for b, _, i, o in g.modules if b == block and b in ranks) for block in range(g.num_blocks)]
        embed = _embedding_stage(model, parts.embed, parts.blocks)
        first = min(b for b, _, _, _ in g.modules)  # hybrid stacks (Nemotron-H): not every block has attention
        return cls(g.num_blocks, g.hidden, g.heads, sum(logical_numel(p) for p in embed.parameters()), g.block_params, max(per_block), g.head_params,
                   first_lora_block=first)


def _embedding_stage(model: torch.nn.Module, embed: torch.nn.Module, blocks: torch.nn.Module) -> torch.nn.Module:
    """The largest module around the input embeddings that holds no block (BERT's
    ``embeddings``, with positions and norm; Llama's ``embed_tokens`` alone)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    paths = {id(m): n for n, m in base.named_modules()}
    path, blocks_path = paths.get(id(embed)), paths.get(id(blocks))
    if path is None or blocks_path is None:
        return embed
    stage = path
    while "." in stage:
        parent = stage.rsplit(".", 1)[0]
        if blocks_path == parent or blocks_path.startswith(parent + "."):
            break
        stage = parent
    return base.get_submodule(stage)


@dataclass(frozen=True)
class SplitCost:
    batch_size: int
    seq_len: int
    local_steps: int
    act_bits: float = 4.0
    grad_bits: float = 4.0
    head_on_client: bool = True
    server_flops_per_second: float = 0.0  # 0: the coordinator's compute is not counted
    sessions: int = 1                     # clients the coordinator serves at once
    backward_factor: float = CostModel.backward_factor
    activation_scale: float = CostModel.activation_scale
    activation_overhead_blocks: float = CostModel.activation_overhead_blocks

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def client_memory_bytes(self, g: SplitGeometry, cut: int) -> int:
        head = g.head_params if self.head_on_client else 0
        activations = activation_bytes_per_block(self.batch_size, self.seq_len, g.hidden, g.heads) * (self.activation_scale * cut + self.activation_overhead_blocks)
        return int(4 * (g.embed_params + cut * g.block_params + head) + 16 * (cut * g.lora_per_block + head) + activations)

    def _flops(self, g: SplitGeometry, blocks: int) -> float:
        return (1 + self.backward_factor) * 2.0 * g.block_params * blocks * self.tokens + 6.0 * g.lora_per_block * blocks * self.tokens

    def client_flops_per_step(self, g: SplitGeometry, cut: int) -> float:
        return self._flops(g, cut)

    def server_flops_per_step(self, g: SplitGeometry, cut: int) -> float:
        return self._flops(g, g.num_blocks - cut)

    def bytes_per_step(self, g: SplitGeometry) -> tuple[float, float]:
        """(up, down) activation and gradient bytes of one step; the same at every cut."""
        elements = self.tokens * g.hidden
        act, grad = elements * self.act_bits / 8, elements * self.grad_bits / 8
        if self.head_on_client:
            return act + grad, act + grad
        return act + 8 * self.batch_size, grad  # labels travel with the activations

    def step_seconds(self, g: SplitGeometry, cut: int, caps: Capabilities) -> float:
        seconds = self.client_flops_per_step(g, cut) / caps.flops_per_second if caps.flops_per_second > 0 else 0.0
        if self.server_flops_per_second > 0:
            seconds += self.server_flops_per_step(g, cut) * max(self.sessions, 1) / self.server_flops_per_second
        up, down = self.bytes_per_step(g)
        seconds += up / caps.uplink_bytes_per_second if caps.uplink_bytes_per_second > 0 else 0.0
        seconds += down / caps.downlink_bytes_per_second if caps.downlink_bytes_per_second > 0 else 0.0
        return seconds

    def round_seconds(self, g: SplitGeometry, cut: int, caps: Capabilities) -> float:
        adapter = 4 * (cut * g.lora_per_block + (g.head_params if self.head_on_client else 0))
        seconds = self.local_steps * self.step_seconds(g, cut, caps)
        for rate in (caps.uplink_bytes_per_second, caps.downlink_bytes_per_second):
            seconds += adapter / rate if rate > 0 else 0.0
        return seconds


@dataclass(frozen=True)
class CutChoice:
    cut: int
    fits: bool             # False: even cut 1 exceeds the device's memory or the round budget
    memory_bytes: int
    round_seconds: float


def choose_cut(g: SplitGeometry, cost: SplitCost, caps: Capabilities, max_cut: int, round_budget_s: float) -> CutChoice:
    """The deepest cut in ``[1, max_cut]`` (and below the last block) that fits ``caps``; see the
    module docstring. Unknown memory (0) is not a limit. A cut leaves at least one block with
    LoRA targets on the device (``first_lora_block``): below that the device trains nothing."""
    floor = g.first_lora_block + 1
    ceiling = max(floor, min(max_cut, g.num_blocks - 1))

    def choice(cut: int) -> CutChoice:
        memory, seconds = cost.client_memory_bytes(g, cut), cost.round_seconds(g, cut, caps)
        fits = (not caps.memory_bytes or memory <= caps.memory_bytes) and seconds <= round_budget_s
        return CutChoice(cut, fits, memory, seconds)

    for cut in range(ceiling, floor - 1, -1):
        candidate = choice(cut)
        if candidate.fits:
            return candidate
    return choice(floor)

