"""bench/quantized_base.py --table: rows run in separate processes (two cores at once) merged into
one table, each compared with its model's fp32 row paired by seed; documents run with other
settings are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quantized_base  # noqa: E402

SETTINGS = {"rounds": 2, "clients": 2, "local_steps": 5, "train_examples": 600, "rank": 8}


def document(rows: dict[str, tuple[float, list[float]]], **settings) -> dict:
    out = []
    for name, (base_mib, losses) in rows.items():
        n = len(losses)
        out.append({"name": name, "base_mib": base_mib, "base_mib_ci95": 0.0, "base_mib_per_seed": [base_mib] * n,
                    "peak_mib": 4000.0, "peak_mib_ci95": 0.0, "peak_mib_per_seed": [4000.0] * n,
                    "load_peak_mib": 1600.0, "load_peak_mib_ci95": 0.0, "load_peak_mib_per_seed": [1600.0] * n,
                    "step_ms": 900.0, "step_ms_ci95": 0.0, "step_ms_per_seed": [900.0] * n,
                    "eval_loss": sum(losses) / n, "eval_loss_ci95": 0.0, "eval_loss_per_seed": losses})
    return {"rows": out, "seeds": list(range(3)), **{**SETTINGS, **settings}, "models": {"smollm2": {"task": "causal-lm"}}}


def test_rows_from_two_documents_are_compared_with_their_fp32_row(tmp_path, capsys):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    a.write_text(json.dumps(document({"smollm2-4bit": (90.0, [0.44, 0.42, 0.46]), "smollm2-fp32": (500.0, [0.40, 0.40, 0.40])})))
    b.write_text(json.dumps(document({"smollm2-gguf": (100.0, [0.40, 0.40, 0.40])})))
    assert quantized_base.main(["--table", str(a), str(b), "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["smollm2-fp32", "smollm2-4bit", "smollm2-gguf"]
    assert rows["smollm2-4bit"]["base_ratio"] == 0.18 and rows["smollm2-4bit"]["loss_vs_fp32_pct"] == 10.0
    assert rows["smollm2-4bit"]["eval_loss_vs_fp32"] == pytest.approx(0.04)
    assert rows["smollm2-gguf"]["eval_loss_vs_fp32"] == 0.0
    assert "smollm2-4bit" in capsys.readouterr().out


def test_documents_run_with_other_settings_are_refused(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(document({"smollm2-fp32": (500.0, [0.4, 0.4, 0.4])})))
    b.write_text(json.dumps(document({"smollm2-4bit": (90.0, [0.4, 0.4, 0.4])}, rounds=4)))
    with pytest.raises(SystemExit, match="--table: document 2 has rounds = 4, document 1 2"):
        quantized_base.main(["--table", str(a), str(b)])
