"""Smoke test of bench/attacks.py: its quick run (4000 short calls) gives one row per attack,
every figure in place, every defence holding, and the JSON it writes is strict. The
resumed-stall row (bench/faults.py's all-faults scenario, about 12 s even quick) costs more than
all the other rows together and has a test of its own."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "attacks.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_attacks", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refuse(name):
    raise ValueError(f"not JSON: {name}")


def test_the_quick_attacks_bench_runs_every_row_and_every_defence_holds(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "attacks.json"
    names = [n for n in bench.ATTACKS if n != "resumed-stall"]
    status = bench.main(["--quick", "--out", str(out), "--only", *names])
    printed = capsys.readouterr().out

    report = json.loads(out.read_text(), parse_constant=_refuse)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == names and "identities" in rows
    for name, row in rows.items():
        assert {"honest_round_seconds", "coordinator_peak_mib", "accepted", "refused", "global_change_cosine_with_attacker", "held"} <= set(row), name
        assert row["coordinator_peak_mib"] > 0 and row["accepted"] is not None and row["refused"] is not None, row
        assert name in printed
    cosine = rows["weight-takeover"]["global_change_cosine_with_attacker"]
    assert cosine is not None and math.isfinite(cosine)
    assert all(r["global_change_cosine_with_attacker"] is None for n, r in rows.items() if n != "weight-takeover")
    assert report["quick"] is True and "peak_rss_of" in report
    assert status == 0, [(n, r["note"]) for n, r in rows.items() if not r["held"]]
    assert all(r["held"] for r in rows.values())
    # identities: one certificate gets max_clients_per_credential names of the 8 it asks for, not
    # the honest device's, and no more than a party's share of the stream slots
    # the rows of the 2026-12-07 fixes: a header's dimensions, a party's own registration bucket,
    # a ceiling that ignores the control variate the attacker itself grew
    assert rows["huge-header-dims"]["refused"] == 1 and "1000000 dimensions, at most 8" in rows["huge-header-dims"]["note"]
    assert "the fleet: 60 of 60 devices registered" in rows["registration-drain"]["note"], rows["registration-drain"]["note"]
    assert rows["control-variate-growth"]["refused"] == 3, rows["control-variate-growth"]["note"]  # rounds 2-4: only round 1 fits the ceiling
    identities = rows["identities"]["note"]
    assert "4 accepted (max_clients_per_credential 4), 'erin' FAILED_PRECONDITION" in identities
    assert "6 of 12 admitted (per party 6, pool 24" in identities and "her id 'erin'" in identities


def test_the_resumed_stall_row_completes_every_round_and_loses_nothing(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "attacks.json"
    status = bench.main(["--quick", "--out", str(out), "--only", "resumed-stall"])
    (row,) = json.loads(out.read_text(), parse_constant=_refuse)["rows"]
    assert row["name"] == "resumed-stall" and "resumed-stall" in capsys.readouterr().out
    assert status == 0 and row["held"] is True, row["note"]
    assert "4 of 4 rounds" in row["note"] and "lost 0" in row["note"] and "bad rounds stored 0" in row["note"]
    assert row["accepted"] == 0 and row["refused"] >= 0 and 0 < row["honest_round_seconds"] < 45
    assert row["coordinator_peak_mib"] > 0 and row["global_change_cosine_with_attacker"] is None
