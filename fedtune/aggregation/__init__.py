"""Strategies: what each client of a round gets, and how what comes back is folded.

The contract is in ``base`` (``Strategy.configure`` / ``Strategy.aggregate``); each strategy is
one module that registers itself in ``STRATEGIES``. Unknown names are rejected with the list of
valid ones. Every strategy is pure tensor math over a state dict, tested with plain tensors.
"""

import importlib
import pkgutil

from fedtune.aggregation.base import (
    STRATEGIES,
    ClientInfo,
    ClientUpdate,
    Instruction,
    RoundContext,
    Strategy,
    Wrapper,
    build_strategy,
)

# Every module of this package registers its strategies on import: a new strategy is a new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "ClientInfo", "ClientUpdate", "Instruction", "RoundContext", "Strategy", "Wrapper", "build_strategy"]
