"""Adapter plans: where LoRA goes on a model and how large it is. The coordinator plans one per
device and sends it (``fedtune.protocol.messages``); the device builds its adapter from it
(``fedtune.adapters``); the cost model prices it (``fedtune.contract.cost``). A plain dataclass,
so every layer can read one without loading peft."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

from fedtune.names import A_SUFFIX, B_SUFFIX


class AdapterError(ValueError):
    """An adapter plan that does not fit the model, or a state that does not fit the adapter."""


@dataclass(frozen=True)
class AdapterPlan:
    """Where the adapter goes, its form and how large it is. Empty tuples mean "peft's
    default"/"every block"."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    # block index -> rank, overriding `rank` for those blocks
    rank_per_layer: Mapping[int, int] = field(default_factory=dict)
    # FFA-LoRA: every A stays frozen at the value it is given; only B (and heads) train.
    freeze_a: bool = False
    # Fed-SB (LoRA-SB): B and A frozen (initialized from the truncated SVD of the pretrained
    # weight), a rank x rank core R between them trained (update scale * B @ R @ A).
    core: bool = False
    # The adapter's form (``fedtune.contract.adapter_kinds``): "lora", or a kind a method folder
    # registers, such as "loha" (FedPara's Hadamard product of two low-rank products).
    kind: str = "lora"

    def __post_init__(self) -> None:
        if not self.kind or not self.kind.replace("_", "").replace("-", "").isalnum():
            raise AdapterError(f"adapter kind must be a plain name, got {self.kind!r}")
        if self.rank < 1:
            raise AdapterError(f"rank must be at least 1, got {self.rank}")
        if any(r < 1 for r in self.rank_per_layer.values()):
            raise AdapterError(f"every per-layer rank must be at least 1, got {dict(self.rank_per_layer)}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """The LoRA scale alpha / rank, the same on every layer: a layer of rank r gets alpha
        ``scale * r``, so products B @ A of different ranks add up directly."""
        return self.alpha / self.rank

    @property
    def frozen_factors(self) -> tuple[str, ...]:
        """Name suffixes of the LoRA factors this plan keeps frozen (never trained, never sent
        back): A with ``freeze_a``, A and B with ``core``."""
        if self.core:
            return (A_SUFFIX, B_SUFFIX)
        return (A_SUFFIX,) if self.freeze_a else ()

    def key(self) -> tuple:
        """A hashable identity (plans with equal keys build identical adapters)."""
        return (
            self.rank, self.alpha, self.dropout, self.target_modules, self.layers,
            self.modules_to_save, tuple(sorted(self.rank_per_layer.items())), self.freeze_a, self.core, self.kind,
        )

    def to_json(self) -> dict:
        data = asdict(self)
        data["rank_per_layer"] = {str(k): v for k, v in self.rank_per_layer.items()}
        return data
