"""Errors the coordinator reports to a client: defined in ``fedtune.contract.errors`` (the split
server half raises them too, below the coordinator) and re-exported here."""

from fedtune.contract.errors import CODES, CoordinatorError

__all__ = ["CODES", "CoordinatorError"]
