"""Client-level differential privacy around a linear aggregation (DP-FedAvg, McMahan et al.
2018; adaptive clipping, Andrew et al. 2021).

Each round the wrapper takes every client's update (what it sent minus what it was given, all
tensors together), clips it to norm C, sums, adds N(0, (sigma C)^2) to every element, and
divides by the *expected* number of clients ``q * N``, a fixed denominator, so a client that
drops out changes the sum but never the noise scale. The noised mean update is handed to the
inner strategy as a single update of unit weight: FedAvg then applies it as it is, and a server
optimizer (fedadam, fedavgm) steps on it, which gives DP-FedAdam and friends.

Sampling: the coordinator selects clients by Poisson sampling in DP runs (each known client
independently with probability q = clients_per_round / clients known), which is what Opacus'
accountants assume; the accountant records (sigma, q, 1) per round in the state
(``dp/history``), so epsilon survives restarts and the privacy report reads it back. A round in
which nobody was selected or nobody answered still releases noise and is still counted.

The guarantee covers the sequence of global models, under add/remove adjacency: adding or
removing one client with all its data (any number of examples, every round it takes part in)
changes their distribution by at most (epsilon, delta). It does not cover the metrics clients
report (train loss), which are logged as they arrive, nor who took part: the amplification by
sampling that the accountant counts assumes the selection stays secret, so the coordinator
keeps participation out of the released metrics (``participation.jsonl``, for the operator).

Noise and selection come from the OS's randomness, so nobody, the operator included, can
regenerate and subtract them; research mode (``repeatable``) derives them from the run's seed
instead, and the privacy report then says that the guarantee does not hold against whoever
knows that seed (``fedtune.privacy.randomness``).

Adaptive clipping (Andrew et al.) releases a second query each round: the number of clients
whose update was within the clip, as centred bits ``b - 1/2`` (sensitivity 1/2 under
add/remove) plus N(0, count_sigma^2). Both queries together are one Gaussian mechanism with
multiplier sigma when the update's noise is sigma_u = (sigma^-2 - (2 count_sigma)^-2)^-1/2
(``noise_split``); the accountant counts sigma, and each round's row records sigma_u,
count_sigma and the count's sensitivity so anyone can recompute it.

Refused around strategies whose aggregation is not a weighted mean of same-shaped updates
(heterogeneous plans, SVD re-factorization, stacking, control variates).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fedtune.aggregation.base import ClientUpdate, RoundContext, State, Wrapper, weighted_train_loss
from fedtune.contract.properties import declare
from fedtune.privacy.accounting import ACCOUNTANTS, epsilon, history_from_tensor, history_tensor, noise_for_target
from fedtune.privacy.client_level import COUNT_SENSITIVITY, adaptive_clip, clip_update, gaussian_like, noise_split
from fedtune.privacy.randomness import dp_generator

log = logging.getLogger(__name__)

NAMESPACE = "dp"
HISTORY = "dp/history"   # rows (noise multiplier, sample rate, steps), one per round
CLIP = "dp/clip"         # the current clip norm (changes with adaptive clipping)
SIGMA = "dp/sigma"       # the noise multiplier in use (from target_epsilon: fixed at round 1)


@dataclass(frozen=True)
class ClientDPOptions:
    clip: float = 1.0                # C: every client's whole update is clipped to this L2 norm
    noise_multiplier: float = 1.0    # sigma: noise std is sigma * C on the sum
    delta: float = 1e-5
    accountant: str = "rdp"
    adaptive: bool = False           # track a quantile of the update norms (Andrew et al.)
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    # Std of the clipped-count noise; 0: expected clients / 20 (Andrew et al.), raised where
    # needed to 1.2 * noise_multiplier so the update keeps at least 1/1.1 of its noise budget.
    count_noise: float = 0.0
    # Research mode: noise drawn from the run's seed (repeatable; no guarantee against whoever
    # knows the seed). Off: the OS's randomness.
    repeatable: bool = False
    epsilon_budget: float = 0.0      # stop before a round would take epsilon past this (0: none)
    # Instead of noise_multiplier: the smallest sigma that spends at most this over `rounds`
    # rounds at the sampling rate of round 1 (fixed then, kept in the state).
    target_epsilon: float = 0.0
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.clip <= 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.epsilon_budget < 0:
            raise ValueError(f"epsilon_budget must be >= 0, got {self.epsilon_budget}")
        if self.target_epsilon < 0 or (self.target_epsilon and self.rounds < 1):
            raise ValueError("target_epsilon must be >= 0, and needs the number of rounds")
        if not 0.0 < self.target_quantile < 1.0 or self.clip_lr <= 0 or self.count_noise < 0:
            raise ValueError("target_quantile must be in (0, 1), clip_lr positive, count_noise >= 0")


class ClientDP(Wrapper):
    """DP-FedAvg: clip each client's update, noise the sum, fixed denominator (module docstring)."""

    name = "client-dp"
    Options = ClientDPOptions
    namespaces = (NAMESPACE,)

    declares = declare(provides={"client-noise"}, refuses={
        "mixed-shapes": "it clips and noises updates of one shape",
        "nonlinear-aggregate": "its sensitivity bound holds for a weighted sum of clipped updates only",
        "extra-update-tensors": "it clips the adapter update; other tensors clients send would leave unclipped",
        "scalar-update": "it clips tensor updates, and these clients send scalars",
    })

    @property
    def poisson_sampling(self) -> bool:  # type: ignore[override]
        return True

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        state = self.inner.initial_state(adapter)
        state[HISTORY] = history_tensor([])
        state[CLIP] = torch.tensor(self.options.clip, dtype=torch.float64)
        state[SIGMA] = torch.tensor(float("nan"), dtype=torch.float64)  # NaN: not fixed yet
        return state

    def epsilon(self, state: Mapping[str, torch.Tensor]) -> float:
        return epsilon(history_from_tensor(state[HISTORY]), self.options.delta, self.options.accountant)

    def sigma(self, state: Mapping[str, torch.Tensor], sampling_rate: float) -> float:
        """The noise multiplier of the next round: the configured one, or the one a target
        epsilon gives at the rate of the first round (then kept in the state)."""
        o = self.options
        if not o.target_epsilon:
            return o.noise_multiplier
        if SIGMA in state and torch.isfinite(state[SIGMA]):
            return float(state[SIGMA])
        return noise_for_target(o.target_epsilon, o.delta, sampling_rate, o.rounds, o.accountant)

    def stop_reason(self, state: Mapping[str, torch.Tensor], sampling_rate: float) -> str:
        """Refuse a round that would take epsilon past the budget (checked before it runs, with
        the rate its clients are sampled at)."""
        o = self.options
        budget = o.epsilon_budget or o.target_epsilon
        if not budget:
            return ""
        spent = history_from_tensor(state[HISTORY])
        after = epsilon([*spent, (self.sigma(state, sampling_rate), sampling_rate, 1)], o.delta, o.accountant)
        if after > budget:
            now = epsilon(spent, o.delta, o.accountant)
            return (f"client-level privacy budget: one more round would spend epsilon {after:.4g} > budget {budget:g} "
                    f"(spent {now:.4g} at delta {o.delta:g} over {len(spent)} rounds)")
        return ""

    def _generator(self, number: int) -> torch.Generator:
        """The round's noise generator: a fresh secret, or (research mode) the run's seed."""
        return dp_generator(self.options.repeatable, self.seed, "client-noise", number)

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        o = self.options
        inner_state = self.inner_state(state)
        q = ctx.sampling_rate
        expected = max(q * ctx.population, 1e-9) if ctx.population else float(len(ctx.clients) or 1)
        clip = float(state[CLIP])
        names = [n for n in self.inner.server_params(inner_state) if n in ctx.global_spec]
        total = {n: torch.zeros(inner_state[n].shape, dtype=torch.float64) for n in names}
        unclipped = 0   # clients whose update was within the clip (the adaptive clip's query)
        for u in updates:
            missing = [n for n in names if n not in u.tensors]
            if missing:  # noise on a tensor nobody sends would be the whole of its "update"
                raise ValueError(f"client-level DP: {u.client_id} sent no {missing[0]}, which this mechanism noises; a part that "
                                 "narrows what clients send must sit inside client-level DP and leave it out of its server_params")
            delta = {n: (t.double() - u.start[n].double()) for n, t in u.tensors.items() if n in total}
            clipped, norm = clip_update(delta, clip)
            unclipped += norm <= clip
            for n, t in clipped.items():
                if t.shape != total[n].shape:
                    raise ValueError(f"client-level DP: {u.client_id} sent {n} of shape {list(t.shape)}, the global adapter's is {list(total[n].shape)}")
                total[n] += t
        generator = self._generator(ctx.number)
        total_sigma = self.sigma(state, q)
        sigma = total_sigma
        metrics: dict = {}
        if o.adaptive:
            count_sigma = o.count_noise or max(expected / 20, 1.2 * total_sigma)
            sigma = noise_split(total_sigma, count_sigma) if total_sigma > 0 else 0.0
        noise = gaussian_like({n: t.shape for n, t in total.items()}, sigma * clip, generator)
        mean = {n: (total[n] + noise[n]) / expected for n in names}
        pseudo = ClientUpdate("dp-aggregate", {n: (inner_state[n].double() + mean[n]).to(inner_state[n].dtype) for n in names}, 1, {}, {n: inner_state[n] for n in names})
        new_state, inner_metrics = self.inner.aggregate(ctx, inner_state, [pseudo])
        next_clip = clip
        if o.adaptive:
            next_clip, fraction = adaptive_clip(clip, unclipped, len(updates), expected, o.target_quantile, o.clip_lr, count_sigma, generator)
            metrics.update({
                "dp_unclipped_fraction_noised": fraction, "dp_update_noise_multiplier": sigma,
                "dp_count_noise_std": count_sigma, "dp_count_sensitivity": COUNT_SENSITIVITY,
            })
        history = torch.cat([state[HISTORY], history_tensor([(total_sigma, q, 1)])])
        eps = epsilon(history_from_tensor(history), o.delta, o.accountant)
        log.info("round %d: client-level DP, epsilon %.3f at delta %g (sigma %.3f, C %.4g, q %.3f)", ctx.number, eps, o.delta, total_sigma, clip, q)
        metrics.update({
            "train_loss": weighted_train_loss(updates),
            "dp_epsilon": eps, "dp_delta": o.delta, "dp_noise_multiplier": total_sigma,
            "dp_clip": clip, "dp_sample_rate": q, "dp_expected_clients": expected,
        })
        out = {**new_state, HISTORY: history, CLIP: torch.tensor(next_clip, dtype=torch.float64), SIGMA: torch.tensor(total_sigma, dtype=torch.float64)}
        return out, {**{k: v for k, v in inner_metrics.items() if k != "train_loss"}, **metrics}

    def kept_when_refused(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> State:
        """A refused round still drew its noise, and its row and the refusal itself read the
        noised aggregate: the round stays in the accountant's history (and sigma fixed)."""
        return {**super().kept_when_refused(old, new), HISTORY: new[HISTORY], SIGMA: new[SIGMA]}

    def describe(self) -> dict:
        return {**super().describe(), "mechanism": "DP-FedAvg (client level)"}
