"""bench/privacy.py --table: runs of several variants merged into one table, and which adapter to
pick under a guarantee answered paired by seed, with the interval of the difference."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import privacy  # noqa: E402

T_975_2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom


def document(variant: str, accuracies: dict[str, list[float]], lr: float) -> dict:
    rows = []
    for name, per_seed in accuracies.items():
        eps = None if name.endswith("inf") else 8.0
        mean = sum(per_seed) / len(per_seed)
        rows.append({"name": name, "level": "sample", "variant": variant, "target_epsilon": eps, "learning_rate": lr,
                     "eval_accuracy": mean, "eval_accuracy_ci95": 0.0, "eval_accuracy_per_seed": per_seed,
                     "eval_loss": 1 - mean, "eval_loss_ci95": 0.0, "eval_loss_per_seed": [1 - a for a in per_seed],
                     "epsilon": eps and 7.99, "epsilon_ci95": None, "epsilon_per_seed": [eps and 7.99] * 3,
                     "noise_multiplier": eps and 0.445, "noise_multiplier_ci95": None, "noise_multiplier_per_seed": [eps and 0.445] * 3,
                     "bytes_up_per_client_round": 8000.0, "wall_seconds": 600.0, "rounds": 4})
    return {"rows": rows, "comparisons": [], "seeds": [0, 1, 2], "rounds": 4, "sample_clients": 3, "client_level_clients": 100,
            "client_level_per_round": 10, "partition": "iid", "variant_lr": {"fedsb": 0.02}, "sample_clip": 1.0,
            "client_clip": 0.5, "delta": 1e-5, "batch_size": 64, "lr": "default", "local_steps": "default"}


def test_variants_are_compared_at_the_same_epsilon_paired_by_seed(tmp_path, capsys):
    fedsb = document("fedsb", {"fedsb-eps8": [0.64, 0.62, 0.66], "fedsb-epsinf": [0.67, 0.66, 0.68]}, 0.02)
    lora = document("lora", {"lora-eps8": [0.56, 0.55, 0.57], "lora-epsinf": [0.73, 0.60, 0.75]}, 0.003)
    a, b, out = tmp_path / "fedsb.json", tmp_path / "lora.json", tmp_path / "both.json"
    a.write_text(json.dumps(fedsb))
    b.write_text(json.dumps(lora))
    assert privacy.main(["--table", str(a), str(b), "--out", str(out), "--markdown"]) == 0
    comparisons = {(c["row"], c["against"]): c for c in json.loads(out.read_text())["comparisons"]}
    # each DP row against its own variant without DP, and the variants against each other at each
    # epsilon; never a DP row of one variant against the other's run without DP
    assert set(comparisons) == {("fedsb-eps8", "fedsb-epsinf"), ("lora-eps8", "lora-epsinf"),
                                ("fedsb-eps8", "lora-eps8"), ("fedsb-epsinf", "lora-epsinf")}
    under_dp = comparisons[("fedsb-eps8", "lora-eps8")]
    # per-seed differences 0.08, 0.07, 0.09: mean 0.08, sd 0.01
    assert under_dp["eval_accuracy_difference"] == pytest.approx(0.08)
    assert under_dp["eval_accuracy_difference_ci95"] == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))
    assert under_dp["measured"] and "fedsb-eps8 better" in under_dp["verdict"]
    # without DP the differences are -0.06, +0.06, -0.07: an interval that holds zero says so
    plain = comparisons[("fedsb-epsinf", "lora-epsinf")]
    assert plain["eval_accuracy_difference"] == pytest.approx(-0.07 / 3)
    assert not plain["measured"] and "no difference measured" in plain["verdict"]
    printed = capsys.readouterr().out
    assert "| fedsb-eps8 | 0.02 | 0.3600 ± " in printed  # the markdown row: lr, then eval loss with its interval
    assert "- sample level, fedsb-eps8 − lora-eps8 = +0.0800 ± 0.0248: fedsb-eps8 better by 0.08" in printed
