"""Sample-level differential privacy: every client trains with DP-SGD (per-example clipping and
noise, Poisson batches; ``fedtune.privacy.sample_level``) and keeps its own accountant.

The wrapper only tells clients how (its options, the ``dp_*`` fields every recipe reads under
the same names) and checks that what comes back was trained that way: an update
whose reported noise multiplier is not the one asked for is refused. Each client reports its
round's (sigma, q, steps) and its epsilon so far; the round's row keeps them per client
(``dp_sample``), from which ``fedtune privacy-report`` recomputes every client's epsilon.

The guarantee is per device: each example of a device's data changes the distribution of that
device's updates (and so of everything computed from them) by at most its (epsilon, delta).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import ClientUpdate, Instruction, RoundContext, State, Wrapper, map_instructions
from fedtune.contract.properties import declare
from fedtune.contract.local_options import DPSGDOptions
from fedtune.methods.sample_dp.options import SampleDPOptions


class SampleDP(Wrapper):
    """Clients train with DP-SGD and report their accountant (see the module docstring)."""

    name = "sample-dp"
    weighted_mean = True
    Options = SampleDPOptions

    declares = declare(provides={"sample-noise"}, refuses={
        "penalty": "DP-SGD clips per-example gradients, and a penalty outside the per-example losses escapes the clip",
        "gradient-edit": "DP-SGD clips per-example gradients, and gradients edited after the backward pass escape the clip",
        "zeroth-order": "DP-SGD clips per-example gradients, and zeroth-order clients compute none",
        "split-model": "the split recipe does not run DP-SGD",
    })

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        # every field of the devices' DP-SGD settings, under its own name (the devices read the
        # same dataclass: fedtune.contract.local_options.DPSGDOptions)
        dp = {f.name: str(getattr(self.options, f.name)) for f in dataclasses.fields(DPSGDOptions)}
        return map_instructions(self.inner.configure(ctx, state), lambda ins: dataclasses.replace(ins, options={**ins.options, **dp}))

    def check_update(self, ctx: RoundContext, update: ClientUpdate) -> None:
        m = update.metrics
        sigma, q, steps = m.get("dp_sample_noise_multiplier"), m.get("dp_sample_rate"), m.get("dp_sample_steps")
        if sigma is None or q is None or steps is None:
            raise ValueError("sample-level DP: the update does not report its noise multiplier, sample rate and steps")
        o = self.options
        if o.dp_target_epsilon:  # each device chose its own sigma: check what it spent instead
            eps = m.get("dp_sample_epsilon")
            if sigma <= 0 or eps is None or not 0 < q <= 1 or steps < 1 or eps > o.dp_target_epsilon:
                raise ValueError(f"sample-level DP: the update reports sigma {sigma}, q {q}, {steps} steps, epsilon {eps}; the target is {o.dp_target_epsilon}")
        elif not math.isclose(sigma, o.dp_noise_multiplier, rel_tol=1e-9) or not 0 < q <= 1 or steps < 1:
            raise ValueError(f"sample-level DP: the update reports sigma {sigma}, q {q}, {steps} steps; sigma {o.dp_noise_multiplier} was asked for")
        self.inner.check_update(ctx, update)

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        new_state, metrics = self.inner.aggregate(ctx, state, updates)
        per_client = {
            u.client_id: {
                "noise_multiplier": u.metrics["dp_sample_noise_multiplier"], "sample_rate": u.metrics["dp_sample_rate"],
                "steps": int(u.metrics["dp_sample_steps"]), "epsilon": u.metrics.get("dp_sample_epsilon"),
                "rounds_trained": u.metrics.get("dp_sample_rounds"), "secret": u.metrics.get("dp_sample_secret"),
                **({"prior_noise": u.metrics["dp_sample_prior_noise"]} if "dp_sample_prior_noise" in u.metrics else {}),
            }
            for u in updates
        }
        eps = [v["epsilon"] for v in per_client.values() if v["epsilon"] is not None]
        extra = {"dp_sample": per_client, "dp_sample_delta": self.options.dp_delta}
        if eps:
            extra["dp_sample_epsilon_max"] = max(eps)
        return {**state, **new_state}, {**metrics, **extra}
