"""LoHa as an adapter kind (``fedtune.contract.adapter_kinds``): what peft builds on a module, the
four factors a client trains and sends, and the update they stand for.

peft's LoHa module keeps, per target module, ``hada_w1_a`` (out x r), ``hada_w1_b`` (r x in),
``hada_w2_a`` (out x r) and ``hada_w2_b`` (r x in); its update is
``(alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)``. peft starts ``w2_b`` at zero, so the adapter adds
nothing until it trains, as LoRA's zero B does.

Both factors of each pair run over the rank (columns of ``*_a``, rows of ``*_b``): the leading r'
slots of a rank-r LoHa are a LoHa of rank r', so a device of smaller rank trains a leading slice
of the global adapter as with LoRA, and slot-wise means stay defined (``sliced-state``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from fedtune.contract.adapter_kinds import ADAPTER_KINDS, AdapterKind
from fedtune.contract.plans import AdapterPlan

W1_A, W1_B, W2_A, W2_B = ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"


@ADAPTER_KINDS.register("loha")
class LoHa(AdapterKind):
    """LoHa: ``scale * (W1a @ W1b) * (W2a @ W2b)``, two rank-r pairs per module."""

    factors = {W1_A: 1, W1_B: 0, W2_A: 1, W2_B: 0}
    params_per_rank = 2  # two pairs of r x (in + out)

    def peft_config(self, plan: AdapterPlan, *, task_type: Any, rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float]) -> Any:
        from peft import LoHaConfig

        where = self.placement(plan, task_type=task_type, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        # peft's LoHa has no dropout on its input (LoRA's); it drops rank slots of the update
        return LoHaConfig(alpha=plan.alpha, rank_dropout=plan.dropout, **where)

    def delta(self, tensors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
        first = tensors[module + W1_A].double() @ tensors[module + W1_B].double()
        second = tensors[module + W2_A].double() @ tensors[module + W2_B].double()
        return first * second
