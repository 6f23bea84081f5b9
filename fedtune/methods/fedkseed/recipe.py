"""FedKSeed's client (see ``fedtune.methods.fedkseed.strategy``): two-sided zeroth-order steps along
perturbations regenerated from a pool of seeds; it sends each step's (seed index, scalar).

Each step draws a seed index from the coordinator's probabilities (a generator seeded by the
round's seed), evaluates the batch loss at θ + εz and θ - εz (dropout off, so both see the same
function), and applies θ ← θ - lr g z with ``fedtune.compression.seeds.apply_step``, the same
operation the coordinator replays. The parameters are restored from a copy after the two
evaluations, not by subtracting εz again, so no rounding drift separates the client's θ from
the replayed one. The scalar is rounded to float32, as it travels, before the step uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedtune.adapters import adapter_parameters, load_adapter_state
from fedtune.client.recipes.base import RECIPES, LocalOptions, Recipe, TrainSettings
from fedtune.compression.seeds import apply_step, perturbation, pool_seeds
from fedtune.methods.fedkseed.options import GRADS, PROBS, SEEDS, FedKSeedOptions
from fedtune.tasks import EncodedExample, Task
from fedtune.tasks.base import sample_batches


@dataclass(frozen=True)
class FedKSeedRecipeOptions(FedKSeedOptions, LocalOptions):
    """FedKSeed's options (checked by the same dataclass as on the coordinator) and those every
    recipe understands, with the seed the coordinator draws its pool from."""

    recipe: str = "fedkseed"
    pool_seed: int = 0  # the run's seed (the coordinator's pool_seeds(seed, pool)), not a setting

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep:
            raise ValueError("recipe fedkseed keeps no tensors on the device")
        if self.dp_clip > 0:
            raise ValueError("recipe fedkseed takes zeroth-order steps; sample-level DP-SGD does not apply to it")


@RECIPES.register("fedkseed")
class FedKSeedRecipe(Recipe):
    name = "fedkseed"
    Options = FedKSeedRecipeOptions

    def run(self, model, start, extras, task: Task, items: Sequence[EncodedExample], settings: TrainSettings, pad_id: int, device="cpu", eval_items=()):
        o = self.options
        probs = extras.get(PROBS)
        if set(extras) != {PROBS} or probs is None or tuple(probs.shape) != (o.pool,):
            raise ValueError(f"recipe fedkseed needs exactly {PROBS!r} with {o.pool} probabilities")
        if not torch.isfinite(probs).all() or (probs < 0).any() or float(probs.sum()) <= 0:
            raise ValueError("recipe fedkseed: the seed probabilities are not a distribution")
        load_adapter_state(model, start)
        device = torch.device(device)
        model.to(device)
        model.eval()  # no dropout: both evaluations of a step see the same function
        metrics = {f"personal_{k}": v for k, v in task.evaluate(model, eval_items, pad_id).items()} if eval_items else {}
        params = adapter_parameters(model)
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        pool = pool_seeds(o.pool_seed, o.pool)
        picker = torch.Generator().manual_seed(settings.seed)
        order = torch.Generator().manual_seed(settings.seed + 1)
        seeds, grads, losses = [], [], []
        with torch.no_grad():
            for batch in sample_batches(items, o.steps, settings.batch_size, order):
                inputs = {k: v.to(device) for k, v in task.collate(batch, pad_id).items()}
                k = int(torch.multinomial(probs.float().cpu(), 1, generator=picker))
                z = perturbation(pool[k], shapes)
                saved = {n: p.detach().clone() for n, p in params.items()}
                apply_step(params, z, -1.0, o.eps)                  # θ + εz
                plus = float(self.loss(model, inputs, task))
                apply_step(params, z, 2.0, o.eps)                   # θ - εz
                minus = float(self.loss(model, inputs, task))
                for n, p in params.items():
                    p.copy_(saved[n])
                g = float(torch.tensor((plus - minus) / (2 * o.eps), dtype=torch.float32))
                if not math.isfinite(g):
                    g = 0.0  # a diverged evaluation: this step does nothing, on both sides
                apply_step(params, z, g, o.lr)
                seeds.append(k)
                grads.append(g)
                losses.append((plus + minus) / 2)
        metrics.update({"train_loss": sum(losses) / len(losses), "steps": float(len(losses)), "zo_scalar_abs_mean": sum(abs(g) for g in grads) / len(grads)})
        return {SEEDS: torch.tensor(seeds, dtype=torch.int32), GRADS: torch.tensor(grads, dtype=torch.float32)}, metrics
