"""FedLC's options: read by the strategy (which sends them) and the recipe (which trains with
them), checked by this one dataclass on both sides."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.options import MethodOptions

CALIBRATIONS = ("prior", "fedlc")


@dataclass(frozen=True)
class FedLCOptions(MethodOptions):
    tau: float = 1.0
    # "prior" (tau * log of the client's label prior) or "fedlc" (-tau * n_y ** -1/4)
    calibration: str = "prior"
    # Under DP-SGD: the noise multiplier of the label histogram the device releases once
    # (Gaussian std on counts of sensitivity 1). 10 costs little: alone, epsilon ~0.38 at delta
    # 1e-5 (one Gaussian mechanism, q = 1, one step); composed by RDP with a typical DP-SGD
    # history (sigma 1, q 0.01, 1000 steps: epsilon 2.10) it adds ~0.04. And it barely moves
    # the prior where it matters: a class with 300 examples gets log-prior noise ~10/300 = 0.03
    # nats; only classes with a few dozen examples or fewer are pulled toward the smoothed
    # uniform prior, which is what hiding any one example's label requires.
    prior_noise: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau < 0:
            raise ValueError("tau must be >= 0")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose one of: {', '.join(CALIBRATIONS)}")
        if self.prior_noise < 0:
            raise ValueError("prior_noise must be >= 0")
