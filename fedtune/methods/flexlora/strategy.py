"""FlexLoRA (Bai et al., 2024): average the clients' full updates, hand each client the best
approximation its rank allows.

The state keeps, for every LoRA module, the dense weighted mean of what the clients' adapters
do, ``<module>.lora_delta`` (B @ A, without the LoRA scale), so nothing is lost to rank
truncation on the server. A client of rank r starts from the truncated SVD of that mean:
B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, the best rank-r approximation (Eckart-Young). Where the
mean has fewer than r directions (round 1: it is zero), the remaining rows of A come from the
run's initial LoRA A and B is zero there, so those directions can still learn.

Exactness: with ``freeze_remainder`` (default) the client also gets what its rank leaves out,
the SVD tail, folded into its frozen weights, and aggregation adds that same remainder back to
its product: the client's contribution is the full matrix it trained inside,
``B_k A_k + remainder_k``. A client that returns what it got therefore leaves the mean
unchanged. Without it, clients see only their truncation and the mean is over ``B_k A_k`` alone
(the paper's setting).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Instruction, RoundContext, State, Strategy, mean_over_senders, share_by_plan, weighted_train_loss, weights_by_client
from fedtune.aggregation.lora_math import low_rank, truncate, weighted_average
from fedtune.contract.properties import declare
from fedtune.methods.flexlora.options import FlexLoRAOptions
from fedtune.names import A_SUFFIX, B_SUFFIX, DENSE_DELTA, FROZEN_A, FROZEN_B, INIT_A, ends_with, is_lora, lora_modules


@STRATEGIES.register("flexlora")
class FlexLoRA(Strategy):
    """Dense mean of the clients' updates, redistributed by truncated SVD (Bai et al., 2024)."""

    name = "flexlora"
    Options = FlexLoRAOptions
    axis = "aggregation"
    declares = declare(provides={"mixed-shapes", "nonlinear-aggregate", "refactorized"}, refuses={
        "b-kept-on-device": "flexlora averages the products B·A of the clients, which needs every client's B",
        "a-frozen": "flexlora re-factorizes the mean product B·A every round, which gives every client a new A",
        "non-lora-adapter": "flexlora re-factorizes the mean update into LoRA's B·A by SVD",
    })

    def __init__(self, options=None, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(options, scale=scale, seed=seed)
        if self.options.freeze_remainder:  # the mean's rank exceeds any client's: every client gets a rest
            self.declares = self.declares | declare(provides={"frozen-weight-updates"})

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        state = {k: v.clone() for k, v in adapter.items() if not is_lora(k)}
        for module in lora_modules(adapter):
            a, b = adapter[module + A_SUFFIX], adapter[module + B_SUFFIX]
            state[module + DENSE_DELTA] = (b.double() @ a.double()).to(a.dtype)
            state[module + INIT_A] = a.clone()
        return state

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        return [n for n in state if not ends_with(n, INIT_A)]

    # ---------------------------------------------------------------- the rank-r view of a module

    @staticmethod
    def factors(dense: torch.Tensor, init_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(A, B) of rank ``rank`` from a module's dense mean, and the rest of the mean as
        low-rank factors (frozen B, frozen A): B @ A + frozen B @ frozen A = the mean. The rest
        is None when the rank holds the whole mean; rank 0 leaves all of it to the rest."""
        b_all, a_all, _ = low_rank(dense)           # numerical rank; float64
        kept = min(rank, a_all.shape[0])
        a = init_a[:rank].double().clone()
        b = torch.zeros(dense.shape[0], rank, dtype=torch.float64)
        a[:kept] = a_all[:kept]
        b[:, :kept] = b_all[:, :kept]
        rest = (b_all[:, kept:].to(dense.dtype), a_all[kept:].to(dense.dtype)) if a_all.shape[0] > kept else None
        return a.to(dense.dtype), b.to(dense.dtype), rest

    def _start(self, state: Mapping[str, torch.Tensor], spec, remainder: bool) -> dict[str, torch.Tensor]:
        out = {name: truncate(state[name], s.shape) for name, s in spec.items() if not is_lora(name)}
        ranks = {name[: -len(A_SUFFIX)]: s.shape[0] for name, s in spec.items() if ends_with(name, A_SUFFIX)}
        for module in self._modules(state):
            rank = ranks.get(module, 0)  # 0: the module is outside the client's plan, all of it is remainder
            a, b, rest = self.factors(state[module + DENSE_DELTA], state[module + INIT_A], rank)
            if rank:
                out[module + A_SUFFIX], out[module + B_SUFFIX] = a, b
            if rest is not None and remainder:
                out[module + FROZEN_B], out[module + FROZEN_A] = rest
        return out

    @staticmethod
    def _modules(state: Mapping[str, torch.Tensor]) -> list[str]:
        return [n[: -len(DENSE_DELTA)] for n in state if ends_with(n, DENSE_DELTA)]

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        def build(info, plan) -> Instruction:
            return Instruction(plan, self._start(state, info.spec, self.options.freeze_remainder), dict(info.spec), self.recipe_options())

        return share_by_plan(ctx, lambda cid: ctx.clients[cid].plan, build)

    # ---------------------------------------------------------------- aggregate

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        weights = weights_by_client(updates)
        heads = [n for n in state if not (is_lora(n) or ends_with(n, (DENSE_DELTA, INIT_A)))]
        new_state = {**state, **mean_over_senders(state, updates, heads, weights)}
        for module in self._modules(state):
            senders = [u for u in updates if module + A_SUFFIX in u.tensors]
            if not senders:
                continue
            dense = state[module + DENSE_DELTA]
            b_all, a_all, _ = low_rank(dense)  # once per module: each sender's remainder is a tail of it
            trained = []
            for u in senders:
                full = u.tensors[module + B_SUFFIX].double() @ u.tensors[module + A_SUFFIX].double()
                if self.options.freeze_remainder:  # what the client held frozen is part of what it trained in
                    kept = u.tensors[module + A_SUFFIX].shape[0]
                    full = full + b_all[:, kept:].to(dense.dtype).double() @ a_all[kept:].to(dense.dtype).double()
                trained.append(full)
            new_state[module + DENSE_DELTA] = weighted_average(trained, [weights[u.client_id] for u in senders]).to(dense.dtype)
        return new_state, {"train_loss": weighted_train_loss(updates)}

    # ---------------------------------------------------------------- the global model

    def global_model(self, state, spec):
        """The global plan's truncation as the adapter, and what it leaves out of the dense mean as
        base deltas (scaled back by the LoRA scale): together exactly the mean."""
        adapter = self._start(state, spec, remainder=True)
        deltas = {}
        for module in [n[: -len(A_SUFFIX)] for n in spec if ends_with(n, A_SUFFIX)]:
            b_name, a_name = module + FROZEN_B, module + FROZEN_A
            if b_name in adapter:
                deltas[module] = self.scale * (adapter[b_name].double() @ adapter[a_name].double())
        for module in self._modules(state):
            if module + A_SUFFIX not in spec and torch.count_nonzero(state[module + DENSE_DELTA]):
                deltas[module] = self.scale * state[module + DENSE_DELTA].double()
        adapter = {n: t for n, t in adapter.items() if n in spec}
        return adapter, {m: d.to(state[m + DENSE_DELTA].dtype) for m, d in deltas.items()}
