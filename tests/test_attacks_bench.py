"""Smoke test of bench/attacks.py: its quick run (4000 short calls) gives one row per attack,
every figure in place, every defence holding, and the JSON it writes is strict."""

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


def test_the_quick_attacks_bench_runs_every_row_and_every_defence_holds(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "attacks.json"
    status = bench.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    report = json.loads(out.read_text(), parse_constant=refuse)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == bench.ATTACKS
    assert "identities" not in rows and "resumed-stall" not in rows
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
