"""Sample-level DP-SGD on a device: per-example gradients clipped and noised by Opacus, batches
drawn by Poisson sampling, and the device's own accountant history.

Each step includes every local example independently with probability q = batch_size / n
(Poisson sampling, what Opacus' accountants assume), computes per-example gradients of the
trainable adapter tensors with Opacus' ``GradSampleModule``, and lets Opacus' ``DPOptimizer``
clip each example's gradient to ``clip`` and add N(0, (sigma clip)^2) before the inner AdamW
step. fedtune draws the Poisson masks and the noise from generators of its own (not the global
RNG, not Opacus' PrivacyEngine, which would need a DataLoader and keep its own accountant),
seeded with a secret the device never sends (``fedtune.privacy.randomness``); an empty batch is
still a step of the mechanism: a noise-only update.

Per-example independence: the sensitivity of a step is the clip norm only if example i's
gradient depends on example i alone. ``loss_of`` therefore returns one loss per example (a
causal-LM example's mean over its own tokens, never a mean over the batch's tokens), their sum
is differentiated (Opacus' ``loss_reduction="sum"``: per-example gradients are exactly each
example's own), and the noised sum is divided by the expected batch size, not the drawn one.

The history ``[(sigma, q, steps), ...]`` grows by one entry per round the device trains and
lives in the recipe memory the agent keeps, so the device's epsilon counts exactly the rounds
it took part in. With a state directory (``fedtune client --state-dir``) the agent stores it
across restarts, so a restart cannot reset a budget; without one, a restarted client starts a
new history.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fedtune.privacy.accounting import epsilon


class PrivacyRefusal(RuntimeError):
    """The device will not train this task: it would break the device's own privacy terms
    (its policy, its budget, a delta too large for its data). The message says why."""


class BudgetSpent(PrivacyRefusal):
    """Training one more round would take the device's epsilon past its budget."""


@dataclass(frozen=True)
class SampleDPSettings:
    noise_multiplier: float
    clip: float
    delta: float = 1e-5
    budget: float = 0.0   # 0: no budget

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.clip <= 0 or not 0 < self.delta < 1 or self.budget < 0:
            raise ValueError("sample-level DP needs noise_multiplier >= 0, clip > 0, delta in (0, 1) and budget >= 0")


def check_budget(settings: SampleDPSettings, history: list, sample_rate: float, steps: int) -> None:
    """BudgetSpent when the round about to run would take epsilon past the budget."""
    if not settings.budget:
        return
    after = epsilon([*history, (settings.noise_multiplier, sample_rate, steps)], settings.delta)
    if after > settings.budget:
        raise BudgetSpent(f"sample-level privacy budget: this round would spend epsilon {after:.4g} > budget {settings.budget:g} "
                          f"(spent {epsilon(history, settings.delta):.4g} at delta {settings.delta:g})")


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[list[int]]:
    """For each step, the indices of the examples it includes (each with probability q)."""
    return [torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().tolist() for _ in range(steps)]


def dp_train(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    batches: list[list[int]],
    loss_of: Callable[[torch.nn.Module, list[int]], torch.Tensor],
    settings: SampleDPSettings,
    learning_rate: float,
    weight_decay: float,
    expected_batch_size: float,
    noise: torch.Generator,
) -> list[float]:
    """Run the DP-SGD steps; returns the mean per-example loss of each non-empty batch
    (possibly none). ``loss_of(module, batch)`` returns a vector of ``len(batch)`` per-example
    losses; ``noise`` is the generator of the Gaussian noise (secret unless research mode)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model.train()  # Opacus records activations only in training mode
    # Summed per-example losses: Opacus' per-example gradients are then each example's own,
    # whatever the batch's size; the optimizer divides the noised sum by the expected size.
    wrapped = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.clip,
        expected_batch_size=max(1, round(expected_batch_size)),
        loss_reduction="mean",
        generator=noise,
        # Noise as a sum of Gaussians, robust to the floating-point attacks on torch.normal.
        secure_mode=True,
    )
    losses = []
    try:
        # Opacus' hooks fire on module outputs when no input needs a gradient (frozen base
        # weights): torch warns about it at every backward, harmlessly.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            if not batch:
                # An empty Poisson batch is still a step of the mechanism: it releases noise
                # alone (as Opacus does), since skipping it would reveal that nobody was drawn.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                optimizer.step()
                continue
            per_example = loss_of(wrapped, batch)
            if per_example.shape != (len(batch),):
                raise ValueError(f"DP-SGD needs one loss per example: got shape {list(per_example.shape)} for a batch of {len(batch)}")
            if not torch.isfinite(per_example).all():
                raise FloatingPointError("training loss is not finite; lower the learning rate")
            per_example.sum().backward()
            optimizer.step()
            losses.append(per_example.mean().item())
    finally:
        wrapped._close()
        model.eval()
    return losses
