"""FLoRA (Wang et al., 2024): stack the clients' adapters so that the aggregate is exact.

Averaging A and B separately does not average the products: mean(B) mean(A) != mean(B A).
FLoRA stacks instead: A_s = [A_1; ...; A_n], B_s = [p_1 B_1, ..., p_n B_n], whose product is
exactly sum_k p_k B_k A_k, for any mix of ranks. At the end of each round the stacked update is
folded into the base weights (``<module>.base_delta``, sent to every client, who adds it to its
frozen weights), and every client starts the next round from a fresh adapter: A drawn anew from
a generator seeded by (seed, round, module), B zero.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Strategy, average_by_name, example_weights
from fedtune.aggregation.lora_math import A_SUFFIX, B_SUFFIX, is_lora, kaiming_rows, lora_modules, stack, truncate

BASE_DELTA = ".base_delta"


@STRATEGIES.register("flora")
class FLoRA(Strategy):
    name = "flora"
    heterogeneous = True

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {k: v.clone() for k, v in adapter.items()}
        for module in lora_modules(adapter):
            a, b = adapter[module + A_SUFFIX], adapter[module + B_SUFFIX]
            state[module + BASE_DELTA] = torch.zeros(b.shape[0], a.shape[1], dtype=a.dtype)
        return state

    def client_state(self, global_state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], round_number: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in shapes.items():
            if name.endswith(A_SUFFIX):
                # The same fresh A for every client of the round (a leading slice for smaller ranks).
                full = global_state[name]
                g = torch.Generator().manual_seed(_seed(self.seed, round_number, name))
                out[name] = kaiming_rows(full.shape[0], full.shape[1], g, full.dtype)[: shape[0]].clone()
            elif name.endswith(B_SUFFIX):
                out[name] = torch.zeros(shape, dtype=global_state[name].dtype)
            else:
                out[name] = truncate(global_state[name], tuple(shape))
        return out

    def base_delta(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name[: -len(BASE_DELTA)]: t for name, t in global_state.items() if name.endswith(BASE_DELTA)}

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        by_examples = dict(zip((u.client_id for u in updates), example_weights(updates)))
        plain = [n for n in global_state if not is_lora(n) and not n.endswith(BASE_DELTA)]
        new_state = average_by_name(global_state, updates, plain, by_examples)
        for module in lora_modules(global_state):
            a_name, b_name, d_name = module + A_SUFFIX, module + B_SUFFIX, module + BASE_DELTA
            new_state[a_name], new_state[b_name] = global_state[a_name].clone(), global_state[b_name].clone()
            senders = [u for u in updates if a_name in u.tensors]
            delta = global_state[d_name].clone()
            if senders:
                a_s, b_s = stack([(u.tensors[a_name], u.tensors[b_name]) for u in senders], [by_examples[u.client_id] for u in senders])
                delta = (delta.double() + self.scale * (b_s @ a_s)).to(delta.dtype)
            new_state[d_name] = delta
        return new_state


def _seed(seed: int, round_number: int, name: str) -> int:
    return (seed * 1_000_003 + round_number * 10_007 + zlib.crc32(name.encode())) % (2**63)
