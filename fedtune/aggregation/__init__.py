"""Strategies: what each client of a round gets, and how what comes back is folded.

The contract is in ``base`` (``Strategy.configure`` / ``Strategy.aggregate``); each method's
strategy is in its folder (``fedtune.methods.<method>.strategy``) and registers itself in
``STRATEGIES`` (or ``VARIANTS``), which import them at their first lookup. Unknown names are
rejected with the list of valid ones. Every strategy is pure tensor math over a state dict,
tested with plain tensors.
"""

from fedtune.aggregation.base import (
    STRATEGIES,
    VARIANTS,
    ClientInfo,
    ClientUpdate,
    Instruction,
    RoundContext,
    Strategy,
    Variant,
    Wrapper,
    build_strategy,
)

__all__ = ["STRATEGIES", "VARIANTS", "ClientInfo", "ClientUpdate", "Instruction", "RoundContext", "Strategy", "Variant", "Wrapper", "build_strategy"]
