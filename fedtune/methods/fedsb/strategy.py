"""Fed-SB (Singh et al., 2025): federated LoRA-SB. Every LoRA module's update is
``scale * B @ R @ A`` with B and A fixed for the whole run and only the small rank x rank core R
trained, sent and averaged (plus trained heads).

Because B and A are the same on every client, the mean of the clients' ``B @ R_i @ A`` is
exactly ``B @ mean(R_i) @ A``: averaging is exact, the upload is r^2 numbers per module whatever
the model width, and under DP the noise goes into r^2 numbers instead of two factors whose
product amplifies it.

B and A come from the truncated SVD of each pretrained weight (LoRA-XS's initialization, made by
``inject_lora`` for a plan with ``core``); LoRA-SB's reference code initializes them from a
gradient over all the training data instead, which a federation cannot compute without pooling
data, and which a DP accountant would have to count. The SVD uses no data and costs no privacy.
The coordinator draws B and A once (round 1's state) and sends them with R each round, so every
client trains around the same factors whatever its linear-algebra library. Turned on with
``lora.variant = "fedsb"``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from fedtune.aggregation.base import VARIANTS, Instruction, RoundContext, Variant, map_instructions
from fedtune.contract.properties import declare
from fedtune.names import A_SUFFIX, B_SUFFIX, CORE_SUFFIX, ends_with
from fedtune.options import OptionsError


@VARIANTS.register("fedsb")
class FedSB(Variant):
    """Fed-SB: B and A frozen, the cores R (and heads) trained and averaged by the inner strategy."""

    name = "fedsb"
    weighted_mean = True
    global_plan = {"core": True}  # the run's adapter has a core R between B and A

    declares = declare(provides={"a-frozen", "b-frozen"}, refuses={
        "mixed-shapes": "fedsb averages the cores of one global rank",
        "b-kept-on-device": "it sends only the cores R and federation.share_a only A: nothing LoRA would be shared",
    })

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(ends_with(n, CORE_SUFFIX) for n in adapter):
            raise OptionsError("lora.variant fedsb: the global adapter has no cores (its plan must have core = true)")
        return self.inner.initial_state(adapter)

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        def cores_only(ins: Instruction) -> Instruction:
            if not ins.plan.core:
                raise ValueError("lora.variant fedsb: a client was planned an adapter without cores")
            expect = {n: s for n, s in ins.expect.items() if not ends_with(n, (A_SUFFIX, B_SUFFIX))}
            return dataclasses.replace(ins, expect=expect)

        return map_instructions(self.inner.configure(ctx, state), cores_only)

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The inner strategy's, less the fixed factors: client-level DP noises only what
        clients train, and a server optimizer steps only that."""
        return [n for n in self.inner.server_params(state) if not ends_with(n, (A_SUFFIX, B_SUFFIX))]
