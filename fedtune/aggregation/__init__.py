"""Aggregation strategies: pure functions of the global adapter and the clients' updates.

Strategies are chosen by name through ``STRATEGIES`` (unknown names are rejected). Each is a
small class whose ``aggregate`` does tensor math only, so it is tested with plain tensors.
"""

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Strategy, get_strategy, weighted_average
from fedtune.aggregation import fedavg, flexlora, flora, hetlora  # noqa: F401  (registers the strategies)

__all__ = ["STRATEGIES", "ClientUpdate", "Strategy", "get_strategy", "weighted_average"]
