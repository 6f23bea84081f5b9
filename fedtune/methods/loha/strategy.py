"""LoHa as a LoRA variant (``lora.variant = "loha"``): the run's plan gets LoHa's adapter kind, so
the coordinator's global adapter and every device's are LoHa, and the aggregation rule around it
averages LoHa's factors exactly as it averages LoRA's.

What composes, by what it declares: any aggregation that averages tensors slot by slot (fedavg,
hetlora, fedkseed, a server optimizer, client corrections), client-level DP, codecs, split
learning. Heterogeneous ranks are well defined: a device of rank r trains the leading r slots of
every pair, which is itself a LoHa of rank r; it sees that slice only (the HetLoRA paper's
setting), since the rest of a Hadamard product cannot be folded into frozen weights (the cross
terms ``P1 * T2 + T1 * P2`` of trained slice P and tail T move with P). Refused: strategies that
rebuild LoRA's B·A (flexlora, flora), FedSA-LoRA (it keeps LoRA's B on the device) and
sample-level DP (peft keeps LoHa's factors in parameter dicts that no forward call passes
through, so Opacus cannot record per-example gradients of them).
"""

from __future__ import annotations

from typing import Mapping

import torch

from fedtune.aggregation.base import VARIANTS, Instruction, RoundContext, Variant, map_instructions
from fedtune.contract.properties import declare


@VARIANTS.register("loha")
class LoHaVariant(Variant):
    """FedPara's LoHa adapters: the update of each module is a Hadamard product of two low-rank products."""

    name = "loha"
    weighted_mean = True  # the inner rule's mean of the factors, untouched
    global_plan = {"kind": "loha"}

    declares = declare(provides={"non-lora-adapter"}, refuses={
        "b-kept-on-device": "a LoHa adapter has no LoRA B to keep on the device",
        "sample-noise": "peft keeps LoHa's factors in parameter dicts outside any forward call, so Opacus cannot compute their per-example gradients",
        "quantized-base": "peft's LoHa layers multiply by the base weight as a dense matrix; they have no bitsandbytes (8/4-bit) support",
    })

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        def loha_only(ins: Instruction) -> Instruction:
            if ins.plan.kind != "loha":
                raise ValueError(f"lora.variant loha: a client was planned a {ins.plan.kind} adapter")
            return ins

        return map_instructions(self.inner.configure(ctx, state), loha_only)
