"""Methods, one folder each (as peft has one per tuner):

- ``__init__.py``: what the method is, and its paper;
- ``options.py``: its options, one frozen dataclass that the strategy on the coordinator and the
  recipe on the device both read, under the same names on the wire, and the tensor names the two
  exchange (contract level: it imports only ``fedtune.contract``, ``fedtune.options`` and the
  standard library);
- ``strategy.py``: the coordinator's side (registers in ``fedtune.aggregation.STRATEGIES``, or in
  ``VARIANTS`` for a LoRA variant);
- ``recipe.py``: the device's side, where the method has one (registers in
  ``fedtune.client.recipes.RECIPES``);
- ``test_<method>.py``: its tests.

Nothing lists the methods: each registry imports every folder's module of its side the first
time it is used (``discover``), so a device that only trains never imports a strategy, and a
coordinator never imports a recipe.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

__all__ = ["discover", "method_names"]


def method_names() -> list[str]:
    """The method folders of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def discover(side: str) -> None:
    """Import the ``side`` module ("strategy" or "recipe") of every method folder that has one."""
    for name in method_names():
        module = f"{__name__}.{name}.{side}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
