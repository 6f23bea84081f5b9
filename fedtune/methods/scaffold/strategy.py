"""SCAFFOLD (Karimireddy et al., 2020): control variates that correct client drift.

The server keeps a control variate ``c`` per model tensor, each client its own ``c_i`` (on the
device, in the ``scaffold`` recipe). A client corrects every local gradient by ``c - c_i``, then
sets ``c_i+`` to the mean of the raw gradients it saw along its local trajectory (an estimate of
its local gradient at the global model, in the spirit of the paper's option I, taken from the
steps it already did instead of an extra pass) and sends ``dc_i = c_i+ - c_i`` with its adapter.
The server aggregates the adapters with the inner aggregation, x <- x + server_lr (x_avg - x),
and the control variates as in the paper:

    c <- c + (|S| / N) * mean_{i in S} dc_i

with |S| / N the round's sampling rate, an unweighted mean, and, where clients of different
ranks train different slots, the mean over the clients that hold each slot.

Control variates are per tensor, so the inner aggregation must hand clients leading blocks of
its own tensors (fedavg, hetlora): in flexlora and flora a client's factors change basis every
round and a variate of them means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import STRATEGIES, ClientUpdate, InnerOption, Instruction, RecipeWrapper, RoundContext, State, map_instructions
from fedtune.aggregation.lora_math import blockwise_mean, truncate
from fedtune.contract.properties import declare
from fedtune.methods.scaffold.options import CONTROL, CONTROL_DELTA, ScaffoldOptions
from fedtune.names import namespaced, strip_namespace


@dataclass(frozen=True)
class ScaffoldStrategyOptions(ScaffoldOptions, InnerOption):
    """SCAFFOLD's options and the strategy it wraps."""


@STRATEGIES.register("scaffold")
class Scaffold(RecipeWrapper):
    """Control variates correct every client gradient for drift (Karimireddy et al., 2020)."""

    name = "scaffold"
    Options = ScaffoldStrategyOptions
    recipe_name = "scaffold"
    namespaces = (CONTROL,)

    declares = RecipeWrapper.declares | declare(
        provides={"gradient-edit", "extra-update-tensors"},
        needs={"sliced-state": "its control variates are kept per global tensor, so clients must train slices of them"},
        refuses={
            "split-model": "its control variates cover the whole adapter, and a split device trains the part below its cut",
            "a-frozen": "it keeps a control variate for every adapter tensor, and a frozen factor has no gradient to correct",
            "b-frozen": "it keeps a control variate for every adapter tensor, and a frozen factor has no gradient to correct",
            "b-kept-on-device": "its control variates pull every trained tensor toward the clients' mean, and B is kept apart on each device",
        },
    )

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        state = self.inner.initial_state(adapter)
        state.update({namespaced(CONTROL, n): torch.zeros_like(state[n]) for n in self.inner.server_params(state)})
        return state

    @staticmethod
    def controls(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensor name -> its server control variate."""
        return {key: t for n, t in state.items() if (key := strip_namespace(CONTROL, n)) is not None}

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        controls = self.controls(state)

        def add_controls(ins: Instruction) -> Instruction:
            tensors, expect = dict(ins.tensors), dict(ins.expect)
            for name, spec in ins.expect.items():
                if name in controls:
                    tensors[namespaced(CONTROL, name)] = truncate(controls[name], spec.shape)
                    expect[namespaced(CONTROL_DELTA, name)] = spec
            return Instruction(ins.plan, tensors, expect, ins.options)

        return map_instructions(super().configure(ctx, state), add_controls)

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        inner_state, controls = self.inner_state(state), self.controls(state)
        averaged, metrics = self.inner.aggregate(ctx, inner_state, updates)
        new_state = dict(averaged)
        lr = self.options.server_lr
        for name in self.inner.server_params(inner_state):
            x = inner_state[name].double()
            new_state[name] = (x + lr * (averaged[name].double() - x)).to(inner_state[name].dtype)
        squares = 0.0
        for name, c in controls.items():
            key = namespaced(CONTROL_DELTA, name)
            deltas = [u.tensors[key] for u in updates if key in u.tensors]
            if deltas:
                mean = blockwise_mean(torch.zeros_like(c), deltas, [1.0] * len(deltas))
                c = (c.double() + ctx.sampling_rate * mean.double()).to(c.dtype)
            new_state[namespaced(CONTROL, name)] = c
            squares += float(c.double().square().sum())
        metrics["control_norm"] = squares**0.5
        return new_state, metrics
