"""SplitFed: split learning as a wrapper around a federated strategy.

Each selected client trains the bottom of the model (LoRA below its cut layer, and the head in
the U-shaped split) on the device and the rest in a session on the coordinator
(fedtune.split.server); the client sends only its side, the coordinator adds its session's side,
and the inner strategy aggregates whole adapters as in federated mode. The wrapper turns each
instruction into a split one: recipe ``split`` with the cut, the head placement and the codecs
of each direction, and ``expect`` narrowed to the client's side.

A client's cut: the deepest cut up to ``cut`` whose memory and modeled round time (device
compute, the coordinator's share, and the activation traffic over the device's links) fit the
device (fedtune.split.planning). The coordinator sets ``geometry`` and ``cost`` from the model;
without them every client gets ``cut``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch

from fedtune.aggregation.base import Instruction, RoundContext, Strategy, Wrapper
from fedtune.contract.properties import declare
from fedtune.devices import Capabilities
from fedtune.methods.split.options import SplitFedOptions, SplitOptions
from fedtune.split.planning import CutChoice, SplitCost, SplitGeometry, choose_cut
from fedtune.split.segments import client_side

log = logging.getLogger(__name__)


class SplitFed(Wrapper):
    name = "splitfed"
    Options = SplitFedOptions

    declares = declare(provides={"split-model", "own-procedure"}, refuses={
        "own-procedure": "split learning is the clients' training procedure; they cannot also train by another",
        "mixed-shapes": "a split client's cut comes from its device and its adapter from the one global plan",
        "b-kept-on-device": "the coordinator trains the blocks above each cut for the round only",
        "a-frozen": "the split recipe trains every LoRA factor below the cut",
        "b-frozen": "the split recipe trains every LoRA factor below the cut",
        "update-codec": "split clients stream activations each step; their update codec is AMAQ on that stream (split.act_codec)",
        "weight-codec": "split clients stream activations each step; their codec is AMAQ on that stream (split.act_codec)",
        "client-noise": "client-level DP would clip the device's half only, while the coordinator's half learns from every batch",
        "penalty": "the coordinator trains the blocks above the cut with the plain loss, so a penalty would hold for the device's half only",
    })

    def __init__(self, inner: Strategy, options: Any = None, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(inner, options, scale=scale, seed=seed)
        if self.options.head == "server":  # the labels travel with the activations
            self.declares = type(self).declares | declare(provides={"server-side-loss"})
        SplitOptions(**self._recipe_fields(self.options.cut))  # checks head and codecs now, not at round 1
        # Set by the coordinator from the model (fedtune.split.planning).
        self.geometry: SplitGeometry | None = None
        self.cost: SplitCost | None = None
        self.round_budget_s = float("inf")

    def _recipe_fields(self, cut: int, step0: int = 0) -> dict:
        """The split recipe's options for a client cut at ``cut`` (this wrapper's options, less
        its own bookkeeping, plus the cut and the round's first step)."""
        fields = dataclasses.asdict(self.options)
        del fields["local_steps"]
        o = self.options
        return {**fields, "cut": cut, "step0": step0, "start_bits": max(o.start_bits, o.act_bits, o.grad_bits)}

    def cut_for(self, caps: Capabilities, sessions: int = 1) -> CutChoice:
        """The client's cut layer from its reported capabilities (see the module docstring)."""
        if self.geometry is None or self.cost is None:
            return CutChoice(self.options.cut, True, 0, 0.0)
        cost = dataclasses.replace(self.cost, sessions=sessions)
        return choose_cut(self.geometry, cost, caps, self.options.cut, self.round_budget_s)

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        step0 = (ctx.number - 1) * self.options.local_steps
        instructions = self.inner.configure(ctx, state)
        out = {}
        for cid, ins in instructions.items():
            choice = self.cut_for(ctx.clients[cid].capabilities, sessions=len(instructions))
            cut = choice.cut
            if not choice.fits:
                log.warning("round %d: %s gets cut %d although it does not fit the device (modeled %.0f MB, %.1f s a round)",
                            ctx.number, cid, cut, choice.memory_bytes / 1e6, choice.round_seconds)
            fields = self._recipe_fields(cut, step0)
            # The split procedure replaces local training; corrections in front of it stay ("fedlc+split").
            corrections = ins.recipe.split("+")[:-1]
            options = {**ins.options, **{k: str(v) for k, v in fields.items()}, "recipe": "+".join([*corrections, "split"])}
            expect = {n: s for n, s in ins.expect.items() if client_side(n, cut, self.options.head == "client")}
            out[cid] = dataclasses.replace(ins, options=options, expect=expect)
        return out
