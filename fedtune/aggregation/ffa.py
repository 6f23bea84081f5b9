"""FFA-LoRA (Sun et al., 2024): freeze every A at its random initialization and train and send
only B (and trained heads).

Training A and B together and averaging them separately is not the average of the products;
with A fixed and shared, ``mean(B_i) @ A`` is exactly the mean of the clients' ``B_i @ A``, so
aggregation is exact, the upload halves, and (the paper's point) there is no product of two
noisy factors to amplify the noise of differential privacy. Every client receives the global A
each round and freezes it (the plan's ``freeze_a``); what the inner strategy aggregates is B.
Refused by strategies that rebuild A each round (flexlora, flora). Turned on with
``lora.variant = "ffa"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from fedtune.aggregation.base import Instruction, RoundContext, Strategy, Wrapper, map_instructions
from fedtune.names import A_SUFFIX
from fedtune.options import OptionsError


class FFALoRA(Wrapper):
    """FFA-LoRA: A frozen at its initialization, only B trained and sent."""

    name = "ffa"

    def __init__(self, inner: Strategy, options: Any = None, *, scale: float = 1.0, seed: int = 0) -> None:
        if inner.freeze_a_refusal:
            raise OptionsError(f"lora.variant ffa: {inner.freeze_a_refusal}")
        super().__init__(inner, options, scale=scale, seed=seed)

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        def freeze_a(ins: Instruction) -> Instruction:
            expect = {n: s for n, s in ins.expect.items() if not n.endswith(A_SUFFIX)}
            return dataclasses.replace(ins, plan=dataclasses.replace(ins.plan, freeze_a=True), expect=expect)

        return map_instructions(self.inner.configure(ctx, state), freeze_a)
