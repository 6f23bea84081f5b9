"""SplitFed: split learning as a wrapper around a federated strategy.

Each selected client trains the bottom of the model (LoRA below its cut layer, and the head in
the U-shaped split) on the device and the rest in a session on the coordinator
(fedtune.split.server); the client sends only its side, the coordinator adds its session's side,
and the inner strategy aggregates whole adapters as in federated mode. The wrapper turns each
instruction into a split one: recipe ``split`` with the cut, the head placement and the codecs
of each direction, and ``expect`` narrowed to the client's side.

A client's cut: ``cut`` when the device reports no memory, else the deepest cut whose bottom
(embeddings plus blocks, at ``block_bytes`` each, with ``max_cut`` as the ceiling) fits in its
memory. ``block_bytes`` and ``embed_bytes`` are measured on the model by the coordinator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fedtune.aggregation.base import Instruction, RoundContext, Strategy, Wrapper
from fedtune.options import OptionsError
from fedtune.split.segments import client_side


@dataclass(frozen=True)
class SplitFedOptions:
    cut: int = 1
    head: str = "client"
    act_codec: str = "amaq"
    act_bits: float = 4.0
    grad_codec: str = "amaq"
    grad_bits: float = 4.0
    start_bits: float = 8.0
    anneal_steps: int = 0
    reg_weight: float = 0.01
    gate_lr: float = 0.05
    local_steps: int = 1          # to number steps across rounds (AMAQ's schedule)


class SplitFed(Wrapper):
    name = "splitfed"
    Options = SplitFedOptions

    def __init__(self, inner: Strategy, options: Any = None, *, scale: float = 1.0, seed: int = 0) -> None:
        if inner.recipe() != "local" or inner.heterogeneous:
            raise OptionsError(f"split.mode split: strategy {inner.name} needs its own client recipe or different ranks per client; use fedavg")
        super().__init__(inner, options, scale=scale, seed=seed)
        from fedtune.client.recipes.split import SplitOptions

        SplitOptions(**self._recipe_fields(self.options.cut))  # checks head and codecs now, not at round 1
        self.blocks = 0        # set by the coordinator from the model
        self.block_bytes = 0
        self.embed_bytes = 0

    def _recipe_fields(self, cut: int, step0: int = 0) -> dict:
        """The split recipe's options for a client cut at ``cut`` (this wrapper's options, less
        its own bookkeeping, plus the cut and the round's first step)."""
        fields = dataclasses.asdict(self.options)
        del fields["local_steps"]
        o = self.options
        return {**fields, "cut": cut, "step0": step0, "start_bits": max(o.start_bits, o.act_bits, o.grad_bits)}

    def cut_for(self, memory_bytes: int) -> int:
        """The client's cut layer from the memory it reports (see the module docstring)."""
        o = self.options
        ceiling = min(o.cut, self.blocks - 1) if self.blocks else o.cut
        if not memory_bytes or not self.block_bytes:
            return ceiling
        fits = (memory_bytes - self.embed_bytes) // self.block_bytes
        return int(max(1, min(ceiling, fits)))

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        step0 = (ctx.number - 1) * self.options.local_steps
        instructions = self.inner.configure(ctx, state)
        out = {}
        for cid, ins in instructions.items():
            cut = self.cut_for(ctx.clients[cid].capabilities.memory_bytes)
            fields = self._recipe_fields(cut, step0)
            options = {**ins.options, **{k: str(v) for k, v in fields.items()}, "recipe": "split"}
            expect = {n: s for n, s in ins.expect.items() if client_side(n, cut, self.options.head == "client")}
            out[cid] = dataclasses.replace(ins, options=options, expect=expect)
        return out
