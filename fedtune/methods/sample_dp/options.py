"""Sample-level DP's options: the devices' own DP-SGD settings (``DPSGDOptions``, the
``dp_*`` options every recipe understands), which the coordinator's wrapper sends under the same
names; the wrapper's only addition is that DP is on (a clip above zero)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.contract.local_options import DPSGDOptions


@dataclass(frozen=True)
class SampleDPOptions(DPSGDOptions):
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dp_clip <= 0:
            raise ValueError(f"dp_clip must be positive, got {self.dp_clip}")
