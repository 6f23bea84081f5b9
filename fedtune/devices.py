"""What a device reports about itself when it registers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    memory_bytes: int = 0                   # memory the device can give to training
    flops_per_second: float = 0.0           # sustained training throughput
    uplink_bytes_per_second: float = 0.0
    downlink_bytes_per_second: float = 0.0
    tier: str = ""                          # free-form label for logs ("phone", "laptop")
