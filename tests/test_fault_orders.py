"""Faults in random orders against a live coordinator (bench/faults.py's devices and kills): each
case draws, from a fixed seed, which device drops out or sends which bad update in which round,
and when the coordinator is killed (which round, after what share of that round's good updates)
and how long it stays down before a new one resumes from the run directory. Every case must
complete all its rounds within its time limit and lose no accepted update, and no bad update may
be accepted or stored.

The cases are a fixed list drawn from ``SEED`` (the same cases on every run, so a failure can be
rerun); ``FAULT_ORDERS_SEED`` / ``FAULT_ORDERS_CASES`` draw other ones."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import faults  # noqa: E402  (bench/faults.py)

SEED = int(os.environ.get("FAULT_ORDERS_SEED", "20261206"))
CASES = int(os.environ.get("FAULT_ORDERS_CASES", "6"))
CLIENTS, ROUNDS = 4, 3
ROUND_TIMEOUT_S = 8.0   # a round whose missing devices keep polling without pushing ends here
TIME_LIMIT_S = 60.0     # a case takes 3-20 s; one that takes this long has stalled


def draw(case: int) -> faults.Scenario:
    """Case ``case``: per (round, device) ok / drop / a bad kind, and ``case % 3`` kills (each in a
    random round, after a random share of its good updates), drawn from SEED."""
    rng = random.Random(f"{SEED}/{case}")
    fates = {}
    for r in range(1, ROUNDS + 1):
        for i in range(CLIENTS):
            u = rng.random()
            if u < 0.15:
                fates[(r, f"device-{i:02d}")] = "drop"
            elif u < 0.3:
                fates[(r, f"device-{i:02d}")] = rng.choice(faults.BAD_KINDS)
    kills = tuple(sorted((rng.randint(1, ROUNDS), rng.choice([0.0, 0.5, 1.0])) for _ in range(case % 3)))
    delay = rng.choice([0.0, 0.5, 2.0]) if kills else 0.0
    return faults.Scenario(f"case-{case}", kills=kills, restart_delay_s=delay, fates=fates)


def describe(scenario: faults.Scenario) -> str:
    faults_by_round = {}
    for (r, name), what in sorted(scenario.fates.items()):
        faults_by_round.setdefault(r, []).append(f"{name[-2:]}:{what}")
    return f"kills {list(scenario.kills)}, restart after {scenario.restart_delay_s} s, faults {faults_by_round}"


def test_the_cases_cover_every_kind_of_fault():
    scenarios = [draw(c) for c in range(CASES)]
    kinds = {what for s in scenarios for what in s.fates.values()}
    assert "drop" in kinds and kinds & set(faults.BAD_KINDS)
    assert any(len(s.kills) == 2 for s in scenarios) and any(not s.kills for s in scenarios)


@pytest.mark.parametrize("case", range(CASES))
def test_every_order_of_faults_completes_every_round_and_loses_no_accepted_update(tmp_path, case):
    scenario = draw(case)
    report: list[str] = []
    row = faults.run_scenario(scenario, CLIENTS, ROUNDS, SEED, tmp_path, time_limit=TIME_LIMIT_S, report=report.append,
                              round_timeout_s=ROUND_TIMEOUT_S)
    context = f"{describe(scenario)}\n{row}\n" + "\n".join(report)
    assert row["completed"] and row["rounds_completed"] == ROUNDS, context
    assert row["accepted_updates_lost"] == 0, context
    assert row["bad_rounds_stored"] == 0 and row["bad_updates_refused"] == row["bad_updates_sent"], context
    assert row["unexpected_errors"] == 0, context
