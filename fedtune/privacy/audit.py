"""An empirical privacy audit in one run (Steinke, Nasr, Jagielski, "Privacy Auditing with One
(1) Training Run", NeurIPS 2023), of fedtune's own DP mechanisms.

The auditor makes m canaries and includes each one independently with probability 1/2 (its own
coins, ``S_i`` in {+1 in, -1 out}, from a secret seed that it records). The mechanism runs once,
with the included canaries among its inputs. The auditor then scores every canary from what
the mechanism released, guesses "in" for the k+ highest scores and "out" for the k- lowest,
and abstains on the rest: r = k+ + k- guesses, v of them correct. If the mechanism is
(eps, delta)-DP, v correct guesses or more happen with probability at most

    p(eps) = P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta max_{1<=i<=v} P[v-i <= B < v] / i

(the paper's theorem for approximate DP; B is that binomial; its appendix computes it so). The
lower bound at confidence 1 - beta is the largest eps the observation rejects, p(eps) <= beta:
the mechanism is not (eps, delta)-DP for any smaller eps, except with probability beta.

Guess counts: the auditor tries a grid of (k+, k-) fixed in advance from m (``guess_counts``)
and reports the best bound; since picking the best of several tests is a multiple comparison,
each test runs at beta / (size of the grid) (Bonferroni), so the reported bound holds at
confidence 1 - beta as a whole. Each audit (a row of the benchmark) is a claim of its own; a
table of rows is not corrected across rows.

What is audited, white-box, with Dirac canaries (each canary moves one coordinate of its own,
so every coordinate's trajectory depends on its canary alone):

- ``sample``: DP-SGD as devices run it (``fedtune.privacy.sample_level.dp_train``: Opacus'
  per-example clipping, secure-mode noise, AdamW; Poisson batches from ``poisson_batches``;
  generators from ``dp_generator`` as ``Recipe.train_private`` draws them) on a linear model
  whose per-example loss is ``-(w . x)``. Canary i's input is a large one-hot ``e_i`` (its
  gradient is clipped to exactly C); an "out" canary's input is zero, which gives a zero
  gradient (the same as absent, and n stays fixed). Honest examples are dense on a disjoint
  block of coordinates. Score: how far coordinate i moved up.
- ``client``: DP-FedAvg as the coordinator runs it (``ClientDP`` around ``fedavg``, driven
  through ``aggregate`` on plain tensors, clients chosen by ``poisson_select``). Canary client
  i sends a Dirac update ``2C e_i`` (clipped to C e_i); honest clients send random updates on a
  disjoint block. Every canary is a known client (the population and so the denominator q N
  are fixed); an "out" canary, when selected, sends nothing, which is what removing it does to
  the sum. Score: the global adapter's change at coordinate i, summed over the rounds.

Broken mechanisms, which the audit must catch (lower bound above the epsilon they report):
``noise-off`` reports the epsilon of the noise multiplier it was configured with but adds no
noise; ``known-seed`` is research mode (``repeatable``): the auditor knows the run's seed, as a
coordinator does, so it regenerates the noise and the Poisson draws and takes them out.

A lower bound is evidence in one direction only: a bound above the reported epsilon disproves
the claim (at confidence 1 - beta); a bound below it does not prove it.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

BETA = 0.05
DELTA = 1e-5
LEVELS = ("sample", "client")
MODES = ("correct", "noise-off", "known-seed")
# The guess counts the auditor tries, as fractions of m: k+ alone (the top scores, where
# subsampling leaves a low score uninformative) and k+ = k- (both ends).
GUESS_FRACTIONS = (0.01, 0.03, 0.1, 0.2, 0.4)


# ---------------------------------------------------------------------------- the bound


def _binom_pmf(ks: np.ndarray, n: int, p: float) -> np.ndarray:
    try:
        from scipy.stats import binom
    except ImportError:  # exact log-space fallback
        return _binom_pmf_exact(ks, n, p)
    return np.asarray(binom.pmf(ks, n, p), dtype=np.float64)


def _binom_pmf_exact(ks: np.ndarray, n: int, p: float) -> np.ndarray:
    ks = np.asarray(ks, dtype=np.float64)
    if p <= 0.0 or p >= 1.0:
        return (ks == (n if p >= 1.0 else 0)).astype(np.float64)
    lgamma = np.vectorize(math.lgamma)
    log = lgamma(n + 1.0) - lgamma(ks + 1.0) - lgamma(n - ks + 1.0) + ks * math.log(p) + (n - ks) * math.log1p(-p)
    return np.exp(log)


def _binom_tail(v: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= v]."""
    if v <= 0:
        return 1.0
    if v > n:
        return 0.0
    try:
        from scipy.stats import binom
    except ImportError:
        return float(min(1.0, _binom_pmf_exact(np.arange(v, n + 1), n, p).sum()))
    return float(binom.sf(v - 1, n, p))


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """The most probability an (eps, delta)-DP mechanism can give to v or more correct guesses
    out of r on m canaries (module docstring)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError("need eps >= 0 and delta in [0, 1]")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-eps))  # the accuracy of eps-DP randomized response
    bound = _binom_tail(v, r, p)
    if delta > 0:
        below = _binom_pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
        bound += 2.0 * m * delta * alpha
    return min(1.0, bound)


def all_correct_bound(r: int, beta: float = BETA) -> float:
    """The bound that r correct guesses out of r give with delta = 0, in closed form:
    p^r = beta, eps = log(p / (1 - p)). No observation on r guesses bounds eps higher."""
    if r <= 0:
        return 0.0
    p = beta ** (1.0 / r)
    return math.log(p / (1.0 - p)) if p > 0.5 else 0.0


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, beta: float = BETA, step: float = 0.02) -> float:
    """The largest eps such that every eps' <= eps is rejected at level beta by v correct out of
    r guesses on m canaries (p(eps') <= beta): scanned upward in steps of ``step``, then
    bisected within the step where the test stops rejecting. 0 when nothing is rejected."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    ceiling = all_correct_bound(r, beta) + step  # p(eps) >= p^r > beta above it
    low = 0.0
    while low + step <= ceiling and p_value(m, r, v, low + step, delta) <= beta:
        low += step
    high = low + step
    for _ in range(40):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) <= beta:
            low = mid
        else:
            high = mid
    return low


def guess_counts(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The (k+, k-) pairs tried on m canaries, fixed by m alone (never by the scores)."""
    out: list[tuple[int, int]] = []
    for f in fractions:
        k = max(1, int(round(f * m)))
        for pair in ((k, 0), (k, k)):
            if sum(pair) <= m and pair not in out:
                out.append(pair)
    return out


def guesses(scores: np.ndarray, k_plus: int, k_minus: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """+1 ("in") for the k+ highest scores, -1 ("out") for the k- lowest, 0 elsewhere; ties
    in the order of ``tiebreak`` (drawn independently of the coins), else by index."""
    scores = np.asarray(scores, dtype=np.float64)
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"cannot make {k_plus} + {k_minus} guesses on {m} canaries")
    order = np.lexsort((np.arange(m) if tiebreak is None else tiebreak, scores))  # ascending
    out = np.zeros(m, dtype=np.int64)
    out[order[:k_minus]] = -1
    if k_plus:
        out[order[m - k_plus:]] = 1
    return out


@dataclass(frozen=True)
class Bound:
    epsilon: float          # the lower bound (the best over the grid, each test at beta / tests)
    k_plus: int
    k_minus: int
    guesses: int            # r
    correct: int            # v
    tests: int              # the size of the grid (Bonferroni)


def best_bound(scores: np.ndarray, included: np.ndarray, delta: float, beta: float = BETA,
               counts: Sequence[tuple[int, int]] | None = None, tiebreak: np.ndarray | None = None) -> Bound:
    """The bound of every guess count of the grid, each at beta / len(grid); the best one."""
    included = np.asarray(included, dtype=bool)
    m = len(included)
    counts = list(counts or guess_counts(m))
    truth = np.where(included, 1, -1)
    best: Bound | None = None
    for k_plus, k_minus in counts:
        g = guesses(scores, k_plus, k_minus, tiebreak)
        r, v = int(np.count_nonzero(g)), int(np.count_nonzero(g == truth))
        eps = epsilon_lower_bound(m, r, v, delta, beta / len(counts))
        if best is None or eps > best.epsilon or (eps == best.epsilon and v > best.correct):
            best = Bound(eps, k_plus, k_minus, r, v, len(counts))
    assert best is not None
    return best


def bound_cap(m: int, beta: float = BETA, tests: int | None = None) -> float:
    """The highest bound an audit on m canaries can give (all m guessed right, delta = 0, each
    test at beta / tests): a broken mechanism is caught only below it."""
    return all_correct_bound(m, beta / (tests or len(guess_counts(m))))


# ---------------------------------------------------------------------------- the auditor's coins


@dataclass(frozen=True)
class Coins:
    seed: int                       # the auditor's secret seed (recorded, so the audit can be checked)
    included: np.ndarray            # S_i = +1: canary i is in
    tiebreak: np.ndarray            # a random order for tied scores, independent of the coins
    rng: np.random.Generator        # the auditor's further draws (honest data)

    @property
    def hex(self) -> str:
        return np.packbits(self.included.astype(np.uint8)).tobytes().hex()


def draw_coins(m: int, seed: int | None = None) -> Coins:
    """The auditor's coins: each canary in with probability 1/2, from ``seed`` or a fresh secret."""
    seed = secrets.randbits(64) if seed is None else int(seed)
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    tiebreak = rng.permutation(m)
    return Coins(seed, included, tiebreak, rng)


# ---------------------------------------------------------------------------- the audits


@dataclass(frozen=True)
class AuditSettings:
    canaries: int = 1000
    delta: float = DELTA
    beta: float = BETA
    clip: float = 1.0
    # sample level: honest examples (dense, on their own block of coordinates), Poisson rate,
    # DP-SGD steps, AdamW
    sample_honest: int = 64
    sample_honest_dims: int = 16
    sample_rate: float = 0.25
    steps: int = 20
    learning_rate: float = 1e-2
    weight_decay: float = 0.0
    # client level: honest clients, Poisson rate, rounds (the same canaries every round)
    client_honest: int = 50
    client_honest_dims: int = 16
    client_rate: float = 0.5
    rounds: int = 4

    def __post_init__(self) -> None:
        if self.canaries < 2 or not 0 < self.sample_rate <= 1 or not 0 < self.client_rate <= 1 or self.steps < 1 or self.rounds < 1:
            raise ValueError("an audit needs at least 2 canaries, rates in (0, 1], at least one step and one round")


@dataclass
class AuditResult:
    name: str
    level: str                      # sample or client
    mode: str                       # correct, noise-off or known-seed
    epsilon_reported: float         # what the mechanism's accountant reports
    epsilon_lower_bound: float      # at confidence 1 - beta
    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    tests: int
    epsilon_cap: float              # the highest bound these canaries could give
    noise_multiplier: float         # configured (the reported epsilon's)
    noise_multiplier_used: float    # what the mechanism really added
    sample_rate: float
    steps: int                      # DP-SGD steps, or rounds at client level
    delta: float
    beta: float
    repeatable: bool                # the mechanism's draws from the run's seed (research mode), not secrets
    auditor_seed: int
    coins_hex: str = field(repr=False)
    seconds: float = 0.0

    @property
    def held(self) -> bool:
        """Correct mechanism: the bound stays at or below the reported epsilon. Broken one: the
        bound exceeds it (caught)."""
        if self.mode == "correct":
            return self.epsilon_lower_bound <= self.epsilon_reported
        return self.epsilon_lower_bound > self.epsilon_reported

    def row(self) -> dict:
        return {**dataclasses.asdict(self), "held": self.held}


def _result(name: str, level: str, mode: str, reported: float, scores: np.ndarray, coins: Coins, s: AuditSettings,
            sigma: float, used: float, rate: float, steps: int, repeatable: bool, started: float) -> AuditResult:
    b = best_bound(scores, coins.included, s.delta, s.beta, tiebreak=coins.tiebreak)
    return AuditResult(
        name=name, level=level, mode=mode, epsilon_reported=reported, epsilon_lower_bound=b.epsilon,
        canaries=len(coins.included), guesses=b.guesses, correct=b.correct, k_plus=b.k_plus, k_minus=b.k_minus,
        tests=b.tests, epsilon_cap=bound_cap(len(coins.included), s.beta, b.tests), noise_multiplier=sigma,
        noise_multiplier_used=used, sample_rate=rate, steps=steps, delta=s.delta, beta=s.beta, repeatable=repeatable,
        auditor_seed=coins.seed, coins_hex=coins.hex, seconds=round(time.monotonic() - started, 2),
    )


def _check_mode(level: str, mode: str, repeatable: bool | None) -> bool:
    """Whether the mechanism draws from the run's seed: research mode for ``known-seed``,
    secrets otherwise unless asked (a fully seeded noise-off run, for tests)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if repeatable is None:
        return mode == "known-seed"
    if mode == "known-seed" and not repeatable:
        raise ValueError("the known-seed audit needs the mechanism in research mode (repeatable)")
    return repeatable


def audit_sample_level(target_epsilon: float, mode: str = "correct", settings: AuditSettings = AuditSettings(),
                       seed: int | None = None, name: str = "", repeatable: bool | None = None) -> AuditResult:
    """One DP-SGD run (``dp_train``) with Dirac canaries; the bound against the epsilon of
    ``(sigma, q, steps)``, sigma chosen for ``target_epsilon`` (module docstring)."""
    from fedtune.privacy.accounting import epsilon, noise_for_target
    from fedtune.privacy.randomness import dp_generator
    from fedtune.privacy.sample_level import SampleDPSettings, dp_train, poisson_batches

    repeatable = _check_mode("sample", mode, repeatable)
    started = time.monotonic()
    s = settings
    m, h = s.canaries, s.sample_honest_dims
    coins = draw_coins(m, seed)
    n, d = m + s.sample_honest, m + h
    q, steps = s.sample_rate, s.steps
    sigma = noise_for_target(target_epsilon, s.delta, q, steps)
    reported = epsilon([(sigma, q, steps)], s.delta)
    used = 0.0 if mode == "noise-off" else sigma
    run_seed = int(coins.rng.integers(0, 2**63 - 1))  # the run's seed: the coordinator's (and so the auditor's) in research mode

    honest = torch.zeros(s.sample_honest, d, dtype=torch.float32)
    honest[:, m:] = torch.from_numpy(coins.rng.normal(size=(s.sample_honest, h)).astype(np.float32))
    scale = 10.0 * s.clip  # a canary's gradient norm, well above the clip: clipped to exactly C

    def inputs(included: np.ndarray) -> torch.Tensor:
        x = torch.zeros(n, d, dtype=torch.float32)
        idx = torch.from_numpy(np.flatnonzero(included))
        x[idx, idx] = scale  # canary i: one-hot on coordinate i; out: zero (a zero gradient)
        x[m:] = honest
        return x

    def train(x: torch.Tensor) -> np.ndarray:
        model = torch.nn.Linear(d, 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        batches = poisson_batches(n, q, steps, dp_generator(repeatable, run_seed, "batches"))
        noise = dp_generator(repeatable, run_seed, "noise")

        def loss_of(module: torch.nn.Module, batch: list[int]) -> torch.Tensor:
            return -module(x[batch]).reshape(-1)  # per example: -(w . x_i)

        dp = SampleDPSettings(noise_multiplier=used, clip=s.clip, delta=s.delta)
        dp_train(model, [model.weight], batches, loss_of, dp, s.learning_rate, s.weight_decay, q * n, noise)
        return model.weight.detach()[0, :m].double().numpy().copy()

    moved = train(inputs(coins.included))  # the run; its start is 0, the canary pushes up
    if mode == "known-seed":
        # The seed is known: the same training with every canary in and every canary out
        # draws the same batches and the same noise, and coordinate i is bit for bit one of them.
        all_in, all_out = train(inputs(np.ones(m, dtype=bool))), train(inputs(np.zeros(m, dtype=bool)))
        scores = np.where((moved == all_in) & (moved != all_out), 1.0, np.where((moved == all_out) & (moved != all_in), -1.0, 0.0))
    else:
        scores = moved
    return _result(name or f"sample-{mode}-eps{target_epsilon:g}", "sample", mode, reported, scores, coins, s, sigma, used, q, steps, repeatable, started)


ADAPTER = "audit.layer.lora_B.weight"


def audit_client_level(target_epsilon: float, mode: str = "correct", settings: AuditSettings = AuditSettings(),
                       seed: int | None = None, name: str = "", repeatable: bool | None = None) -> AuditResult:
    """Rounds of DP-FedAvg (``ClientDP`` around fedavg) with Dirac canary clients; the bound
    against ``ClientDP.epsilon`` after the rounds (module docstring)."""
    from fedtune.aggregation import ClientUpdate, RoundContext, build_strategy
    from fedtune.methods.client_dp.strategy import SIGMA, ClientDP, ClientDPOptions
    from fedtune.privacy.accounting import epsilon
    from fedtune.privacy.randomness import poisson_select
    from fedtune.protocol.tensors import TensorSpec

    repeatable = _check_mode("client", mode, repeatable)
    started = time.monotonic()
    s = settings
    m, h = s.canaries, s.client_honest_dims
    coins = draw_coins(m, seed)
    d, q, rounds, clip = m + h, s.client_rate, s.rounds, s.clip
    run_seed = int(coins.rng.integers(0, 2**63 - 1))
    canary_ids = [f"canary-{i:06d}" for i in range(m)]
    honest_ids = [f"honest-{j:06d}" for j in range(s.client_honest)]
    index = {cid: i for i, cid in enumerate(canary_ids)}
    population = m + s.client_honest  # every canary is a known client; "out" ones send nothing

    adapter = {ADAPTER: torch.zeros(1, d, dtype=torch.float32)}
    if mode == "noise-off":  # configured for the target, run with no noise
        sigma = ClientDP(build_strategy("fedavg"), ClientDPOptions(clip=clip, delta=s.delta, target_epsilon=target_epsilon, rounds=rounds)).sigma({}, q)
        options = ClientDPOptions(clip=clip, delta=s.delta, noise_multiplier=0.0, repeatable=repeatable)
    else:  # the wrapper picks sigma for the target at round 1 and keeps it in the state
        options = ClientDPOptions(clip=clip, delta=s.delta, target_epsilon=target_epsilon, rounds=rounds, repeatable=repeatable)
    strategy = ClientDP(build_strategy("fedavg"), options, seed=run_seed)
    state = strategy.initial_state(adapter)
    spec = {ADAPTER: TensorSpec((1, d), torch.float32)}
    scores = np.zeros(m)
    seen = np.zeros(m, dtype=bool)     # known-seed: selected at least once (the auditor knows who)
    inside = np.zeros(m, dtype=bool)   # known-seed: a selected round showed the canary's C
    for number in range(1, rounds + 1):
        selected = poisson_select(canary_ids + honest_ids, q, repeatable, run_seed, number)
        start = state[ADAPTER]
        updates = []
        for cid in selected:
            sent = start.clone()
            if cid in index:
                if not coins.included[index[cid]]:
                    continue  # an "out" canary: absent from the sum
                sent[0, index[cid]] += 2.0 * clip  # a Dirac update, clipped to C e_i
            else:
                sent[0, m:] += torch.from_numpy(coins.rng.normal(scale=clip, size=h).astype(np.float32))
            updates.append(ClientUpdate(cid, {ADAPTER: sent}, 1, {"train_loss": 0.0}, {ADAPTER: start}))
        ctx = RoundContext(number, {}, seed=run_seed, sampling_rate=q, population=population, global_spec=spec)
        new_state, _ = strategy.aggregate(ctx, state, updates)
        change = (new_state[ADAPTER][0, :m].double() - start[0, :m].double()).numpy()
        if mode == "known-seed":
            # The seed is known: the same round on no update at all regenerates the noise, and
            # the selection is poisson_select's with the same seed; what is left is C / (q N)
            # for a selected canary that is in, 0 for one that is out.
            replay, _ = strategy.aggregate(ctx, {**state, SIGMA: new_state[SIGMA]}, [])  # the sigma it fixed at round 1
            residual = (new_state[ADAPTER][0, :m].double() - replay[ADAPTER][0, :m].double()).numpy()
            chosen = np.array([index[c] for c in poisson_select(canary_ids + honest_ids, q, True, run_seed, number) if c in index], dtype=np.int64)
            seen[chosen] = True
            inside[chosen] |= residual[chosen] > clip / (2 * q * population)
        scores += change
        state = new_state
    if mode == "known-seed":
        scores = np.where(inside, 1.0, np.where(seen, -1.0, 0.0))
    if mode == "noise-off":
        reported, used = epsilon([(sigma, q, 1)] * rounds, s.delta), 0.0
    else:
        reported = strategy.epsilon(state)
        sigma = used = float(state[SIGMA])
    return _result(name or f"client-{mode}-eps{target_epsilon:g}", "client", mode, reported, scores, coins, s, sigma, used, q, rounds, repeatable, started)


def audit(level: str, target_epsilon: float, mode: str = "correct", settings: AuditSettings = AuditSettings(),
          seed: int | None = None, name: str = "", repeatable: bool | None = None) -> AuditResult:
    """One audit: ``level`` sample or client, ``mode`` correct, noise-off or known-seed."""
    _check_mode(level, mode, repeatable)
    run = audit_sample_level if level == "sample" else audit_client_level
    return run(target_epsilon, mode, settings, seed, name, repeatable)


# ---------------------------------------------------------------------------- the standard rows


BROKEN_EPSILON = 1.0  # what the broken rows report: well under the cap of 1000 canaries


def standard_rows(levels: Iterable[str] = LEVELS, epsilons: Iterable[float] = (1.0, 4.0, 8.0), broken: bool = True) -> list[tuple[str, str, float, str]]:
    """(name, level, target epsilon, mode) of the benchmark's rows: the correct mechanisms at
    each epsilon, then the broken ones (the sample-level rows unsuffixed, as named in the
    benchmark)."""
    levels, epsilons = list(levels), list(epsilons)
    rows = [(f"{level}-eps{e:g}", level, float(e), "correct") for level in levels for e in epsilons]
    if broken:
        for mode in MODES[1:]:
            for level in levels:
                rows.append((f"broken-{mode}" + ("" if level == "sample" else "-client"), level, BROKEN_EPSILON, mode))
    return rows


def run_rows(rows: Sequence[tuple[str, str, float, str]], settings: AuditSettings = AuditSettings(), seed: int | None = None,
             progress=None) -> list[AuditResult]:
    """Every row, each with coins of its own: from ``seed`` and the row's name when a seed is
    given (repeatable audit), else a fresh secret per row."""
    from fedtune.rng import derive_seed

    out = []
    for name, level, eps, mode in rows:
        if progress:
            progress(name)
        row_seed = None if seed is None else derive_seed(seed, "privacy-audit", name)
        out.append(audit(level, eps, mode, settings, row_seed, name))
    return out


def report(results: Sequence[AuditResult], settings: AuditSettings, seed: int | None = None, seconds: float | None = None) -> dict:
    """The JSON of a set of rows: ``{"rows": [...], <settings>}``."""
    return {
        "rows": [r.row() for r in results],
        "method": "Steinke, Nasr, Jagielski 2023: one run, canaries included with probability 1/2, bound for (eps, delta)-DP",
        "confidence": 1 - settings.beta,
        "guess_counts": [list(k) for k in guess_counts(settings.canaries)],
        "multiple_comparisons": "Bonferroni: each guess count tested at beta / len(guess_counts)",
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "wall_seconds": seconds,
    }


COLUMNS = ("row", "eps reported", "eps lower bound", "canaries", "guesses", "correct", "k+/k-", "sigma (used)", "held")


def table_cells(r: AuditResult) -> list[str]:
    verdict = ("ok" if r.held else "EXCEEDED") if r.mode == "correct" else ("caught" if r.held else "MISSED")
    return [r.name, f"{r.epsilon_reported:.3f}", f"{r.epsilon_lower_bound:.3f}", str(r.canaries), str(r.guesses), str(r.correct),
            f"{r.k_plus}/{r.k_minus}", f"{r.noise_multiplier:.3g} ({r.noise_multiplier_used:.3g})", verdict]


def format_table(results: Sequence[AuditResult]) -> str:
    """The rows as plain text, one line each."""
    rows = [list(COLUMNS)] + [table_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows)
