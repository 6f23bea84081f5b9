"""The seeds harness of the benchmarks (bench/seeds.py): intervals and paired differences against
a hand computation, and a difference whose interval contains zero reported as such."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from seeds import add_arguments, ci95, format_mean, paired_difference, seeds_of, summarize  # noqa: E402


def test_the_interval_matches_a_hand_computation():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, half = ci95(values)
    # mean 2.5, sample sd sqrt(5/3), t(0.975, 3) = 3.182446305...
    assert mean == 2.5
    assert half == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2, rel=1e-9)
    mean1, half1 = ci95([0.7])
    assert mean1 == 0.7 and math.isnan(half1)  # one run says nothing about its spread
    assert format_mean(mean1, half1) == "0.7000" and format_mean(2.5, 0.25) == "2.5000 ± 0.2500"


def test_paired_differences_use_the_spread_of_the_differences():
    a = [0.70, 0.72, 0.69, 0.71, 0.70]
    b = [0.75, 0.78, 0.73, 0.77, 0.74]  # worse by 0.05 +- 0.01 on every seed
    d = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)
    assert d.mean == pytest.approx(mean) and d.ci95 == pytest.approx(2.7764451051977987 * sd / math.sqrt(5), rel=1e-9)
    assert d.measured and d.verdict("amaq4", "uniform4").startswith("amaq4 vs uniform4: amaq4 better by 0.05")


def test_a_difference_whose_interval_contains_zero_is_no_difference():
    d = paired_difference([0.70, 0.75, 0.68], [0.72, 0.71, 0.73])
    assert not d.measured
    assert "no difference measured" in d.verdict("a", "b")
    single = paired_difference([0.70], [0.80])  # one seed: never a win, however large
    assert not single.measured and "no difference measured" in single.verdict("a", "b")
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_rows_keep_mean_interval_and_each_seed_and_the_flags_give_the_seeds():
    row = summarize({"eval_loss": [1.0, 2.0, 3.0]})
    assert row["eval_loss"] == 2.0 and row["eval_loss_per_seed"] == [1.0, 2.0, 3.0]
    assert row["eval_loss_ci95"] == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3), rel=1e-9)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert seeds_of(parser.parse_args([])) == [0]
    assert seeds_of(parser.parse_args(["--seeds", "5"])) == [0, 1, 2, 3, 4]
    assert seeds_of(parser.parse_args(["--seed-list", "3", "7"])) == [3, 7]
    with pytest.raises(ValueError, match="repeats"):
        seeds_of(parser.parse_args(["--seed-list", "3", "3"]))
