"""FedSA-LoRA (Guo et al., 2024): share A, keep B.

The A matrices learn what is common to all clients and the B matrices what is particular to
each, so only A (and trained heads) are sent and aggregated; every client keeps its own B on the
device between rounds (the recipe option ``keep``). Wraps any strategy that can aggregate
without B (``fedavg``, ``hetlora`` and wrappers around them); the coordinator refuses the
others at start (``Strategy.share_a_refusal``). Turned on with ``federation.share_a``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from fedtune.aggregation.base import Instruction, RoundContext, Wrapper, map_instructions
from fedtune.contract.properties import declare
from fedtune.methods.fedsa.options import FedSAOptions
from fedtune.names import B_SUFFIX, ends_with


class FedSA(Wrapper):
    """FedSA-LoRA: clients keep B and evaluate their personalized models (see the module doc).

    The coordinator's central evaluation sees the shared A and heads with the initial B; what a
    client really uses is A with its own B, which clients evaluate on held-out local data at
    the start of each round: row t of metrics.jsonl then reports ``personal_eval_*`` (mean and
    spread over clients) for the models after round t - 1. The models after the last round are
    evaluated in an evaluation-only round that follows it (``configure_evaluation``)."""

    name = "fedsa"
    weighted_mean = True
    Options = FedSAOptions

    declares = declare(provides={"b-kept-on-device"})

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        def keep_b(ins: Instruction) -> Instruction:
            expect = {n: s for n, s in ins.expect.items() if not ends_with(n, B_SUFFIX)}
            return dataclasses.replace(ins, expect=expect, options={**ins.options, "keep": B_SUFFIX, "personal_eval": str(self.options.personal_eval)})

        return map_instructions(self.inner.configure(ctx, state), keep_b)

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The inner strategy's, less B: clients keep it, so nobody sends it, client-level DP
        must not noise it and a server optimizer has nothing to step."""
        return [n for n in self.inner.server_params(state) if not ends_with(n, B_SUFFIX)]

    def configure_evaluation(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        """Each client evaluates the final global A with its own B; nothing is trained or sent
        back but the metrics. None when personalized evaluation is off."""
        if self.options.personal_eval <= 0:
            return {}

        def evaluate_only(ins: Instruction) -> Instruction:
            return dataclasses.replace(ins, expect={}, options={**ins.options, "evaluate_only": "true"})

        return map_instructions(self.configure(ctx, state), evaluate_only)
