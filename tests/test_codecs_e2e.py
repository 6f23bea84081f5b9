"""Compressed updates over real loopback gRPC: each codec learns, and the bytes on the wire
shrink as the codec promises."""

from __future__ import annotations

import json

import pytest

from fedtune.simulation.runner import run_simulation

from conftest import sentiment_examples
from test_end_to_end import _config, _write_jsonl

LR = 5e-3


def _run(tmp_path, small_llama, uplink: str, options: dict | None = None, downlink: str = ""):
    config = _config(tmp_path, small_llama, "seq-cls", rounds=3)
    config.federation.strategy = "fedavg"
    config.lora.rank = 8
    config.training.learning_rate = LR
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(200, seed=2))
    config.compression.uplink, config.compression.uplink_options = uplink, options or {}
    config.compression.downlink = downlink
    result = run_simulation(config.validate())
    assert not result.client_errors
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def raw_rows(tmp_path_factory, small_llama):
    return _run(tmp_path_factory.mktemp("raw"), small_llama, "")


@pytest.mark.parametrize(
    "uplink, options, downlink, max_ratio",
    [
        ("int8", {}, "int8", 0.32),                     # 1/4 of fp32, plus scales and headers
        ("compeft", {"density": 0.05}, "", 0.12),       # ~1.4 bits per element
        ("projection", {"k": 64, "block": 1024}, "", 0.15),  # Ferret-style: 1/16 of fp32 + headers
    ],
)
def test_compressed_runs_learn_with_fewer_bytes(tmp_path, small_llama, raw_rows, uplink, options, downlink, max_ratio):
    rows = _run(tmp_path, small_llama, uplink, options, downlink)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["clients"] == 3 for r in rows)
    assert rows[-1]["eval_loss"] < min(rows[0]["eval_loss"] - 0.1, 0.6)
    assert all(r["codec_up"] == uplink and r["codec_down"] == (downlink or "raw") for r in rows)
    up, raw_up = rows[-1]["bytes_up_per_client"], raw_rows[-1]["bytes_up_per_client"]
    assert up < max_ratio * raw_up
    if downlink:
        assert rows[-1]["bytes_down_per_client"] < 0.3 * raw_rows[-1]["bytes_down_per_client"]
    else:
        # The same weights; the task header only names the uplink codec in its options.
        assert rows[-1]["bytes_down_per_client"] == pytest.approx(raw_rows[-1]["bytes_down_per_client"], rel=0.01)
    assert 0 < rows[-1]["codec_error"] < (1.0 if uplink != "projection" else 10.0)
