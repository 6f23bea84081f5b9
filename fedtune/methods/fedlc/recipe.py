"""FedLC's client: cross-entropy on logits calibrated by the client's own label distribution.

Two calibrations (``calibration`` option):

- ``prior`` (default): ``z_y + tau * log p_y`` with ``p_y = (n_y + 1) / (n + K)``, the client's
  smoothed label prior (logit adjustment, "balanced softmax"): the loss no longer rewards the
  model for predicting the client's frequent classes, since the prior already does.
- ``fedlc``: ``z_y - tau * max(n_y, 1) ** (-1/4)``, the pairwise calibration of Zhang et al.
  (2022) in its softmax form.

Evaluation and inference use the plain logits. Sequence classification only.

Under sample-level DP-SGD (``dp_clip > 0``) the true histogram cannot be used: it ties every
example's loss to every other example's label (removing one example changes all the others'
gradients, so the clip norm no longer bounds a step's sensitivity), and the model it trains
releases it without noise. The device then releases its histogram once through a Gaussian
mechanism of its own: each class count plus N(0, prior_noise^2) (count sensitivity 1 under
adding or removing an example), clamped at 0, drawn from the device's secrets
(``fedtune.privacy.randomness``; the round's seed in research mode). The noised prior is kept in
the device's privacy state (``privacy["label_priors"]``, one per label set) and reused by every
later round, which is post-processing and costs nothing more; its one-time cost,
``(prior_noise, 1.0, 1)``, joins the device's accountant history before the round's budget check
and target-noise search, once the device's policy has accepted it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.client.recipes.base import RECIPES, LocalOptions, Recipe, TrainSettings
from fedtune.methods.fedlc.options import FedLCOptions
from fedtune.privacy.randomness import dp_generator


@dataclass(frozen=True)
class FedLCRecipeOptions(FedLCOptions, LocalOptions):
    """FedLC's options (checked by the same dataclass as on the coordinator) and those every
    recipe understands."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dp_clip > 0 and self.prior_noise == 0:
            raise ValueError("prior_noise must be > 0 under DP-SGD (dp_clip > 0): a noiseless label prior has no privacy")


def calibration(counts: torch.Tensor, tau: float, kind: str = "prior") -> torch.Tensor:
    """The per-class shift added to the logits during local training."""
    counts = counts.to(torch.float64)
    if kind == "prior":
        return tau * torch.log((counts + 1) / (counts.sum() + counts.numel()))
    return -tau * counts.clamp(min=1).pow(-0.25)


def calibrated_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, tau: float, kind: str = "prior", reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits + calibration(counts, tau, kind).to(logits.dtype), labels, reduction=reduction)


@RECIPES.register("fedlc")
class FedLCRecipe(Recipe):
    name = "fedlc"
    Options = FedLCRecipeOptions
    procedure = False

    # The round's settings (research mode draws the noised prior from its seed, and the
    # prior is checked together with the round that will use it); set by ``run``.
    round_settings: TrainSettings | None = None

    @property
    def round_seed(self) -> int | None:
        return None if self.round_settings is None else self.round_settings.seed

    def run(self, model, start, extras, task, items, settings: TrainSettings, pad_id, device="cpu", eval_items=()):
        self.round_settings = settings
        return super().run(model, start, extras, task, items, settings, pad_id, device, eval_items)

    def begin(self, model, extras, items, task) -> None:
        super().begin(model, extras, items, task)
        if task.name != "seq-cls":
            raise ValueError("fedlc calibrates class logits: it needs a sequence-classification task")
        classes = int(model.config.num_labels)
        if self.options.dp_clip > 0:
            id2label = getattr(model.config, "id2label", None) or {}
            labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(classes)]
            counts = self.private_counts(items, labels)
        else:
            counts = torch.bincount(torch.tensor([it.target for it in items], dtype=torch.long), minlength=classes)
        self.counts = counts.to(next(model.parameters()).device)

    def finish(self, model, state):
        """Under DP-SGD, report the noise multiplier the kept prior was drawn with, with every
        update, so the coordinator's privacy report counts its one-time cost in the device's
        history."""
        more, metrics = super().finish(model, state)
        if self.options.dp_clip > 0:
            metrics = {**metrics, "dp_sample_prior_noise": self.prior_noise_used}
        return more, metrics

    # The noise multiplier of the prior this round used (set by private_counts).
    prior_noise_used: float = 0.0

    def private_counts(self, items, labels: list[str]) -> torch.Tensor:
        """The device's noised label histogram over ``labels``: drawn (and its cost recorded)
        at the first DP round for that label set, read back from the privacy state at every
        later one. The device's policy sees the mechanism (its noise, its epsilon added to the
        device's history, its delta) before anything is drawn."""
        from fedtune.client.policy import PrivacyPolicy

        priors = self.privacy.setdefault("label_priors", {})
        key = json.dumps(labels)  # the coordinator names the labels: no separator can be trusted
        kept = priors.get(key)
        if kept is None:
            o = self.options
            if o.dp_repeatable and self.round_seed is None:
                raise ValueError("fedlc in research mode draws its label prior from the round's seed: call run, not begin alone")
            from opacus.optimizers.optimizer import _generate_noise

            release = (float(o.prior_noise), 1.0, 1, "the label prior's noise multiplier")
            if self.round_settings is not None:  # with the round that will use it: never a prior spent in vain
                self.check_dp_round(items, self.round_settings, first=[release])
            else:
                policy = PrivacyPolicy.from_dict(self.privacy.get("policy"))
                policy.check_delta(o.dp_delta, len(items), o.dp_allow_large_delta)
                policy.check_releases([release], o.dp_delta, self.privacy.get("history", []))
            history = self.privacy.setdefault("history", [])
            index = {label: i for i, label in enumerate(labels)}
            true = torch.bincount(torch.tensor([it.target for it in items], dtype=torch.long), minlength=len(index)).to(torch.float64)
            generator = dp_generator(o.dp_repeatable, self.round_seed or 0, "label-prior")
            # Opacus' secure sampling, as for the gradient noise (robust to floating-point attacks).
            noised = true + _generate_noise(float(o.prior_noise), true, generator, secure_mode=True)
            kept = {"counts": [float(c) for c in noised.clamp(min=0.0)], "noise": float(o.prior_noise)}
            # Recorded with the prior (judged above together with the round that will use it).
            priors[key] = kept
            history.append((float(o.prior_noise), 1.0, 1))
        if len(kept["counts"]) != len(labels):
            raise ValueError(f"this device's noised label prior for {len(labels)} labels has {len(kept['counts'])} counts: its privacy state is damaged")
        self.prior_noise_used = float(kept["noise"])
        return torch.tensor(kept["counts"], dtype=torch.float64)

    def loss(self, model, inputs, task) -> torch.Tensor:
        labels = inputs["labels"]
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return calibrated_loss(logits.float(), labels, self.counts, self.options.tau, self.options.calibration)

    def output_loss(self, outputs, labels) -> torch.Tensor:
        """The calibrated loss of logits computed elsewhere (the client's head in split learning)."""
        return calibrated_loss(outputs.logits.float(), labels, self.counts, self.options.tau, self.options.calibration)

    def example_losses(self, model, inputs, task) -> torch.Tensor:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return calibrated_loss(logits.float(), inputs["labels"], self.counts, self.options.tau, self.options.calibration, reduction="none")
