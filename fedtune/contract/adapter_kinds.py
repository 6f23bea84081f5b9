"""Adapter kinds: the form of the small trained update a plan puts on each target module.

A plan's ``kind`` names one (``AdapterPlan.kind``, "lora" by default). The kind says what peft
builds on a module (``peft_config``), which tensors it trains there and along which axis each one
runs over the rank (``factors``: what lets a client of rank r take the leading slice of a global
adapter of a larger rank), what dense update those tensors stand for (``delta``, for strategies
that weigh or compare modules by their update), and how many parameters a unit of rank costs
(``params_per_rank``, for the cost model).

Kinds register in ``ADAPTER_KINDS``; plain LoRA is registered here, any other kind by the method
folder that brings it (``fedtune/methods/<method>/adapter.py``, found on first lookup), so a new
adapter form touches its own folder only. Both sides read kinds: this module imports no peft
until a device or the coordinator builds an adapter.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch

from fedtune.contract.plans import AdapterError, AdapterPlan
from fedtune.names import ends_with
from fedtune.registry import Registry, UnknownNameError


class AdapterKind:
    """One adapter form. Subclasses set the class attributes and ``peft_config``."""

    name: ClassVar[str] = ""
    # name suffix of each trained tensor of a module -> the axis whose size is the rank
    factors: ClassVar[Mapping[str, int]] = {}
    # trained parameters per unit of rank on a module with ``in`` inputs and ``out`` outputs,
    # in units of ``in + out`` (LoRA: r * (in + out), so 1)
    params_per_rank: ClassVar[int] = 1

    def peft_config(self, plan: AdapterPlan, *, task_type: Any, rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float]) -> Any:
        """The peft config that builds this kind as ``plan`` says (``rank_pattern`` and
        ``alpha_pattern``: peft's per-module overrides, computed from the plan's per-block ranks)."""
        raise NotImplementedError

    @staticmethod
    def placement(plan: AdapterPlan, *, task_type: Any, rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float]) -> dict[str, Any]:
        """The peft config arguments every kind shares: where the adapter goes, its rank (per block
        too) and the task; a kind's ``peft_config`` adds its own (alpha, dropout) to them."""
        return dict(
            task_type=task_type,
            r=plan.rank,
            target_modules=list(plan.target_modules) or None,
            layers_to_transform=sorted(plan.layers) or None,
            modules_to_save=list(plan.modules_to_save) or None,
            rank_pattern=dict(rank_pattern),
            alpha_pattern=dict(alpha_pattern),
        )

    def check(self, plan: AdapterPlan) -> None:
        """Refuse (AdapterError) a plan this kind cannot build. ``freeze_a`` and ``core`` are
        options of LoRA's two factors: other kinds have neither."""
        if plan.freeze_a or plan.core:
            raise AdapterError(f"adapter kind {self.name}: freeze_a and core are options of LoRA's B and A, which a {self.name} adapter does not have")

    def delta(self, tensors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
        """The dense out x in update ``module``'s tensors stand for, before the scale, in float64."""
        raise NotImplementedError

    def is_factor(self, name: str) -> bool:
        """True for a tensor this kind trains on a module (not a head, not a recipe's tensor)."""
        return ends_with(name, tuple(self.factors))

    def modules(self, names: Iterable[str]) -> list[str]:
        """The modules that have every factor of this kind among ``names``."""
        names = set(names)
        first = next(iter(self.factors))
        found = (n[: -len(first)] for n in names if ends_with(n, first))
        return sorted(m for m in found if all(m + s in names for s in self.factors))


def _discover() -> None:
    from fedtune.methods import discover

    discover("adapter")


ADAPTER_KINDS: Registry[type[AdapterKind]] = Registry("adapter kind", discover=_discover)


def adapter_kind(name: str) -> AdapterKind:
    """The kind registered as ``name``; AdapterError listing the valid names for any other."""
    try:
        return ADAPTER_KINDS.get(name)()
    except UnknownNameError:
        raise AdapterError(f"unknown adapter kind {name!r}; choose one of: {', '.join(ADAPTER_KINDS.available())}") from None


@ADAPTER_KINDS.register("lora")
class LoRA(AdapterKind):
    """LoRA (Hu et al., 2021): ``scale * B @ A`` with A rank x in and B out x rank."""

    factors = {".lora_A.weight": 0, ".lora_B.weight": 1}
    params_per_rank = 1

    def peft_config(self, plan: AdapterPlan, *, task_type: Any, rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float]) -> Any:
        from peft import LoraConfig

        where = self.placement(plan, task_type=task_type, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        return LoraConfig(lora_alpha=plan.alpha, lora_dropout=plan.dropout, **where)

    def check(self, plan: AdapterPlan) -> None:
        return None  # LoRA has every option of a plan

    def delta(self, tensors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
        return tensors[module + ".lora_B.weight"].double() @ tensors[module + ".lora_A.weight"].double()
