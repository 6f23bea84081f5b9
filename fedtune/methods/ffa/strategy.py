"""FFA-LoRA (Sun et al., 2024): freeze every A at its random initialization and train and send
only B (and trained heads).

Training A and B together and averaging them separately is not the average of the products;
with A fixed and shared, ``mean(B_i) @ A`` is exactly the mean of the clients' ``B_i @ A``, so
aggregation is exact, the upload halves, and (the paper's point) there is no product of two
noisy factors to amplify the noise of differential privacy. Every client receives the global A
each round and freezes it (the plan's ``freeze_a``); what the inner strategy aggregates is B.
Refused by strategies that rebuild A each round (flexlora, flora). Turned on with
``lora.variant = "ffa"``.

FedSVD (``lora.variant = "fedsvd"``) trains the same way, and after each round re-factorizes
every module's product B @ A by SVD: the new A is an orthonormal basis of the product's row
space, so the frozen A follows what the federation learned instead of staying random. The
product, and so the global model, is unchanged by the re-factorization; under DP it is
post-processing of the released aggregate and costs no privacy.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from fedtune.aggregation.base import VARIANTS, Instruction, RoundContext, Variant, map_instructions
from fedtune.contract.properties import declare
from fedtune.names import A_SUFFIX, B_SUFFIX, ends_with, lora_modules


@VARIANTS.register("ffa")
class FFALoRA(Variant):
    """FFA-LoRA: A frozen at its initialization, only B trained and sent."""

    name = "ffa"
    weighted_mean = True
    declares = declare(provides={"a-frozen"}, refuses={
        "b-kept-on-device": "it sends only B and federation.share_a only A: nothing LoRA would be shared"})

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        def freeze_a(ins: Instruction) -> Instruction:
            expect = {n: s for n, s in ins.expect.items() if not ends_with(n, A_SUFFIX)}
            return dataclasses.replace(ins, plan=dataclasses.replace(ins.plan, freeze_a=True), expect=expect)

        return map_instructions(self.inner.configure(ctx, state), freeze_a)

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The inner strategy's, less A: nobody trains it, so client-level DP must not noise it
        and a server optimizer has nothing to step."""
        return [n for n in self.inner.server_params(state) if not ends_with(n, A_SUFFIX)]


@VARIANTS.register("fedsvd")
class FedSVD(FFALoRA):
    """FedSVD: clients train B with A frozen (as FFA-LoRA); after each round the coordinator
    re-factorizes every module's B @ A by SVD, so the next round's A is an orthonormal basis of
    the product's row space and B carries the singular values."""

    name = "fedsvd"
    weighted_mean = False  # its B and A are re-factorized from the mean product
    declares = FFALoRA.declares | declare(provides={"refactorized", "refactorized-state"}, refuses={"mixed-shapes": "fedsvd re-factorizes one global rank"})

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates):
        new_state, metrics = self.inner.aggregate(ctx, state, updates)
        return {**new_state, **refactorize(new_state)}, metrics


def refactorize(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For every LoRA module: (B, A) -> (U S, V^T) from the SVD of B @ A, truncated to the rank:
    the same product, with A's rows orthonormal (FedSVD's re-factorization)."""
    out = {}
    for module in lora_modules(state):
        a, b = state[module + A_SUFFIX], state[module + B_SUFFIX]
        rank = a.shape[0]
        u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
        out[module + A_SUFFIX] = vh[:rank].to(a.dtype).contiguous()
        out[module + B_SUFFIX] = (u[:, :rank] * s[:rank]).to(b.dtype).contiguous()
    return out
