"""FedKSeed's options and the tensor names its strategy and recipe exchange. The strategy reads
every option and sends ``pool``, ``steps``, ``lr`` and ``eps`` to the clients, whose recipe checks
them with this same dataclass (the pool's limit included)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.names import namespaced
from fedtune.options import MethodOptions

FEDKSEED = "fedkseed"                  # the namespace of FedKSeed's tensors, its server state's too
PROBS = namespaced(FEDKSEED, "probs")  # instruction: the pool's sampling probabilities
SEEDS = namespaced(FEDKSEED, "seeds")  # update: the seed index of each step (int32)
GRADS = namespaced(FEDKSEED, "grads")  # update: the scalar measured at each step (float32)
MAX_POOL = 1 << 20
# The options the clients get (the rest are the coordinator's).
CLIENT_OPTIONS = ("pool", "steps", "lr", "eps")


@dataclass(frozen=True)
class FedKSeedOptions(MethodOptions):
    pool: int = 1024          # K: seeds in the pool
    steps: int = 100          # zeroth-order steps per client per round
    lr: float = 1e-4          # step size of each zeroth-order step
    eps: float = 1e-3         # perturbation scale of the two-sided difference
    importance: bool = True   # sample seeds by the magnitude of their past scalars
    clip: float = 1000.0      # scalars are clipped to [-clip, clip] in the importance statistics

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.pool <= MAX_POOL:
            raise ValueError(f"pool must be in 1..{MAX_POOL}")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.lr <= 0 or self.eps <= 0 or self.clip <= 0:
            raise ValueError("lr, eps and clip must be positive")
