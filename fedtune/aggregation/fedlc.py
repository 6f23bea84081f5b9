"""FedLC (Zhang et al., 2022): logit calibration against label skew.

A client whose data is mostly one class learns to push the other classes' logits down, and the
averaged model inherits that bias. FedLC's clients train on calibrated logits
``z_y - tau * n_y ** (-1/4)``, with ``n_y`` the client's own count of label y (at least 1):
rare local classes get their logits lowered during training, so the loss stops suppressing them.
Evaluation and inference use the plain logits. The server side is the inner aggregation; the
calibration lives in the client recipe ``fedlc`` (sequence classification only).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.aggregation.base import STRATEGIES, RecipeWrapper


@dataclass(frozen=True)
class FedLCOptions:
    inner: str = "fedavg"
    tau: float = 1.0

    def __post_init__(self) -> None:
        if self.tau < 0:
            raise ValueError("tau must be >= 0")


@STRATEGIES.register("fedlc")
class FedLC(RecipeWrapper):
    name = "fedlc"
    Options = FedLCOptions
    recipe_name = "fedlc"
    client_options = ("tau",)
