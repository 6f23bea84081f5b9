"""The tests beside the methods use the shared fixtures and helpers of ``tests/`` (its
``conftest.py``, ``strategy_fixtures.py``, ``recipe_fixtures.py``): that folder goes on the path
and its fixtures are offered here too."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import small_llama, tiny_bert, tiny_llama  # noqa: E402

__all__ = ["small_llama", "tiny_bert", "tiny_llama"]
