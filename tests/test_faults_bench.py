"""The fault benchmark's invariants, on a small fleet: with devices dropping out, bad updates
and a coordinator killed mid-round all at once, every round completes, no acknowledged update
goes missing from the round that closed it, every bad update is refused and no stored adapter
is non-finite."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import faults  # noqa: E402  (bench/faults.py)


def test_all_faults_at_once_lose_nothing_and_store_no_bad_round(tmp_path):
    out = tmp_path / "faults.json"
    code = faults.main(["--clients", "8", "--rounds", "4", "--dropout", "0.25", "--bad", "0.25", "--scenarios", "all-faults", "--seed", "3", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert code == 0, row
    assert row["rounds_completed"] == 4
    assert row["accepted_updates_lost"] == 0 and row["bad_rounds_stored"] == 0 and row["unexpected_errors"] == 0
    assert row["bad_updates_sent"] > 0 and row["bad_updates_refused"] == row["bad_updates_sent"]
    assert row["updates_accepted"] > 0 and row["redone_after_restart"] >= 0
    assert row["restart_overhead_seconds"] > 0
