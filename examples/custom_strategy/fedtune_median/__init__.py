"""Coordinate-wise median aggregation as a fedtune strategy, in a package of its own.

Installed, it is ``--aggregation median`` (the entry point in pyproject.toml); importable, it is
``--aggregation fedtune_median:Median`` as well.
"""

from fedtune_median.strategy import Median, MedianOptions, weighted_median

__all__ = ["Median", "MedianOptions", "weighted_median"]
