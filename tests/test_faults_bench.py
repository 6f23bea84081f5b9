"""The fault benchmark's invariants, on a small fleet: with devices dropping out, bad updates
and a coordinator killed mid-round all at once, every round completes, no acknowledged update
goes missing from the round that closed it, every bad update is refused and no stored adapter
is non-finite; a scenario that does not complete its rounds in time fails the bench, loudly."""

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
    assert row["rounds_completed"] == row["rounds_configured"] == 4 and row["completed"] is True
    assert 0 < row["wall_seconds"] < 180
    assert row["accepted_updates_lost"] == 0 and row["bad_rounds_stored"] == 0 and row["unexpected_errors"] == 0
    assert row["bad_updates_sent"] > 0 and row["bad_updates_refused"] == row["bad_updates_sent"]
    assert row["updates_accepted"] > 0 and row["redone_after_restart"] >= 0
    assert row["restart_overhead_seconds"] > 0


def test_a_scenario_that_does_not_complete_in_time_fails_the_bench_and_says_where_it_waits(tmp_path, capsys):
    # half the devices drop out of each round for 3 s and every device must be back before the
    # next round opens (min_clients is the whole fleet): 4 rounds cannot complete in 3 s
    out = tmp_path / "faults.json"
    code = faults.main(["--clients", "4", "--rounds", "4", "--dropout", "0.5", "--scenarios", "dropout", "--seed", "1",
                        "--time-limit", "3", "--repeat", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 1
    assert [(r["repeat"], r["completed"]) for r in result["rows"]] == [(1, False), (2, False)]
    assert all(r["rounds_completed"] < r["rounds_configured"] == 4 and r["wall_seconds"] < 30 for r in result["rows"])
    assert result["time_limit_s"] == 3 and result["summary"]["dropout"]["completed"] == 0
    captured = capsys.readouterr()
    assert "dropout: completed 0 of 2" in captured.out
    assert "STALLED" in captured.err and "the coordinator's last log lines" in captured.err and "device-00" in captured.err
    assert "where the round engine waits" in captured.err and "FAILED: dropout (1): completed" in captured.err
