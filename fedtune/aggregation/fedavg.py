"""FedAvg (McMahan et al., 2017): the example-weighted mean of the clients' adapters."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Strategy, average_by_name, example_weights


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """Each tensor becomes the average of the clients that sent it, weighted by their example
    counts. A tensor nobody sent keeps its global value (a client that trained only some layers
    does not drag the others toward zero). All clients must share one rank."""

    name = "fedavg"

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        weights = dict(zip((u.client_id for u in updates), example_weights(updates)))
        return average_by_name(global_state, updates, list(global_state), weights)
