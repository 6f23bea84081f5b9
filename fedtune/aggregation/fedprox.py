"""FedProx (Li et al., 2020): clients add a proximal term (mu / 2) ||w - w_global||^2 to their
loss, which keeps local training near the global model under heterogeneous data. The server
side is the inner aggregation unchanged; the term lives in the client recipe ``fedprox``."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.aggregation.base import STRATEGIES, RecipeWrapper
from fedtune.contract.properties import declare


@dataclass(frozen=True)
class FedProxOptions:
    inner: str = "fedavg"
    mu: float = 0.01

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError("mu must be >= 0")


@STRATEGIES.register("fedprox")
class FedProx(RecipeWrapper):
    """Clients add a proximal term (mu / 2) ||w - w_global||^2 to their loss (Li et al., 2020)."""

    name = "fedprox"
    weighted_mean = True
    Options = FedProxOptions
    recipe_name = "fedprox"
    declares = RecipeWrapper.declares | declare(provides={"penalty"})
    client_options = ("mu",)
