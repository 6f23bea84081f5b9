"""FlexLoRA's options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlexLoRAOptions:
    freeze_remainder: bool = True
