"""HetLoRA's options and the tensor a pruning client sends back. The strategy reads all of them;
with rank self-pruning on, it sends ``rank_pruning`` and ``rank_pruning_keep`` to the clients,
whose recipe reads them under the same names from this same dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.options import MethodOptions

WEIGHTINGS = ("examples", "norm")
RANK_CAP_TENSOR = "hetlora/rank_cap"  # what a pruning client sends back: its largest rank from now on


@dataclass(frozen=True)
class HetLoRAOptions(MethodOptions):
    freeze_remainder: bool = True
    # "examples" or "norm" (each client's ||B_k A_k||_F per module)
    weighting: str = "examples"
    # Weight of the tail-rank penalty for rank self-pruning; 0 turns pruning off.
    rank_pruning: float = 0.0
    # Fraction of the rank a client keeps when it prunes (and where its tail starts).
    rank_pruning_keep: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
        if self.rank_pruning < 0:
            raise ValueError("rank_pruning must be >= 0")
        if not 0 < self.rank_pruning_keep < 1:
            raise ValueError("rank_pruning_keep must be in (0, 1)")
