"""A device's own privacy policy: what the device demands whatever the coordinator asks.

The coordinator chooses a run's DP settings, and it could simply switch DP off, lower the
noise, raise delta, or ask for research mode (noise from a seed it knows). A device owner who
wants a guarantee that holds against the coordinator sets a policy
(``fedtune client --max-epsilon E --min-noise-multiplier S --delta D``, or a ``[privacy]`` table
in the file given with ``fedtune client --config FILE``; flags override the file), and the device refuses any task that would:

- train without sample-level DP-SGD;
- use a noise multiplier below ``min_noise_multiplier``;
- account at a delta above the device's ``delta``;
- take the device's epsilon (its whole history, earlier federations included, at its delta)
  past ``max_epsilon``;
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

    def check_task(self, dp_clip: float, dp_delta: float, dp_repeatable: bool) -> None:
        """Refuse a task that is weaker than the policy before anything is trained."""
        if dp_repeatable and not self.allow_known_seed:
            raise PrivacyRefusal("the task asks for research-mode DP (noise and batches drawn from a seed the coordinator knows), "
                                 "which protects nothing from the coordinator; this device does not allow it")
        if not self.active:
            return
        if dp_clip <= 0:
            raise PrivacyRefusal(f"this device trains only with sample-level DP ({self.describe()}); the task asks for none")
        if self.delta and dp_delta > self.delta:
            raise PrivacyRefusal(f"the task's delta {dp_delta:g} is above this device's {self.delta:g}")

    def check_round(self, noise_multiplier: float, sample_rate: float, steps: int, task_delta: float, history: Sequence) -> None:
        """Refuse a round whose noise is below the policy's or whose epsilon, added to what the
        device has spent, would pass the device's own cap."""
        if self.min_noise_multiplier and noise_multiplier < self.min_noise_multiplier:
            raise PrivacyRefusal(f"the task's noise multiplier {noise_multiplier:.4g} is below this device's minimum {self.min_noise_multiplier:g}")
        if self.max_epsilon:
            delta = self.delta or task_delta
            after = epsilon([*history, (noise_multiplier, sample_rate, steps)], delta)
            if after > self.max_epsilon:
                raise BudgetSpent(f"this device's privacy policy: the round would take its epsilon to {after:.4g} > its maximum "
                                  f"{self.max_epsilon:g} (spent {epsilon(history, delta):.4g} at delta {delta:g})")
