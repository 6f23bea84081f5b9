"""FLoRA (Wang et al., 2024): stack the clients' adapters so that the aggregate is exact.

Averaging A and B separately does not average the products: mean(B) mean(A) != mean(B A).
FLoRA stacks instead: A_s = [A_1; ...; A_n], B_s = [p_1 B_1, ..., p_n B_n], whose product is
exactly sum_k p_k B_k A_k, for any mix of ranks. At the end of each round the stacked update is
folded into the base weights (``<module>.base_delta``, sent to every client, who adds it to its
frozen weights), and every client starts the next round from a fresh adapter: A drawn anew from
a generator seeded by (seed, round, module), B zero, so a client that returns what it got
adds nothing.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Instruction, RoundContext, State, Strategy, mean_over_senders, share_by_plan, weighted_train_loss, weights_by_client
from fedtune.aggregation.lora_math import kaiming_rows, stack, truncate
from fedtune.contract.properties import declare
from fedtune.names import A_SUFFIX, BASE_DELTA, B_SUFFIX, ends_with, is_lora, lora_modules


@STRATEGIES.register("flora")
class FLoRA(Strategy):
    """Stacked adapters, exact aggregate folded into the base weights (Wang et al., 2024)."""

    name = "flora"
    axis = "aggregation"
    declares = declare(provides={"mixed-shapes", "nonlinear-aggregate", "refactorized", "frozen-weight-updates"}, refuses={
        "b-kept-on-device": "flora stacks every client's B next to its A, so B must be sent",
        "a-frozen": "flora stacks the clients' A matrices into a fresh adapter every round",
        "non-lora-adapter": "flora stacks the clients' LoRA factors B and A",
    })

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        state = {k: v.clone() for k, v in adapter.items()}
        for module in lora_modules(adapter):
            a, b = adapter[module + A_SUFFIX], adapter[module + B_SUFFIX]
            state[module + BASE_DELTA] = torch.zeros(b.shape[0], a.shape[1], dtype=a.dtype)
        return state

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        # A and B in the state only give the shapes of the fresh adapters.
        return [n for n in state if not is_lora(n)]

    def _fresh(self, state: Mapping[str, torch.Tensor], spec, round_number: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in spec.items():
            if ends_with(name, A_SUFFIX):
                # The same fresh A for every client of the round (a leading slice for smaller ranks).
                full = state[name]
                g = torch.Generator().manual_seed(_seed(self.seed, round_number, name))
                out[name] = kaiming_rows(full.shape[0], full.shape[1], g, full.dtype)[: s.shape[0]].clone()
            elif ends_with(name, B_SUFFIX):
                out[name] = torch.zeros(s.shape, dtype=state[name].dtype)
            else:
                out[name] = truncate(state[name], s.shape)
        return out

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        deltas = {n: t for n, t in state.items() if ends_with(n, BASE_DELTA) and torch.count_nonzero(t)}
        def build(info, plan) -> Instruction:
            return Instruction(plan, {**self._fresh(state, info.spec, ctx.number), **deltas}, dict(info.spec), self.recipe_options())

        return share_by_plan(ctx, lambda cid: ctx.clients[cid].plan, build)

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        weights = weights_by_client(updates)
        heads = [n for n in state if not (is_lora(n) or ends_with(n, BASE_DELTA))]
        new_state = {**state, **mean_over_senders(state, updates, heads, weights)}
        for module in lora_modules(state):
            a_name, b_name, d_name = module + A_SUFFIX, module + B_SUFFIX, module + BASE_DELTA
            senders = [u for u in updates if a_name in u.tensors]
            if senders:
                a_s, b_s = stack([(u.tensors[a_name], u.tensors[b_name]) for u in senders], [weights[u.client_id] for u in senders])
                new_state[d_name] = (state[d_name].double() + self.scale * (b_s @ a_s)).to(state[d_name].dtype)
        return new_state, {"train_loss": weighted_train_loss(updates)}

    def global_model(self, state, spec):
        """A zero-B adapter (its A does not matter) and the folded deltas: the global model is
        the base plus the deltas."""
        adapter = self._fresh(state, spec, 0)
        deltas = {n[: -len(BASE_DELTA)]: t.clone() for n, t in state.items() if ends_with(n, BASE_DELTA) and torch.count_nonzero(t)}
        return adapter, deltas


def _seed(seed: int, round_number: int, name: str) -> int:
    return (seed * 1_000_003 + round_number * 10_007 + zlib.crc32(name.encode())) % (2**63)
