"""Crash safety of the coordinator's checkpoints: a damaged newest checkpoint is skipped with a
reason, and a resume that would continue a different run is refused in one line."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtune.config import load_config
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedtune.coordinator.errors import CoordinatorError
from fedtune.simulation.runner import run_simulation

from conftest import sentiment_examples
from test_end_to_end import _config, _write_jsonl


def _three_rounds(run_dir):
    for number in (1, 2, 3):
        save_checkpoint(run_dir, number, {"w": torch.full((4,), float(number))}, {"seed": 0})
    return run_dir / "checkpoints"


def test_only_the_last_two_are_kept_and_the_newest_is_loaded(tmp_path):
    root = _three_rounds(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "round-0002", "round-0003"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 3 and torch.equal(ckpt.state["w"], torch.full((4,), 3.0)) and not ckpt.damaged


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete tensors", "garble json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_why(tmp_path, damage, caplog):
    root = _three_rounds(tmp_path)
    tensors, meta = root / "round-0003" / "state.safetensors", root / "round-0003" / "state.json"
    data = bytearray(tensors.read_bytes())
    if damage == "flip a byte":
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "delete tensors":
        tensors.unlink()
    else:
        meta.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2 and torch.equal(ckpt.state["w"], torch.full((4,), 2.0))
    assert len(ckpt.damaged) == 1 and ckpt.damaged[0].startswith("round-0003:")
    assert "round-0003" in caplog.text and "round-0002" in caplog.text


def test_an_empty_or_dangling_latest_pointer_falls_back_to_the_newest_whole_folder(tmp_path):
    root = _three_rounds(tmp_path)
    (root / "LATEST").write_text("")  # a crash between creating and filling the pointer
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 3 and ckpt.damaged and ckpt.damaged[0].startswith("LATEST")
    (root / "LATEST").write_text("round-0009\n")
    assert load_checkpoint(tmp_path).round == 3
    (root / ".round-0004.tmp").mkdir()  # a save interrupted before its rename is ignored
    assert load_checkpoint(tmp_path).round == 3


def test_no_whole_checkpoint_at_all_is_an_error_naming_each_problem(tmp_path):
    root = _three_rounds(tmp_path)
    for name in ("round-0002", "round-0003"):
        (root / name / "state.json").write_text("[]")
    with pytest.raises(CheckpointError, match="round-0003: state.json does not name this round.*round-0002"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "elsewhere") is None


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("run")
    config = _config(tmp, tiny_llama, "seq-cls", rounds=2)
    config.simulation.data = _write_jsonl(tmp / "train.jsonl", sentiment_examples(200, seed=1))
    config.simulation.eval_examples = 30
    return run_simulation(config).run_dir


@pytest.mark.parametrize("change, reason", [
    (lambda c: setattr(c.lora, "alpha", c.lora.alpha * 2), "the LoRA plan changed (alpha"),
    (lambda c: setattr(c.federation, "strategy", "fedadam"), "it was made with strategy"),
    (lambda c: setattr(c, "seed", c.seed + 1), "it was made with seed 0, this run has seed 1"),
    (lambda c: setattr(c.model, "labels", ["neg", "pos"]), "the model changed (labels"),
])
def test_resume_refuses_a_changed_run_in_one_line(finished_run, change, reason):
    config = load_config(finished_run / "config.toml")
    change(config)
    with pytest.raises(CoordinatorError) as err:
        Coordinator(config, resume=True)
    assert err.value.code == "FAILED_PRECONDITION" and reason in err.value.message and "\n" not in err.value.message


def test_resume_skips_a_damaged_newest_checkpoint(finished_run):
    newest = finished_run / "checkpoints" / "round-0002" / "state.safetensors"
    saved = newest.read_bytes()
    try:
        newest.write_bytes(saved[:100])
        config = load_config(finished_run / "config.toml")
        resumed = Coordinator(config, resume=True)
        try:
            assert resumed.engine.start_round == 2
            assert resumed.engine.resumed_from.damaged[0].startswith("round-0002:")
        finally:
            resumed.stop()
    finally:
        newest.write_bytes(saved)


def test_a_crash_between_the_checkpoint_and_its_row_loses_neither(finished_run):
    """The checkpoint is written first and carries its round's row: a coordinator stopped
    before the row reached metrics.jsonl resumes after that round (its noise, under DP, stays
    counted, never drawn again) and writes the row from the checkpoint."""
    import json

    metrics = finished_run / "metrics.jsonl"
    saved = metrics.read_text()
    first = saved.splitlines(keepends=True)[0]
    assert json.loads(first)["round"] == 1
    row = load_checkpoint(finished_run).meta["metrics_row"]
    assert row["round"] == 2 and row["eval_loss"] is not None
    try:
        metrics.write_text(first)  # round 2's row never written
        resumed = Coordinator(load_config(finished_run / "config.toml"), resume=True)
        try:
            assert resumed.engine.start_round == 3
            assert [r["round"] for r in resumed.engine.history] == [1, 2]
            again = [json.loads(line) for line in metrics.read_text().splitlines()]
            assert [r["round"] for r in again] == [1, 2] and again[1] == row
        finally:
            resumed.stop()
    finally:
        metrics.write_text(saved)


def test_checkpoints_are_for_the_operator_only(tmp_path):
    """A checkpoint's metadata carries its round's row, with who took part: under client-level
    DP that stays out of what the run publishes, so the folder and its metadata are owner-only."""
    import stat

    folder = _three_rounds(tmp_path) / "round-0003"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "state.json").stat().st_mode) == 0o600


def test_under_client_level_dp_a_published_round_is_never_run_again(finished_run):
    """The coordinator's privacy history lives in its checkpoint: when the newest whole
    checkpoint is older than the last published row (a damaged newest one), a client-level DP
    run refuses to resume rather than release those rounds' noise again uncounted."""
    import json

    metrics = finished_run / "metrics.jsonl"
    saved_rows = metrics.read_text()
    rows = [line for line in saved_rows.splitlines() if json.loads(line)["round"] < 2]
    metrics.write_text("\n".join([*rows, json.dumps(load_checkpoint(finished_run).meta["metrics_row"])]) + "\n")  # round 2 published
    newest = finished_run / "checkpoints" / "round-0002" / "state.safetensors"
    saved = newest.read_bytes()
    try:
        newest.write_bytes(saved[:100])
        config = load_config(finished_run / "config.toml")
        config.privacy.dp = "client"
        with pytest.raises(CoordinatorError, match="round 2's row is published but the newest whole checkpoint is of round 1"):
            Coordinator(config, resume=True)
    finally:
        newest.write_bytes(saved)
        metrics.write_text(saved_rows)
