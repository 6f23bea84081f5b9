"""FedSA-LoRA's options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FedSAOptions:
    # Fraction of each client's data held out to evaluate its personalized model (global A, its
    # own B) at the start of every round; 0 turns that evaluation off.
    personal_eval: float = 0.2
