"""FedAvg's options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FedAvgOptions:
    # Fold the part of the global adapter outside a client's plan into its frozen weights.
    freeze_remainder: bool = True
