"""FedAvg (McMahan et al., 2017): the example-weighted mean of the clients' adapters."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Strategy, weighted_average


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """Each tensor becomes the average of the clients that sent it, weighted by their example
    counts. A tensor nobody sent keeps its global value (a client that trained only some layers
    does not drag the others toward zero)."""

    name = "fedavg"

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        if not updates:
            return {k: v.clone() for k, v in global_state.items()}
        new_state = {}
        for name, current in global_state.items():
            senders = [u for u in updates if name in u.tensors]
            if not senders:
                new_state[name] = current.clone()
                continue
            weights = [float(u.num_examples) for u in senders]
            if sum(weights) == 0:  # every sender reported zero examples: count them equally
                weights = [1.0] * len(senders)
            new_state[name] = weighted_average([u.tensors[name] for u in senders], weights)
        return new_state
