"""Server optimizers: FedAvgM (Hsu et al., 2019) and FedAdam / FedYogi (Reddi et al., 2021).

Each wraps an aggregation (``inner``, FedAvg by default). The inner aggregate ``x_avg`` defines
the round's pseudo-gradient ``d = x_avg - x`` for every model tensor of the state (the inner
strategy's ``server_params``), and the server steps along it with its own optimizer:

- fedavgm:  m <- beta1 m + d;                              x <- x + lr m
- fedadam:  m <- beta1 m + (1 - beta1) d;  v <- beta2 v + (1 - beta2) d^2;
            x <- x + lr m / (sqrt(v) + tau)
- fedyogi:  as fedadam, but v <- v - (1 - beta2) d^2 sign(v - d^2)

as written in Reddi et al.'s Algorithm 2 (no bias correction; m and v start at zero). FedAvgM
with lr 1 and beta1 0 is the inner aggregation itself. The moments live in the state under
``server_opt.m/<tensor>`` and ``server_opt.v/<tensor>``, so they are checkpointed with it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, RoundContext, State, Wrapper
from fedtune.contract.properties import declare
from fedtune.methods.server_opt.options import AdaptiveOptions, MomentumOptions
from fedtune.names import namespaced

M, V = "server_opt.m", "server_opt.v"


class ServerOptimizer(Wrapper):
    """Steps the inner aggregation's pseudo-gradient with a server optimizer (see module doc)."""

    second_moment = False
    namespaces = (M, V)
    axis = "server-opt"
    declares = declare(refuses={
        "refactorized-state": "its moments are kept per coordinate of each factor across rounds, and the factors are re-factorized after every round"})

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        state = self.inner.initial_state(adapter)
        params = self.inner.server_params(state)
        state.update({namespaced(M, n): torch.zeros_like(state[n]) for n in params})
        if self.second_moment:
            state.update({namespaced(V, n): torch.zeros_like(state[n]) for n in params})
        return state

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        inner_state = self.inner_state(state)
        averaged, metrics = self.inner.aggregate(ctx, inner_state, updates)
        new_state = {**state, **averaged}
        sq = 0.0
        for name in self.inner.server_params(inner_state):
            x = inner_state[name].double()
            d = averaged[name].double() - x
            m = state[namespaced(M, name)].double()
            v = state[namespaced(V, name)].double() if self.second_moment else None
            step, m, v = self.step(d, m, v)
            new_state[name] = (x + step).to(inner_state[name].dtype)
            new_state[namespaced(M, name)] = m.to(inner_state[name].dtype)
            if v is not None:
                new_state[namespaced(V, name)] = v.to(inner_state[name].dtype)
            sq += float(d.square().sum())
        metrics["pseudo_gradient_norm"] = sq**0.5
        return new_state, metrics

    def step(self, d: torch.Tensor, m: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


@STRATEGIES.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum on the inner aggregation's pseudo-gradient (Hsu et al., 2019)."""

    name = "fedavgm"
    Options = MomentumOptions

    def step(self, d, m, v):
        m = self.options.beta1 * m + d
        return self.options.server_lr * m, m, None


@STRATEGIES.register("fedadam")
class FedAdam(ServerOptimizer):
    """Adam on the server, over the inner aggregation's pseudo-gradient (Reddi et al., 2021)."""

    name = "fedadam"
    Options = AdaptiveOptions
    second_moment = True

    def step(self, d, m, v):
        o = self.options
        m = o.beta1 * m + (1 - o.beta1) * d
        v = self.second(d, v)
        return o.server_lr * m / (v.sqrt() + o.tau), m, v

    def second(self, d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.options.beta2 * v + (1 - self.options.beta2) * d.square()


@STRATEGIES.register("fedyogi")
class FedYogi(FedAdam):
    """Yogi on the server: Adam with an additive second-moment update (Reddi et al., 2021)."""

    name = "fedyogi"

    def second(self, d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d2 = d.square()
        return v - (1 - self.options.beta2) * d2 * torch.sign(v - d2)
