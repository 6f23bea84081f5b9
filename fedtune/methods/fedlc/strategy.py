"""FedLC (Zhang et al., 2022): logit calibration against label skew.

A client whose data is mostly one class learns to push the other classes' logits down, and the
averaged model inherits that bias. FedLC's clients train on logits shifted by their own label
distribution, so the local loss stops rewarding the local majority: by default
``z_y + tau * log p_y`` with p_y the client's smoothed label prior (``calibration = "prior"``),
or FedLC's ``z_y - tau * n_y ** (-1/4)`` (``calibration = "fedlc"``). Evaluation and inference
use the plain logits. The server side is the inner aggregation; the calibration lives in the
client recipe ``fedlc`` (sequence classification only).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.aggregation.base import STRATEGIES, InnerOption, RecipeWrapper
from fedtune.contract.properties import declare
from fedtune.methods.fedlc.options import FedLCOptions
from fedtune.options import option_names


@dataclass(frozen=True)
class FedLCStrategyOptions(FedLCOptions, InnerOption):
    """FedLC's options and the strategy it wraps."""


@STRATEGIES.register("fedlc")
class FedLC(RecipeWrapper):
    """Clients train on logits calibrated by their own label distribution (Zhang et al., 2022)."""

    name = "fedlc"
    weighted_mean = True
    Options = FedLCStrategyOptions
    recipe_name = "fedlc"
    declares = RecipeWrapper.declares | declare(
        needs={"class-logits": "fedlc calibrates class logits; it needs a sequence-classification task"},
        refuses={"server-side-loss": "fedlc calibrates the loss on the device, and here the coordinator computes it"},
    )
    client_options = tuple(option_names(FedLCOptions))  # all of them go to the clients
