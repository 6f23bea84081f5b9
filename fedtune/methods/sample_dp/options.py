"""Sample-level DP's options on the coordinator; the devices read theirs as the ``dp_*``
options every recipe understands (``fedtune.contract.local_options``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleDPOptions:
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    budget: float = 0.0
    # Instead of noise_multiplier: each device picks the smallest sigma that spends at most this
    # over total_steps steps at its own sample rate.
    target_epsilon: float = 0.0
    total_steps: int = 0
    # Research mode: devices draw batch masks and noise from the round's seed (see
    # fedtune.privacy.randomness); a device accepts it only where its own policy allows.
    repeatable: bool = False
    allow_large_delta: bool = False   # devices proceed although delta >= 1/n for their n examples

    def __post_init__(self) -> None:
        if self.target_epsilon < 0 or (self.target_epsilon and self.total_steps < 1):
            raise ValueError("target_epsilon must be >= 0 and needs total_steps")
        if self.clip <= 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.budget < 0:
            raise ValueError(f"the epsilon budget must be >= 0, got {self.budget}")
