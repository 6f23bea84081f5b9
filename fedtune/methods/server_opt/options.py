"""The server optimizers' options: FedAvgM's (``MomentumOptions``), FedAdam's and FedYogi's
(``AdaptiveOptions``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MomentumOptions:
    inner: str = "fedavg"
    server_lr: float = 1.0
    beta1: float = 0.9

    def __post_init__(self) -> None:
        if self.server_lr <= 0:
            raise ValueError("server_lr must be positive")
        if not 0 <= self.beta1 < 1:
            raise ValueError("beta1 must be in [0, 1)")


@dataclass(frozen=True)
class AdaptiveOptions:
    inner: str = "fedavg"
    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.server_lr <= 0 or self.tau <= 0:
            raise ValueError("server_lr and tau must be positive")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
