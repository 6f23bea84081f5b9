"""SCAFFOLD's options and the tensor names its strategy and recipe exchange. Its clients have no
options of their own (they read only those every recipe understands)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.options import MethodOptions

CONTROL = "scaffold.c"         # server state, and what a client receives: c of each tensor
CONTROL_DELTA = "scaffold.dc"  # what a client sends back: c_i+ - c_i of each tensor


@dataclass(frozen=True)
class ScaffoldOptions(MethodOptions):
    server_lr: float = 1.0  # x <- x + server_lr (x_avg - x)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.server_lr <= 0:
            raise ValueError("server_lr must be positive")
