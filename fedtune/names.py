"""Tensor-name conventions: the one place that says what a tensor's name means.

Adapter tensors carry peft's names (``<module>.lora_A.weight``, ``<module>.lora_B.weight``,
``<module-to-save>.weight``). Everything else a strategy or recipe exchanges or keeps is named
by appending one of the suffixes below to a LoRA module's peft name (``<module>.base_delta``), or
by prefixing an adapter tensor's name with a namespace (``scaffold.c/<adapter tensor>``).

A client recognizes frozen-weight updates (``base_delta``, ``frozen_A``/``frozen_B``) by their
suffix; every other non-adapter tensor it receives belongs to its recipe.

A namespaced name is never the tensor its suffix names: ``server_opt.m/<module>.lora_A.weight``
is a server optimizer's moment, not an A factor. Every suffix test goes through ``ends_with``,
which says so, so that one part's bookkeeping is never taken for another part's factors.
"""

from __future__ import annotations

from typing import Iterable

# LoRA factors of a module M: its update to the frozen weight is scale * B @ A.
A_SUFFIX = ".lora_A.weight"          # rank x in
B_SUFFIX = ".lora_B.weight"          # out x rank
# Fed-SB (LoRA-SB): a trained rank x rank core R between frozen B and A; the update is
# scale * B @ R @ A. It lives inside the A side of peft's module (A then R, then B).
CORE_SUFFIX = ".lora_A.core.weight"  # rank x rank

# Dense out x in update a client adds to the frozen weight of M (FLoRA's folded aggregate).
BASE_DELTA = ".base_delta"
# Low-rank part of the global adapter outside a client's plan, folded into its frozen weight of
# M as scale * frozen_B @ frozen_A (the "frozen remainder" of heterogeneous strategies).
FROZEN_A = ".frozen_A"
FROZEN_B = ".frozen_B"
FROZEN_SUFFIXES = (BASE_DELTA, FROZEN_A, FROZEN_B)

# FlexLoRA's server state for M: the dense mean of the clients' products, and the run's initial A
# (fills directions the mean lacks).
DENSE_DELTA = ".lora_delta"
INIT_A = ".lora_init_A"


def is_namespaced(name: str) -> bool:
    """True for a tensor that belongs to a strategy or recipe (``namespace/name``)."""
    return "/" in name


def ends_with(name: str, suffixes: str | tuple[str, ...]) -> bool:
    """``name.endswith(suffixes)`` for a model tensor; False for a namespaced one, whatever it
    ends with (its suffix names the tensor it keeps state for, not what it is)."""
    return not is_namespaced(name) and name.endswith(suffixes)


def is_lora(name: str) -> bool:
    return ends_with(name, (A_SUFFIX, B_SUFFIX, CORE_SUFFIX))


def is_frozen_update(name: str) -> bool:
    """True for tensors a client folds into its frozen weights (never trained, never sent back)."""
    return ends_with(name, FROZEN_SUFFIXES)


def module_of(name: str, suffix: str) -> str:
    """The module prefix of ``name``, which must end with ``suffix``."""
    if not name.endswith(suffix):
        raise ValueError(f"{name!r} does not end with {suffix!r}")
    return name[: -len(suffix)]


def lora_modules(names: Iterable[str]) -> list[str]:
    """Module prefixes that have both an A and a B tensor among ``names``."""
    names = set(names)
    return sorted(n[: -len(A_SUFFIX)] for n in names if ends_with(n, A_SUFFIX) and n[: -len(A_SUFFIX)] + B_SUFFIX in names)


def namespaced(namespace: str, name: str) -> str:
    """``namespace/name``: a tensor that belongs to a strategy or recipe (``scaffold.c/...``)."""
    return f"{namespace}/{name}"


def strip_namespace(namespace: str, name: str) -> str | None:
    """The adapter-tensor name inside ``namespace/name``, or None when ``name`` is not in it."""
    prefix = namespace + "/"
    return name[len(prefix):] if name.startswith(prefix) else None
