"""FedProx (Li et al., 2020): clients add a proximal term (mu / 2) ||w - w_global||^2 to their
loss, which keeps local training near the global model under heterogeneous data. The server
side is the inner aggregation unchanged; the term lives in the client recipe ``fedprox``."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.aggregation.base import STRATEGIES, InnerOption, RecipeWrapper
from fedtune.contract.properties import declare
from fedtune.methods.fedprox.options import FedProxOptions
from fedtune.options import option_names


@dataclass(frozen=True)
class FedProxStrategyOptions(FedProxOptions, InnerOption):
    """FedProx's options and the strategy it wraps."""


@STRATEGIES.register("fedprox")
class FedProx(RecipeWrapper):
    """Clients add a proximal term (mu / 2) ||w - w_global||^2 to their loss (Li et al., 2020)."""

    name = "fedprox"
    weighted_mean = True
    Options = FedProxStrategyOptions
    recipe_name = "fedprox"
    declares = RecipeWrapper.declares | declare(provides={"penalty"})
    client_options = tuple(option_names(FedProxOptions))  # all of them go to the clients
