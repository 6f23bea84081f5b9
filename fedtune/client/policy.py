"""A device's own privacy policy: what the device demands whatever the coordinator asks.

The coordinator chooses a run's DP settings, and it could simply switch DP off, lower the
noise, raise delta, or ask for research mode (noise from a seed it knows). A device owner who
wants a guarantee that holds against the coordinator sets a policy
(``fedtune client --max-epsilon E --min-noise-multiplier S --delta D``, or a ``[privacy]`` table
in the file given with ``fedtune client --config FILE``; flags override the file), and the device refuses any task that would:

- train without sample-level DP-SGD;
- use a noise multiplier below ``min_noise_multiplier`` (the DP-SGD noise and any other
  mechanism a recipe runs on the device's data, such as FedLC's noised label prior);
- account at a delta above the device's ``delta``, or at a delta of 1/n or more for the
  device's n examples (the coordinator's ``allow_large_delta`` does not bind a device with a
  policy);
- take the device's epsilon (its whole history, earlier federations included) past
  ``max_epsilon``, measured at the device's ``delta``, or, when it sets none, at the smaller of
  the task's delta and ``DEFAULT_DELTA`` (a coordinator could otherwise lower the epsilon the
  cap is checked against by raising delta);
- release figures computed from the device's data without noise: evaluation-only tasks and
  personalized evaluation (``personal_eval``) are refused, and the training loss is withheld
  from the metrics the device sends (see ``released_metrics``);
- draw its noise and batches from the coordinator's seed (research mode), unless
  ``allow_known_seed``.

A refusal is a ``PrivacyRefusal``: the agent logs it, tells the coordinator why (the update
header's ``declined``) and stops training for that federation. The policy is kept in the
device's state folder with its privacy history, so a restart without the flags keeps it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedtune.privacy.accounting import epsilon
from fedtune.privacy.sample_level import BudgetSpent, PrivacyRefusal

# The delta a device's epsilon cap is measured at when its policy names none (fedtune's default
# privacy.delta); a task may only lower it.
DEFAULT_DELTA = 1e-5

# Metrics a device with a policy sends: the number of steps the task asked for, and figures
# computed from what DP-SGD released (the codec's error on the noised update, the accountant's
# own figures). Anything else is withheld: a recipe's training loss or personalized evaluation
# is a function of the private examples without noise, and even timings depend on the secret
# batch sizes and the examples' lengths (the coordinator still sees a round's wall time).
RELEASED_METRICS = ("steps", "codec_error")
RELEASED_PREFIXES = ("dp_sample_",)


@dataclass(frozen=True)
class PrivacyPolicy:
    max_epsilon: float = 0.0           # 0: no cap of the device's own
    min_noise_multiplier: float = 0.0  # 0: any noise the coordinator asks for
    delta: float = 0.0                 # 0: the task's delta (which must still be below 1/n)
    allow_known_seed: bool = False     # accept research mode (noise from the coordinator's seed)

    def __post_init__(self) -> None:
        if self.max_epsilon < 0 or self.min_noise_multiplier < 0:
            raise ValueError("max_epsilon and min_noise_multiplier must be >= 0")
        if not 0.0 <= self.delta < 1.0:
            raise ValueError(f"the policy's delta must be in [0, 1), got {self.delta}")

    @property
    def active(self) -> bool:
        """Whether the device demands sample-level DP at all."""
        return self.max_epsilon > 0 or self.min_noise_multiplier > 0 or self.delta > 0

    def describe(self) -> str:
        parts = [f"max epsilon {self.max_epsilon:g}" if self.max_epsilon else "",
                 f"noise multiplier >= {self.min_noise_multiplier:g}" if self.min_noise_multiplier else "",
                 f"delta <= {self.delta:g}" if self.delta else ""]
        return ", ".join(p for p in parts if p) or "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "PrivacyPolicy":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    @classmethod
    def from_toml(cls, path: str | Path) -> "PrivacyPolicy":
        """The policy in a device's config file: its ``[privacy]`` table (keys as the fields of
        this class). A missing file, bad TOML, an unknown key or a bad value is a ValueError
        naming the file and the key."""
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        table = data.get("privacy", {})
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [privacy] must be a table")
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ValueError(f"{path}: unknown key privacy.{unknown[0]} (valid keys: {', '.join(names)})")
        for key, value in table.items():
            want = bool if key == "allow_known_seed" else (int, float)
            if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
                raise ValueError(f"{path}: privacy.{key} must be {'true or false' if want is bool else 'a number'}, got {value!r}")
        try:
            return cls(**{k: (v if k == "allow_known_seed" else float(v)) for k, v in table.items()})
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def accounting_delta(self, task_delta: float) -> float:
        """The delta the device's cap is measured at: its own, or the smaller of the task's and
        ``DEFAULT_DELTA`` (never a larger one the coordinator chose: a larger delta gives a
        smaller epsilon for the same noise)."""
        return self.delta or min(task_delta, DEFAULT_DELTA)

    def check_task(self, dp_clip: float, dp_delta: float, dp_repeatable: bool, *,
                   evaluate_only: bool = False, personal_eval: float = 0.0) -> None:
        """Refuse a task that is weaker than the policy before anything is computed."""
        if dp_repeatable and not self.allow_known_seed:
            raise PrivacyRefusal("the task asks for research-mode DP (noise and batches drawn from a seed the coordinator knows), "
                                 "which protects nothing from the coordinator; this device does not allow it")
        if not self.active:
            return
        if evaluate_only or personal_eval > 0:
            raise PrivacyRefusal(f"the task asks this device to evaluate a model on its own examples and send the figures without "
                                 f"noise ({'an evaluation-only task' if evaluate_only else f'personal_eval {personal_eval:g}'}), which its "
                                 f"privacy policy ({self.describe()}) does not allow")
        if dp_clip <= 0:
            raise PrivacyRefusal(f"this device trains only with sample-level DP ({self.describe()}); the task asks for none")
        if self.delta and dp_delta > self.delta:
            raise PrivacyRefusal(f"the task's delta {dp_delta:g} is above this device's {self.delta:g}")

    def check_round(self, noise_multiplier: float, sample_rate: float, steps: int, task_delta: float, history: Sequence,
                    what: str = "the task's noise multiplier") -> None:
        """Refuse a round of DP-SGD (or another mechanism: ``what`` names it) that the policy does
        not allow; see ``check_releases``."""
        self.check_releases([(noise_multiplier, sample_rate, steps, what)], task_delta, history)

    def check_releases(self, releases: Sequence[tuple[float, float, int, str]], task_delta: float, history: Sequence) -> None:
        """Refuse mechanisms about to run together, each ``(noise multiplier, sample rate,
        steps, what it is)`` (a noised label prior and the round that uses it), when one has
        no noise or less than the policy's minimum, or when together, added to what the device
        has spent, they would pass its cap. Called before any of them draws anything."""
        if not self.active:
            return
        for noise, _, _, what in releases:
            if noise <= 0:
                raise PrivacyRefusal(f"{what} is {noise:g}: no noise, no privacy, which this device's policy ({self.describe()}) does not allow")
            if self.min_noise_multiplier and noise < self.min_noise_multiplier:
                raise PrivacyRefusal(f"{what} {noise:.4g} is below this device's minimum {self.min_noise_multiplier:g}")
        if self.max_epsilon:
            delta = self.accounting_delta(task_delta)
            after = epsilon([*history, *((n, q, k) for n, q, k, _ in releases)], delta)
            if after > self.max_epsilon:
                named = " with ".join(f"{what} {n:.4g}" for n, _, _, what in releases)
                raise BudgetSpent(f"this device's privacy policy: {named} would take its epsilon to {after:.4g} > "
                                  f"its maximum {self.max_epsilon:g} (spent {epsilon(history, delta):.4g} at delta {delta:g})")

    def check_delta(self, task_delta: float, examples: int, allowed_by_task: bool) -> None:
        """Refuse a delta of 1/n or more for the device's ``examples`` (such a delta lets
        (epsilon, delta)-DP release an example outright). The task's ``allowed_by_task`` lifts
        that only for a device without a policy: the coordinator cannot waive a device's terms."""
        if task_delta < 1.0 / examples or (allowed_by_task and not self.active):
            return
        waived = " (the task allows it, but this device's privacy policy does not let the coordinator waive it)" if allowed_by_task else ""
        raise PrivacyRefusal(f"delta {task_delta:g} is not below 1/n = {1.0 / examples:.3g} for this device's {examples} examples: "
                             f"(epsilon, delta) would allow releasing one of them outright{waived}")

    def released_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The metrics the device may send: all of them without a policy; with one, only those
        that are public or computed from DP-SGD's releases (``RELEASED_METRICS``)."""
        if not self.active:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if k in RELEASED_METRICS or k.startswith(RELEASED_PREFIXES)}
