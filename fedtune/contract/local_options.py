"""The options every recipe understands (``LocalOptions``): what the coordinator's strategies
ask of a device's training by option key in an instruction (``keep`` for FedSA, ``dp_*`` for
sample-level DP, ``personal_eval``), and what the device's recipes read. Each recipe's options
extend them with the method's own options dataclass (``fedtune.methods.<method>.options``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.options import MethodOptions


@dataclass(frozen=True)
class DPSGDOptions(MethodOptions):
    """Sample-level DP-SGD as a device runs it (``fedtune.privacy.sample_level``), off while
    ``dp_clip`` is 0. The coordinator's SampleDP wrapper is configured with this same dataclass
    (``fedtune.methods.sample_dp.options``) and sends its fields under these names: one schema,
    one set of checks, on both sides."""

    # Per-example gradients clipped to dp_clip, noise std dp_noise_multiplier * dp_clip, Poisson
    # batches; the device declines a round that would take its epsilon (at dp_delta) past dp_budget.
    dp_clip: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    dp_budget: float = 0.0
    # Instead of dp_noise_multiplier: the smallest sigma that spends at most this epsilon over
    # dp_total_steps steps at this device's sample rate (fixed at its first round).
    dp_target_epsilon: float = 0.0
    dp_total_steps: int = 0
    # Research mode: batch masks and noise drawn from the round's seed, which the coordinator
    # knows, so the run repeats; no guarantee against whoever knows the seed. Off: secrets of
    # the device. A device accepts it only when its own policy allows (fedtune.client.policy).
    dp_repeatable: bool = False
    # Proceed although dp_delta >= 1/n for this device's n examples (the run says why).
    dp_allow_large_delta: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dp_clip", "dp_noise_multiplier", "dp_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.dp_delta < 1.0:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_target_epsilon < 0 or (self.dp_target_epsilon and self.dp_total_steps < 1):
            raise ValueError("dp_target_epsilon must be >= 0 and needs dp_total_steps")


@dataclass(frozen=True)
class LocalOptions(DPSGDOptions):
    """Options every recipe understands."""

    recipe: str = "local"
    # Comma-separated name suffixes of adapter tensors the device keeps for itself between
    # rounds and does not send (FedSA-LoRA: ".lora_B.weight").
    keep: str = ""
    # Fraction of the device's examples held out to evaluate its personalized model (the
    # starting adapter with its kept tensors) before training; 0: no personalized evaluation.
    personal_eval: float = 0.0
    # Train nothing: evaluate the personalized model on the held-out share and send back only
    # the metrics (the evaluation round after the last training round).
    evaluate_only: bool = False
    # and sample-level DP-SGD's dp_* fields (DPSGDOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.personal_eval < 1.0:
            raise ValueError("personal_eval must be in [0, 1)")
        if self.evaluate_only and self.personal_eval <= 0:
            raise ValueError("evaluate_only needs personal_eval > 0 (the held-out share it evaluates on)")

    @property
    def kept_suffixes(self) -> tuple[str, ...]:
        return tuple(s for s in self.keep.split(",") if s)
