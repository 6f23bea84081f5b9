"""Run folders: a folder holding a run is never silently reused (``--resume`` continues it,
``--force`` moves it aside, nothing is deleted), checkpoints are ordered by round number,
fedtune never writes through a symbolic link, and metrics.jsonl holds strict JSON appended
and rewritten atomically."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch

from fedtune.config import RunConfig, config_to_toml, load_config
from fedtune.coordinator.app import Coordinator, RunDirError
from fedtune.coordinator.checkpoint import load_checkpoint, save_checkpoint
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.metrics import MetricsLog, read_rows
from fedtune.durable import append_line, replace_file, write_file
from fedtune.simulation.runner import run_simulation

from fedtune.protocol import fedtune_pb2 as pb

from conftest import live_coordinator, push_update, sentiment_examples
from test_trust import _adapter, _round_one
from test_end_to_end import _write_jsonl

LABELS = ["negative", "positive"]


def _strict(text: str) -> list[dict]:
    """Rows of a JSON-lines file, refusing the Infinity/NaN that json.dumps writes by default."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def _snapshot(folder) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, or where a link points."""
    out: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    out[rel] = fh.read()
    return out




def _sim_config(tmp_path, model: str, run_dir) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = model, "seq-cls", 16
    config.federation.rounds = 2
    config.simulation.clients, config.simulation.partition, config.simulation.eval_examples = 2, "iid", 20
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(80, seed=1))
    config.training.local_steps, config.training.batch_size = 2, 8
    config.lora.rank = 4
    config.run_dir = str(run_dir)
    return config


def _coord_config(tmp_path, model: str, run_dir=None) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.labels, config.model.max_length = model, LABELS, 16
    config.federation.rounds, config.federation.min_clients, config.federation.strategy = 1, 1, "fedavg"
    config.training.local_steps = 2
    config.lora.rank = 4
    config.server.address = "127.0.0.1:0"
    config.run_dir = str(run_dir or tmp_path / "run")
    return config


# ---------------------------------------------------------------------- reuse of a run folder


def test_a_finished_run_folder_is_not_reused_without_resume_and_is_left_as_it_was(tmp_path, tiny_llama):
    run_dir = tmp_path / "run"
    config = _sim_config(tmp_path, tiny_llama, run_dir)
    first = run_simulation(config)
    assert [r["round"] for r in first.history] == [1, 2]
    before = _snapshot(run_dir)
    with pytest.raises(RunDirError) as err:
        run_simulation(config)  # the same run folder again, no --resume, no --force
    message = str(err.value)
    assert "\n" not in message and str(run_dir) in message and "--resume" in message and "--force" in message
    assert _snapshot(run_dir) == before  # config.toml, metrics.jsonl, checkpoints, adapter: all untouched
    # a fresh Coordinator on it is refused too (the coordinator command's entry point)
    with pytest.raises(RunDirError):
        Coordinator(_coord_config(tmp_path, tiny_llama, run_dir))
    assert _snapshot(run_dir) == before


def test_cli_refuses_a_used_run_dir_in_one_line_and_force_moves_it_aside(tmp_path, tiny_llama, capsys):
    from fedtune.cli import main

    data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(80, seed=3))
    run_dir = tmp_path / "cli-run"
    run_dir.mkdir()  # an empty existing folder is fine
    args = ["simulate", "--model", tiny_llama, "--data", data, "--clients", "2", "--rounds", "2", "--local-steps", "2",
            "--eval-examples", "20", "--max-length", "16", "--partition", "iid", "--run-dir", str(run_dir)]
    assert main(args) == 0
    before = _snapshot(run_dir)
    capsys.readouterr()

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fedtune simulate: error: run directory ")
    assert str(run_dir) in err and "--resume" in err and "--force" in err and ".old-" in err
    assert _snapshot(run_dir) == before

    assert main([*args, "--force"]) == 0
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("cli-run.old-")]
    assert _snapshot(aside) == before  # the old run, moved whole: nothing deleted
    rows = _strict((run_dir / "metrics.jsonl").read_text())
    assert [r["round"] for r in rows] == [1, 2]  # only the new run's rows
    assert load_checkpoint(run_dir).round == 2 and load_checkpoint(aside).round == 2


def test_the_coordinator_command_refuses_a_used_run_dir_and_resume_with_force(tmp_path, tiny_llama, capsys):
    from fedtune.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    config = tmp_path / "c.toml"
    config.write_text(config_to_toml(_coord_config(tmp_path, tiny_llama, run_dir)))
    assert main(["coordinator", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"run directory {run_dir} is not empty (metrics.jsonl)" in err and "--resume" in err and "--force" in err
    assert main(["coordinator", "--config", str(config), "--resume", "--force"]) == 2
    assert "pass one or the other" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_force_moves_the_old_contents_aside_when_the_run_dir_is_prepared(tmp_path, tiny_llama):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 4}\n')
    coordinator = Coordinator(_coord_config(tmp_path, tiny_llama, run_dir), force=True, eval_examples=[])
    assert (run_dir / "metrics.jsonl").exists()  # nothing moves before the run starts
    coordinator.prepare_run_dir()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "metrics.jsonl").read_text() == '{"round": 4}\n' and (aside / "checkpoints").is_dir()
    assert sorted(os.listdir(run_dir)) == ["config.toml"]
    coordinator.prepare_run_dir()  # preparing again (Flower's strategy, then start) keeps the claim
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 1


def test_resume_without_a_checkpoint_starts_at_round_1_and_drops_rows_left_before_it(tmp_path, tiny_llama):
    config = _coord_config(tmp_path, tiny_llama)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config_to_toml(config))
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "train_loss": 0.7}\n')  # crash before round 1's checkpoint
    coordinator = Coordinator(config, resume=True, eval_examples=[])
    try:
        assert coordinator.engine.start_round == 1 and coordinator.engine.resumed_from is None
        assert (run_dir / "metrics.jsonl").read_text() == ""
    finally:
        coordinator.stop()


@pytest.mark.parametrize("change, reason", [
    (lambda c: setattr(c, "seed", c.seed + 1), "it was made with seed 1, this run has seed 0"),
    (lambda c: setattr(c.lora, "rank", 8), "the LoRA plan changed (rank 8 -> 4)"),
    (lambda c: setattr(c.federation, "strategy", "fedadam"), "it was made with strategy"),
])
def test_resume_without_a_checkpoint_refuses_a_config_toml_of_another_run(tmp_path, tiny_llama, change, reason):
    config = _coord_config(tmp_path, tiny_llama)
    other = _coord_config(tmp_path, tiny_llama)
    change(other)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config_to_toml(other))
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(CoordinatorError) as err:
        Coordinator(config, resume=True, eval_examples=[])
    message = err.value.message
    assert err.value.code == "FAILED_PRECONDITION" and "\n" not in message
    assert f"cannot resume {run_dir}: its config.toml describes another run" in message and reason in message
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_the_flower_strategy_is_refused_a_used_run_dir(tmp_path, tiny_llama):
    pytest.importorskip("flwr")
    from fedtune.flower.strategy import FedtuneStrategy

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("seed = 3\n")
    with pytest.raises(RunDirError, match="is not empty"):
        FedtuneStrategy(_coord_config(tmp_path, tiny_llama, run_dir), eval_examples=[])
    assert (run_dir / "config.toml").read_text() == "seed = 3\n"


# ---------------------------------------------------------------------- checkpoints by number


def _tiny(n: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), float(n))}


def test_checkpoints_are_pruned_and_loaded_by_round_number_past_9999(tmp_path):
    for number in (9998, 9999, 10000):
        save_checkpoint(tmp_path, number, _tiny(number), {"seed": 0})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "round-10000", "round-9999"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 10000 and torch.equal(ckpt.state["w"], _tiny(10000)["w"])
    (root / "LATEST").unlink()  # without the pointer, the highest number wins, not the last in text order
    assert load_checkpoint(tmp_path).round == 10000
    save_checkpoint(tmp_path, 10001, _tiny(10001), {"seed": 0})
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "round-10000", "round-10001"]


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    for number in (3, 4):  # left by another run, or by a run that went further
        save_checkpoint(tmp_path, number, _tiny(number), {"seed": 0})
    save_checkpoint(tmp_path, 1, _tiny(1), {"seed": 0})
    assert (tmp_path / "checkpoints" / "round-0001").is_dir()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1 and not ckpt.damaged


# ---------------------------------------------------------------------- no writes through links


def test_the_durable_helpers_never_write_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    link = tmp_path / "link"
    link.symlink_to(outside)
    with pytest.raises(OSError) as err:
        write_file(link, b"x")
    assert err.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        append_line(link, b"x\n")
    replace_file(link, b"mine\n")
    assert not link.is_symlink() and link.read_bytes() == b"mine\n"
    (tmp_path / ".tmp.tmp").symlink_to(outside)  # a link planted at the temporary name goes too
    replace_file(tmp_path / "tmp", b"mine\n")
    assert outside.read_text() == "precious\n" and (tmp_path / "tmp").read_bytes() == b"mine\n"


def test_metrics_and_checkpoints_replace_planted_links_and_leave_their_targets(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text("precious\n")
    (outside / "participation.jsonl").write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "participation.jsonl"):
        (run / name).symlink_to(outside / name)
    log = MetricsLog(run / "metrics.jsonl", private_participation=True)
    assert log.keep_until(0) == []  # a link's rows are not read
    log.append({"round": 1, "client_ids": ["a"], "train_loss": 0.5})
    assert not (run / "metrics.jsonl").is_symlink() and _strict((run / "metrics.jsonl").read_text()) == [{"round": 1, "train_loss": 0.5}]
    assert _strict((run / "participation.jsonl").read_text()) == [{"round": 1, "client_ids": ["a"]}]
    (run / "checkpoints").symlink_to(outside)
    save_checkpoint(run, 1, _tiny(1), {"seed": 0})
    (run / "checkpoints" / "round-0002").symlink_to(outside)
    save_checkpoint(run, 2, _tiny(2), {"seed": 0})
    assert sorted(os.listdir(outside)) == ["metrics.jsonl", "participation.jsonl"]
    assert all((outside / n).read_text() == "precious\n" for n in os.listdir(outside))
    assert load_checkpoint(run).round == 2


def test_links_planted_in_a_resumed_run_folder_are_replaced_not_written_through(tmp_path, tiny_llama):
    outside = tmp_path / "outside"
    (outside / "export").mkdir(parents=True)
    for name in ("config.toml", "metrics.jsonl", "adapter_model.safetensors"):
        (outside / name).write_text("precious\n")
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.toml").symlink_to(outside / "config.toml")
    (run_dir / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    (run_dir / "adapter" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (run_dir / "merged").symlink_to(outside / "export")
    before = _snapshot(outside)
    config = _coord_config(tmp_path, tiny_llama, run_dir)
    config.export.merged = True
    with live_coordinator(config, resume=True, eval_examples=sentiment_examples(10, seed=9)) as (coordinator, stub, engine):
        (client,), tasks = _round_one(stub, [("c", 10)])
        push_update(stub, client.client_id, client.token, 1, _adapter(tasks[client.client_id]))
        engine.join(120)
        assert not engine.is_alive()
    assert _snapshot(outside) == before
    assert load_config(run_dir / "config.toml").seed == config.seed
    assert [r["round"] for r in _strict((run_dir / "metrics.jsonl").read_text())] == [1]
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 100
    assert (run_dir / "merged").is_dir() and not (run_dir / "merged").is_symlink()
    for path in run_dir.rglob("*"):
        assert not path.is_symlink(), path


def test_a_metrics_file_replaced_by_a_link_mid_run_is_not_written_through(tmp_path, tiny_llama):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("precious\n")
    run_dir = tmp_path / "run"

    def plant(row):
        if row["round"] == 1:
            (run_dir / "metrics.jsonl").rename(tmp_path / "round1.jsonl")
            (run_dir / "metrics.jsonl").symlink_to(outside)

    result = run_simulation(_sim_config(tmp_path, tiny_llama, run_dir), on_round_end=plant)
    assert [r["round"] for r in result.history] == [1, 2]
    assert outside.read_text() == "precious\n"
    assert [r["round"] for r in _strict((run_dir / "metrics.jsonl").read_text())] == [2]


# ---------------------------------------------------------------------- strict JSON, atomic writes


def test_non_finite_numbers_are_written_as_null_and_flagged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append({"round": 1, "train_loss": 1e308 * 10, "eval_loss": float("nan"), "ok": 1.5,
                "dp_sample": {"c1": {"epsilon": float("-inf"), "steps": 3}}, "rank_caps": [1.0, float("inf")]})
    (row,) = _strict(path.read_text())
    assert row["train_loss"] is None and row["eval_loss"] is None and row["ok"] == 1.5
    assert row["dp_sample"] == {"c1": {"epsilon": None, "steps": 3}} and row["rank_caps"] == [1.0, None]
    assert row["nonfinite"] == ["train_loss", "eval_loss", "dp_sample.c1.epsilon", "rank_caps[1]"]


def test_under_client_dp_the_flags_of_participation_keys_stay_in_the_private_file(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", private_participation=True)
    log.append({"round": 1, "train_loss": float("inf"), "client_ids": ["a"], "dp_sample": {"a": {"epsilon": float("inf")}}})
    (public,) = _strict((tmp_path / "metrics.jsonl").read_text())
    (private,) = _strict((tmp_path / "participation.jsonl").read_text())
    assert public == {"round": 1, "train_loss": None, "nonfinite": ["train_loss"]}
    assert private == {"round": 1, "client_ids": ["a"], "dp_sample": {"a": {"epsilon": None}}, "nonfinite": ["dp_sample.a.epsilon"]}
    assert (tmp_path / "participation.jsonl").stat().st_mode & 0o077 == 0
    merged = read_rows(tmp_path)
    assert merged[0]["nonfinite"] == ["train_loss", "dp_sample.a.epsilon"] and merged[0]["client_ids"] == ["a"]
    assert log.keep_until(1)[0]["nonfinite"] == ["train_loss", "dp_sample.a.epsilon"]


def test_a_client_reporting_a_loss_of_1e308_leaves_metrics_jsonl_strict_json(tmp_path, tiny_llama):
    config = _coord_config(tmp_path, tiny_llama)
    with live_coordinator(config, eval_examples=sentiment_examples(10, seed=9)) as (coordinator, stub, engine):
        (client,), tasks = _round_one(stub, [("c", 10)])
        push_update(stub, client.client_id, client.token, 1, _adapter(tasks[client.client_id]), metrics={"train_loss": 1e308})
        engine.join(120)
        assert not engine.is_alive()
    (row,) = _strict((coordinator.run_dir / "metrics.jsonl").read_text())
    assert row["train_loss"] is None and "train_loss" in row["nonfinite"]


def test_a_row_is_appended_with_one_write_and_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).append({"round": 1})
    writes, syncs, real_write, real_fsync = [], [], os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    MetricsLog(path).append({"round": 2, "train_loss": 0.25})
    assert writes == [b'{"round": 2, "train_loss": 0.25}\n'] and syncs


def test_keep_until_rewrites_atomically_and_a_torn_last_row_is_dropped(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", private_participation=True)
    for number in (1, 2, 3):
        log.append({"round": number, "client_ids": [f"c{number}"]})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 4, "tra')  # a crash in the middle of a row
    inode = (tmp_path / "metrics.jsonl").stat().st_ino
    kept = log.keep_until(2)
    assert [(r["round"], r["client_ids"]) for r in kept] == [(1, ["c1"]), (2, ["c2"])]
    assert (tmp_path / "metrics.jsonl").stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "participation.jsonl"]  # no temporary left
    assert stat.S_IMODE((tmp_path / "participation.jsonl").stat().st_mode) & 0o077 == 0
    assert [r["round"] for r in _strict((tmp_path / "participation.jsonl").read_text())] == [1, 2]
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "tr')
    log.append({"round": 3, "client_ids": ["c3"]})  # starts on a line of its own
    assert (tmp_path / "metrics.jsonl").read_text().endswith('{"round": 3, "tr\n{"round": 3}\n')
