"""The recipe interface, the plain first-order recipe, and the training loop they share.

``Recipe.run`` loads the starting adapter (with whatever the device kept from earlier rounds),
trains ``local_steps`` AdamW steps, and returns the tensors to send and the metrics. A recipe
changes training through five hooks: ``begin`` (see the instruction's extra tensors and the
data), ``loss`` (the task loss of a batch), ``penalty`` (a term added to it), ``after_backward`` (edit gradients), and
``finish`` (extra tensors and metrics to send). ``memory`` is the recipe's own dict that the
agent keeps between rounds: personal B matrices, control variates, a tail-norm history.

Randomness (data order, dropout) comes from the round's seed only: the batch order from a
dedicated generator, each step's dropout from a generator of the training thread's own seeded
for that step (``fedtune.rng.thread_draws``), so a client's round is repeatable and the same
whatever other clients train beside it in the process.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from fedtune.adapters import adapter_state, load_adapter_state
from fedtune.contract.local_options import LocalOptions
from fedtune.methods import discover
from fedtune.names import ends_with
from fedtune.options import build_options
from fedtune.registry import Registry
from fedtune.rng import step_seed, thread_draws
from fedtune.tasks import EncodedExample, Task
from fedtune.tasks.base import sample_batches


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def add_terms(*terms: "torch.Tensor | None") -> "torch.Tensor | None":
    """The sum of the terms that are there (None when none is): corrections composed on one
    recipe each add their penalty to the others'."""
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


class Recipe:
    """Plain local training: AdamW on the adapter's trainable tensors, the task's loss."""

    name: ClassVar[str] = "local"
    Options: ClassVar[type] = LocalOptions
    # A procedure trains (local steps, split steps, zeroth-order steps). A correction
    # (``procedure = False``: FedLC's calibration, FedProx's proximal term, SCAFFOLD's control
    # variates, HetLoRA's tail penalty) overrides hooks only, calling ``super()`` in each, so it
    # composes with whichever procedure it is put in front of: "fedlc+split" (see make_recipe).
    procedure: ClassVar[bool] = True

    def __init__(self, options: Any, memory: dict, privacy: dict | None = None) -> None:
        self.options = options
        self.memory = memory
        # The device's privacy accounting, shared by every recipe it runs: {"history": [...]}.
        self.privacy = privacy if privacy is not None else {}

    # ---------------------------------------------------------------- hooks

    def begin(self, model: torch.nn.Module, extras: Mapping[str, torch.Tensor], items: Sequence[EncodedExample], task: Task) -> None:
        """Called after the starting adapter is loaded. ``extras`` are the instruction's tensors
        that belong to this recipe (namespaced names); a recipe that expects none refuses them."""
        if extras:
            raise ValueError(f"recipe {self.name!r} does not use tensors {sorted(extras)[:3]}")

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
        return model(**inputs).loss

    def output_loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """The loss of a model output computed elsewhere (the head of a split model): the
        model's own by default; a correction of the loss changes this too."""
        return outputs.loss

    def example_losses(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
        """The loss of each example of the batch, computed from that example alone (DP-SGD
        clips these per example). A recipe that changes ``loss`` must give its per-example
        form here, or DP-SGD refuses it."""
        return task.example_losses(model, inputs)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """A term added to the objective (proximal term, tail penalty); not part of the
        reported train_loss, so losses stay comparable across recipes."""
        return None

    def after_backward(self, model: torch.nn.Module) -> None:
        pass

    def finish(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Extra tensors to send (namespaced names) and extra metrics."""
        return {}, {}

    # ---------------------------------------------------------------- the round

    def run(
        self,
        model: torch.nn.Module,
        start: Mapping[str, torch.Tensor],
        extras: Mapping[str, torch.Tensor],
        task: Task,
        items: Sequence[EncodedExample],
        settings: TrainSettings,
        pad_id: int,
        device: torch.device | str = "cpu",
        eval_items: Sequence[EncodedExample] = (),
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One round. With ``eval_items``, the starting model (the coordinator's adapter with
        this device's kept tensors: its personalized model) is evaluated on them first; with
        the option ``evaluate_only`` that is all, and nothing is sent."""
        kept = self.options.kept_suffixes
        start = dict(start)
        if kept:  # the device's own tensors replace the coordinator's where it has them
            mine = self.memory.get("kept", {})
            start.update({k: v for k, v in mine.items() if k in start and v.shape == start[k].shape})
        load_adapter_state(model, start)
        device = torch.device(device)
        model.to(device)
        personal = {}
        if eval_items:
            personal = {f"personal_{k}": v for k, v in task.evaluate(model, eval_items, pad_id).items()}
        if self.options.evaluate_only:
            return {}, personal
        self.begin(model, {k: v.to(device) for k, v in extras.items()}, items, task)
        metrics = {**personal, **self.train(model, task, items, settings, pad_id, device)}
        state = adapter_state(model)
        more, extra_metrics = self.finish(model, state)
        send = {**state, **more}
        if kept:
            self.memory["kept"] = {k: v for k, v in state.items() if ends_with(k, kept)}
            send = {k: v for k, v in send.items() if not ends_with(k, kept)}
        return send, {**metrics, **extra_metrics}

    def train(self, model: torch.nn.Module, task: Task, items: Sequence[EncodedExample], settings: TrainSettings, pad_id: int, device: torch.device) -> dict[str, float]:
        if self.options.dp_clip > 0:
            return self.train_private(model, task, items, settings, pad_id, device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        order = torch.Generator().manual_seed(settings.seed)
        losses = []
        for step, batch in enumerate(sample_batches(items, settings.local_steps, settings.batch_size, order)):
            inputs = {k: v.to(device) for k, v in task.collate(batch, pad_id).items()}
            with thread_draws(step_seed(settings.seed, step)):  # dropout: this step's own masks
                loss = self.loss(model, inputs, task)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
            extra = self.penalty(model)
            objective = loss if extra is None else loss + extra
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.after_backward(model)
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        self.step_losses = losses
        return {"train_loss": sum(losses) / len(losses), "steps": float(len(losses))}


    def dp_round(self, items: Sequence[EncodedExample], settings: TrainSettings, first: Sequence[tuple[float, float, int]] = ()) -> tuple[float, float]:
        """The noise multiplier and sample rate of this device's next round of DP-SGD: the
        task's noise multiplier, or with a target epsilon the smallest one that ends the task's
        ``dp_total_steps`` at it given what the device has spent (and the mechanisms ``first``,
        about to run before the round), fixed once a round with that target is accepted
        (``privacy["sigmas"]``). Stores nothing."""
        from fedtune.privacy.accounting import noise_for_target
        from fedtune.privacy.sample_level import BudgetSpent

        o = self.options
        q = min(1.0, settings.batch_size / len(items))
        if not o.dp_target_epsilon:
            return o.dp_noise_multiplier, q
        cached = self.privacy.get("sigmas", {}).get(self._sigma_key(q))
        if cached is not None:
            return float(cached), q
        try:
            return noise_for_target(o.dp_target_epsilon, o.dp_delta, q, o.dp_total_steps, spent=[*self.privacy.get("history", []), *first]), q
        except ValueError as exc:
            raise BudgetSpent(f"target epsilon {o.dp_target_epsilon:g}: {exc}") from None

    def _sigma_key(self, q: float) -> str:
        o = self.options
        return json.dumps([o.dp_target_epsilon, o.dp_delta, q, o.dp_total_steps])

    def check_dp_round(self, items: Sequence[EncodedExample], settings: TrainSettings,
                       first: Sequence[tuple[float, float, int, str]] = ()) -> tuple[float, float]:
        """Check the next round of DP-SGD, with the mechanisms ``first`` that run on the same
        examples before it (``(noise multiplier, sample rate, steps, what)``: FedLC's noised
        label prior), against the device's policy and the task's budget, before anything is
        drawn; returns the round's (noise multiplier, sample rate). PrivacyRefusal or
        BudgetSpent say why not."""
        from fedtune.client.policy import PrivacyPolicy
        from fedtune.privacy.sample_level import SampleDPSettings, check_budget

        o = self.options
        history = self.privacy.get("history", [])
        policy = PrivacyPolicy.from_dict(self.privacy.get("policy"))
        policy.check_delta(o.dp_delta, len(items), o.dp_allow_large_delta)
        before = [f[:3] for f in first]
        sigma, q = self.dp_round(items, settings, before)
        policy.check_releases([*first, (sigma, q, settings.local_steps, "the task's noise multiplier")], o.dp_delta, history)
        check_budget(SampleDPSettings(sigma, o.dp_clip, o.dp_delta, o.dp_budget or o.dp_target_epsilon), [*history, *before], q, settings.local_steps)
        return sigma, q

    def train_private(self, model: torch.nn.Module, task: Task, items: Sequence[EncodedExample], settings: TrainSettings, pad_id: int, device: torch.device) -> dict[str, float]:
        """DP-SGD (fedtune.privacy.sample_level): the same steps, with per-example clipping,
        noise and Poisson batches; the round is added to the device's privacy history.

        The batch masks and the noise come from secrets of this device (never the round's seed,
        which the coordinator knows) unless the task asks for research mode
        (``dp_repeatable``), which the agent accepts only where the device's policy allows it."""
        from fedtune.privacy.accounting import epsilon
        from fedtune.privacy.randomness import dp_generator
        from fedtune.privacy.sample_level import SampleDPSettings, dp_train, poisson_batches

        if type(self).penalty is not Recipe.penalty or type(self).after_backward is not Recipe.after_backward:
            raise ValueError(f"recipe {self.name!r} changes gradients or adds a penalty, which sample-level DP-SGD cannot clip per example")
        if type(self).loss is not Recipe.loss and type(self).example_losses is Recipe.example_losses:
            raise ValueError(f"recipe {self.name!r} changes the loss but gives no per-example form of it, which DP-SGD needs")
        o = self.options
        sigma, q = self.check_dp_round(items, settings)
        if o.dp_target_epsilon:  # fixed for this target once a round with it is accepted
            self.privacy.setdefault("sigmas", {})[self._sigma_key(q)] = sigma
        history = self.privacy.setdefault("history", [])
        dp = SampleDPSettings(sigma, o.dp_clip, o.dp_delta, o.dp_budget or o.dp_target_epsilon)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        repeatable = o.dp_repeatable
        batches = poisson_batches(len(items), q, settings.local_steps, dp_generator(repeatable, settings.seed, "batches"))
        noise = dp_generator(repeatable, settings.seed, "noise", device=device)

        forwards = iter(range(1 << 62))

        def loss_of(wrapped: torch.nn.Module, batch: list[int]) -> torch.Tensor:
            inputs = {k: v.to(device) for k, v in task.collate([items[i] for i in batch], pad_id).items()}
            with thread_draws(step_seed(settings.seed, next(forwards))):
                return self.example_losses(wrapped, inputs, task)

        losses = dp_train(model, params, batches, loss_of, dp, settings.learning_rate, settings.weight_decay, q * len(items), noise)
        if not losses:  # every Poisson batch was empty: report the loss of the unchanged model
            with torch.no_grad():
                losses = [float(loss_of(model, list(range(min(len(items), settings.batch_size)))).mean())]
        history.append((dp.noise_multiplier, q, settings.local_steps))
        self.privacy["rounds_trained"] = int(self.privacy.get("rounds_trained", 0)) + 1
        return {
            "train_loss": sum(losses) / len(losses), "steps": float(settings.local_steps),
            "dp_sample_noise_multiplier": dp.noise_multiplier, "dp_sample_rate": q, "dp_sample_steps": float(settings.local_steps),
            "dp_sample_epsilon": epsilon(history, dp.delta),
            "dp_sample_rounds": float(self.privacy["rounds_trained"]),
            "dp_sample_secret": 0.0 if repeatable else 1.0,
            "dp_sample_large_delta": 1.0 if o.dp_delta >= 1.0 / len(items) else 0.0,
        }


RECIPES: Registry[type[Recipe]] = Registry("recipe", discover=lambda: discover("recipe"))
RECIPES.register("local")(Recipe)

_COMPOSED: dict[str, type[Recipe]] = {}
_COMPOSED_LOCK = threading.Lock()


def recipe_class(spec: str) -> type[Recipe]:
    """The recipe class of ``spec``: one registered name, or corrections joined by "+" in
    front of one procedure ("fedlc+split"; a procedure left out is plain local training,
    "fedlc" = "fedlc+local"). A composition is a class whose bases are the parts in that
    order, with one options dataclass holding every part's options. ValueError for an unknown
    name or a spec that is not corrections before one procedure."""
    names = [n for n in spec.split("+") if n] or ["local"]
    classes = [RECIPES.get(n) for n in names]
    if not classes[-1].procedure:
        classes.append(Recipe)
    if any(c.procedure for c in classes[:-1]) or len(set(classes)) != len(classes):
        raise ValueError(f"recipe {spec!r}: corrections go before one training procedure, each once "
                         f"(procedures: {', '.join(n for n in RECIPES.names() if RECIPES.get(n).procedure)})")
    if len(classes) == 1:
        return classes[0]
    key = "+".join(c.name for c in classes)
    with _COMPOSED_LOCK:
        if key not in _COMPOSED:
            # One options dataclass over every part's (a base that another base extends is left
            # out, so the dataclasses' MRO is consistent).
            options = [o for o in dict.fromkeys(c.Options for c in classes)]
            options = [o for o in options if not any(o is not p and issubclass(p, o) for p in options)]
            merged = options[0] if len(options) == 1 else dataclasses.make_dataclass(
                key.replace("+", "_") + "_options", [], bases=tuple(options), frozen=True)
            _COMPOSED[key] = type(key, tuple(classes), {"name": key, "Options": merged})
        return _COMPOSED[key]


def make_recipe(options: Mapping[str, str], memory: dict, privacy: dict | None = None) -> Recipe:
    """The recipe an instruction names, with its options checked (ValueError naming the
    problem for an unknown recipe or option). ``privacy`` is the device's accounting state."""
    cls = recipe_class(options.get("recipe", "local"))
    return cls(build_options(cls.Options, options, f"recipe {cls.name}"), memory, privacy)
