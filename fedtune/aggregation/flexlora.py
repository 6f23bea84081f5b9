"""FlexLoRA (Bai et al., 2024): average the clients' full updates, hand each client the best
approximation its rank allows.

The global state keeps, for every LoRA module, the dense weighted mean of the clients'
products B_k A_k (``<module>.lora_delta``), so nothing is lost to rank truncation on the
server. A client of rank r starts from the truncated SVD of that mean: B = U_r sqrt(S_r),
A = sqrt(S_r) V_r^T, the best rank-r approximation (Eckart-Young); its error is the sum of the
discarded squared singular values. Where the mean has fewer than r directions (round 1: it is
zero), the remaining rows of A come from the run's initial LoRA A and B is zero there, so those
directions can still learn.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, Strategy, average_by_name, example_weights, weighted_average
from fedtune.aggregation.lora_math import A_SUFFIX, B_SUFFIX, is_lora, lora_modules, truncate

DELTA = ".lora_delta"
INIT_A = ".lora_init_A"


@STRATEGIES.register("flexlora")
class FlexLoRA(Strategy):
    name = "flexlora"
    heterogeneous = True

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {k: v.clone() for k, v in adapter.items() if not is_lora(k)}
        for module in lora_modules(adapter):
            a, b = adapter[module + A_SUFFIX], adapter[module + B_SUFFIX]
            state[module + DELTA] = (b.double() @ a.double()).to(a.dtype)
            state[module + INIT_A] = a.clone()
        return state

    def client_state(self, global_state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], round_number: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in shapes.items():
            if name.endswith(A_SUFFIX):
                module = name[: -len(A_SUFFIX)]
                out[name], out[module + B_SUFFIX] = self._factors(global_state, module, shape[0])
            elif not name.endswith(B_SUFFIX):
                out[name] = truncate(global_state[name], tuple(shape))
        return out

    @staticmethod
    def _factors(global_state: Mapping[str, torch.Tensor], module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        delta = global_state[module + DELTA]
        init_a = global_state[module + INIT_A]
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        tol = s.max().item() * max(delta.shape) * torch.finfo(delta.dtype).eps if s.numel() else 0.0
        kept = min(rank, int((s > tol).sum()))
        root = s[:kept].sqrt()
        a = init_a[:rank].double().clone()
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a[:kept] = root[:, None] * vh[:kept]
        b[:, :kept] = u[:, :kept] * root
        return a.to(delta.dtype), b.to(delta.dtype)

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        by_examples = dict(zip((u.client_id for u in updates), example_weights(updates)))
        plain = [n for n in global_state if not (n.endswith(DELTA) or n.endswith(INIT_A))]
        new_state = average_by_name(global_state, updates, plain, by_examples)
        for name in global_state:
            if name.endswith(INIT_A):
                new_state[name] = global_state[name].clone()
            elif name.endswith(DELTA):
                module = name[: -len(DELTA)]
                senders = [u for u in updates if module + A_SUFFIX in u.tensors]
                if not senders:
                    new_state[name] = global_state[name].clone()
                    continue
                products = [u.tensors[module + B_SUFFIX].double() @ u.tensors[module + A_SUFFIX].double() for u in senders]
                new_state[name] = weighted_average(products, [by_examples[u.client_id] for u in senders]).to(global_state[name].dtype)
        return new_state
