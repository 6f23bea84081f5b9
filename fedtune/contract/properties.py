"""What a part of a run declares, so that one composer can tell which parts work together.

Every part that changes a round (a strategy, a LoRA variant, a privacy mechanism, a codec, the
split, the task) declares three things in the vocabulary below:

- ``provides``: properties the part brings to the run (FFA-LoRA: ``a-frozen``);
- ``refuses``: properties it cannot work with, each with the reason (FlexLoRA refuses
  ``a-frozen``: it re-factorizes B·A every round, which gives every client a new A);
- ``needs``: properties some other part must provide, each with the reason (SCAFFOLD needs
  ``sliced-state``: a control variate per global tensor).

``fedtune.compose`` collects the parts a configuration names and refuses a combination at
start with one line that names both parts and the property. Parts never check each other by
name, so a new method is composed correctly as soon as it declares what it is.

Property names are checked when a declaration is made: a typo fails at import, not silently at
run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

# The vocabulary. A new property is one line here with what it means.
PROPERTIES: dict[str, str] = {
    # the adapters clients train
    "mixed-shapes": "clients train adapters of different shapes in one round (a plan per device)",
    "a-frozen": "the A factors stay at their initialization; clients train and send B (or less)",
    "b-frozen": "the B factors stay fixed; clients train and send only what lies between the factors",
    "b-kept-on-device": "each client keeps its B factors for itself; only A (and heads) are shared",
    "sliced-state": "each client's tensors are leading blocks of global tensors of the same names",
    "frozen-weight-updates": "any client may receive an update of its frozen weights on any module of the global adapter (FLoRA's folded aggregate, the remainder of a re-factorized mean): the device holds each as a dense out x in matrix",
    "frozen-remainder": "a client whose plan is narrower than the global adapter receives the rest of it as an update of its frozen weights: the device holds each as a dense out x in matrix",
    "quantized-base": "the frozen base weights are held in 8 or 4 bits (bitsandbytes layers), not as dense float matrices",
    "refactorized": "the LoRA factors clients receive are re-factorized or drawn afresh every round, so a factor's coordinates change from one round to the next",
    "refactorized-state": "the coordinator re-factorizes the LoRA factors it keeps after every round (a change of basis), so a statistic it keeps per coordinate across rounds loses its meaning",
    "non-lora-adapter": "the adapter is not LoRA's B·A (another kind, such as LoHa's Hadamard product): no part may read, freeze or rebuild B and A",
    # what clients send and how it is aggregated
    "nonlinear-aggregate": "the aggregate is not a weighted sum of the clients' updates (SVD, stacking)",
    "extra-update-tensors": "clients send tensors besides their adapter (control variates, scalars)",
    "scalar-update": "clients send scalars and seed indices instead of tensors",
    "update-codec": "clients send their updates through a lossy uplink codec (as differences)",
    "weight-codec": "the coordinator sends the global weights through a lossy downlink codec",
    # how clients train
    "own-procedure": "clients train by a procedure of their own, not plain local steps",
    "loss-correction": "the client's objective is changed by a correction (proximal term, calibration, control variates)",
    "penalty": "a term that is not a sum of per-example losses is added to the client's objective",
    "gradient-edit": "client gradients are edited after the backward pass",
    "zeroth-order": "clients estimate gradients from loss differences, without a backward pass",
    "split-model": "the model is cut: the device runs the blocks below its cut, the coordinator the rest",
    "server-side-loss": "the coordinator computes the loss (the labels travel to it)",
    "class-logits": "the task scores classes with logits (sequence classification)",
    # privacy
    "client-noise": "the coordinator clips each client's update and noises the aggregate (client-level DP)",
    "sample-noise": "devices clip each example's gradient and add noise (sample-level DP-SGD)",
}


class DeclarationError(ValueError):
    """A declaration names a property that is not in the vocabulary."""


def _known(names: Iterable[str], where: str) -> None:
    unknown = sorted(set(names) - set(PROPERTIES))
    if unknown:
        raise DeclarationError(f"{where}: unknown propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
                               f"the vocabulary is fedtune.contract.properties.PROPERTIES")


@dataclass(frozen=True)
class Declaration:
    """What one part provides, refuses and needs (property -> reason for the last two)."""

    provides: frozenset[str] = frozenset()
    refuses: Mapping[str, str] = field(default_factory=dict)
    needs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "provides", frozenset(self.provides))
        _known(self.provides, "provides")
        _known(self.refuses, "refuses")
        _known(self.needs, "needs")

    def __or__(self, other: "Declaration") -> "Declaration":
        """Both declarations as one (a part made of two, such as a wrapper and its options)."""
        return Declaration(self.provides | other.provides, {**other.refuses, **self.refuses}, {**other.needs, **self.needs})


def declare(provides: Iterable[str] = (), refuses: Mapping[str, str] | None = None, needs: Mapping[str, str] | None = None) -> Declaration:
    """A checked ``Declaration`` (unknown property names raise at once)."""
    return Declaration(frozenset(provides), dict(refuses or {}), dict(needs or {}))


NOTHING = Declaration()


@dataclass(frozen=True)
class Part:
    """A part of a run as the composer sees it: a label a user recognizes (the setting that
    chose it, such as ``lora.variant ffa``) and its declaration."""

    label: str
    declaration: Declaration


class CompositionError(ValueError):
    """Two parts of a run cannot work together; the message is one line naming both."""


def chain_parts(strategy: Any, labels: Mapping[int, str] | None = None) -> list[Part]:
    """Each link of a strategy chain (``strategy.chain()``) as a part, labelled by the setting
    that chose it (``labels``, by the link's id) or ``strategy <name>``."""
    labels = labels or {}
    return [Part(labels.get(id(link)) or f"strategy {link.name or type(link).__name__}", link.declares) for link in strategy.chain()]


def conflicts(parts: Iterable[Part], *, needs: bool = True) -> list[str]:
    """Every conflict among ``parts``, one line each (empty when they compose). ``needs``:
    also report needs nothing provides (off for a partial set, such as a strategy chain
    without the task that may provide them)."""
    parts = list(parts)
    lines = []
    for part in parts:
        others = [p for p in parts if p is not part]
        for prop, why in part.declaration.refuses.items():
            for other in others:
                if prop in other.declaration.provides:
                    lines.append(f"{part.label} cannot be combined with {other.label} ({prop}): {why}")
        for prop, why in part.declaration.needs.items() if needs else ():
            if not any(prop in other.declaration.provides for other in others):
                lines.append(f"{part.label} needs {prop} ({PROPERTIES[prop]}), which nothing in this run provides: {why}")
    return lines


def check(parts: Iterable[Part]) -> None:
    """Raise CompositionError with the first conflict among ``parts``."""
    found = conflicts(parts)
    if found:
        raise CompositionError(found[0])
