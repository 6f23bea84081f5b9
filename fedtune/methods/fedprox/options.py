"""FedProx's options: read by the strategy (which sends them) and the recipe (which trains with
them)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.options import MethodOptions


@dataclass(frozen=True)
class FedProxOptions(MethodOptions):
    mu: float = 0.01  # weight of the proximal term (mu / 2) ||w - w_global||^2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise ValueError("mu must be >= 0")
