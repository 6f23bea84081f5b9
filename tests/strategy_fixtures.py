"""Plain-tensor rounds for strategy tests: a two-module "model" (layer 0 and layer 1, each with
one LoRA module) plus a head, plans of any rank and depth, and contexts built from them."""

from __future__ import annotations

import torch

from fedtune.adapters import AdapterPlan
from fedtune.aggregation import ClientInfo, ClientUpdate, RoundContext
from fedtune.protocol.tensors import TensorSpec

M = "base_model.model.layer.0.q"
M2 = "base_model.model.layer.1.q"
MODULES = {0: M, 1: M2}
A, B, CORE = ".lora_A.weight", ".lora_B.weight", ".lora_A.core.weight"
HEAD = "head.weight"
OUT, IN, RMAX = 12, 10, 8
DTYPE = torch.float32


def plan(rank: int = RMAX, layers: tuple[int, ...] = (0, 1), ranks: dict[int, int] | None = None) -> AdapterPlan:
    return AdapterPlan(rank=rank, alpha=2.0 * rank, layers=layers, rank_per_layer=ranks or {})


GLOBAL_PLAN = plan()


def spec_of(p: AdapterPlan) -> dict[str, TensorSpec]:
    out = {}
    for layer in p.layers:
        r = p.rank_per_layer.get(layer, p.rank)
        out[MODULES[layer] + A] = TensorSpec((r, IN), DTYPE)
        out[MODULES[layer] + B] = TensorSpec((OUT, r), DTYPE)
        if p.core:
            out[MODULES[layer] + CORE] = TensorSpec((r, r), DTYPE)
    out[HEAD] = TensorSpec((3, IN), DTYPE)
    return out


def random_adapter(g: torch.Generator, zero_b: bool = False) -> dict[str, torch.Tensor]:
    return {name: (torch.zeros(s.shape) if zero_b and name.endswith(B) else torch.randn(s.shape, generator=g)).to(DTYPE) for name, s in spec_of(GLOBAL_PLAN).items()}


def context(plans: dict[str, AdapterPlan], number: int = 1, sampling_rate: float = 1.0, examples: dict[str, int] | None = None) -> RoundContext:
    clients = {cid: ClientInfo(cid, p, spec_of(p), num_examples=(examples or {}).get(cid, 10)) for cid, p in sorted(plans.items())}
    return RoundContext(number, clients, seed=0, sampling_rate=sampling_rate, global_plan=GLOBAL_PLAN, global_spec=spec_of(GLOBAL_PLAN), spec_of=spec_of)


MIXED = {"phone": plan(2, (1,)), "laptop": plan(4, (0, 1), {0: 2}), "server": plan(RMAX)}


def echo(instructions, counts: dict[str, int] | None = None) -> list[ClientUpdate]:
    """Clients that send back exactly what they were given (zeros for what they were not given,
    such as control-variate changes; their plan's largest rank for a rank cap)."""
    out = []
    for cid, ins in sorted(instructions.items()):
        tensors = {}
        for name, s in ins.expect.items():
            if name in ins.tensors:
                tensors[name] = ins.tensors[name].clone()
            elif s.dtype == torch.int64:
                tensors[name] = torch.tensor(max([ins.plan.rank, *ins.plan.rank_per_layer.values()]), dtype=torch.int64)
            else:
                tensors[name] = torch.zeros(s.shape, dtype=s.dtype)
        out.append(ClientUpdate(cid, tensors, (counts or {}).get(cid, 10), {"train_loss": 1.0}))
    return out


def trained(instructions, g: torch.Generator, counts: dict[str, int] | None = None) -> list[ClientUpdate]:
    """Clients whose every float tensor moved by random noise."""
    updates = echo(instructions, counts)
    for u in updates:
        for name, t in u.tensors.items():
            if t.is_floating_point():
                u.tensors[name] = t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    return updates


def function(strategy, state) -> dict[str, torch.Tensor]:
    """What the global model does: scale * B @ A + delta per module, and the head."""
    adapter, deltas = strategy.global_model(state, spec_of(GLOBAL_PLAN))
    out = {HEAD: adapter[HEAD].double()}
    for m in MODULES.values():
        whole = strategy.scale * adapter[m + B].double() @ adapter[m + A].double()
        out[m] = whole + deltas[m].double() if m in deltas else whole
    return out
