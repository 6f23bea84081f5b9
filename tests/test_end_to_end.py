"""Whole runs over real loopback gRPC on tiny models: the run directory, learning, and an
exported adapter that reproduces the recorded evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.adapters import load_exported_adapter
from fedtune.config import ConfigError, RunConfig, load_config
from fedtune.coordinator.app import Coordinator
from fedtune.data import Example
from fedtune.models import load_base_model, load_tokenizer, resolve_source
from fedtune.simulation.runner import run_simulation
from fedtune.tasks import get_task
from safetensors.torch import load_file

from conftest import sentiment_examples

FIELDS = {"round", "clients", "train_loss", "eval_loss", "bytes_up", "bytes_down", "seconds"}


def _write_jsonl(path, examples: list[Example]) -> str:
    with open(path, "w") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label} if ex.label is not None else {"text": ex.text}) + "\n")
    return str(path)


def _config(tmp_path, model: str, task: str, rounds: int = 3) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = model, task, 32
    config.federation.rounds = rounds
    config.simulation.clients = 3
    config.simulation.partition = "iid"
    config.training.local_steps, config.training.batch_size = 10, 16
    config.training.learning_rate = 2e-2
    config.lora.rank = 4
    config.run_dir = str(tmp_path / "run")
    config.seed = 0
    return config


def test_classification_run_learns_and_its_adapter_reproduces_the_eval(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "seq-cls", rounds=4)
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    eval_examples = sentiment_examples(200, seed=2)
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", eval_examples)
    rows_seen = []
    result = run_simulation(config, on_round_end=rows_seen.append)

    run_dir = result.run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == rows_seen and [r["round"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert FIELDS <= set(row) and "eval_accuracy" in row
        assert row["clients"] == 3 and row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.05
    assert rows[-1]["eval_accuracy"] > 0.8
    assert not result.client_errors and all(c.rounds == [1, 2, 3, 4] for c in result.clients)
    # Bytes: each client's update is the LoRA matrices plus the head, in fp32, plus framing.
    assert (run_dir / "config.toml").is_file() and (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0004"

    # The exported adapter, loaded with plain peft on a fresh base model, gives the same loss.
    source = resolve_source(tiny_llama)
    base = load_base_model(source, "seq-cls", ["negative", "positive"], seed=123)
    model = load_exported_adapter(base, run_dir / "adapter")
    tokenizer = load_tokenizer(source)
    task = get_task("seq-cls")
    items = task.encode(eval_examples, tokenizer, 32, ["negative", "positive"])
    metrics = task.evaluate(model, items, tokenizer.pad_token_id)
    assert metrics["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(rows[-1]["eval_accuracy"])
    meta = json.loads((run_dir / "adapter" / "fedtune.json").read_text())
    assert meta["labels"] == ["negative", "positive"] and meta["task"] == "seq-cls"


def test_causal_lm_run_learns(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "causal-lm", rounds=2)
    lines = [f"the {w} car drives on the road today" for w in ("red", "blue", "green", "old", "new", "fast")] * 40
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    config.simulation.data = str(tmp_path / "train.txt")
    config.simulation.eval_examples = 40
    config.lora.target_modules = ["q_proj", "v_proj", "o_proj"]
    config.training.learning_rate = 2e-2
    result = run_simulation(config)
    rows = result.history
    assert [r["round"] for r in rows] == [1, 2] and all(FIELDS <= set(r) for r in rows)
    assert "eval_perplexity" in rows[0]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert not result.client_errors


def test_simulation_is_reproducible(tmp_path, tiny_llama):
    histories = []
    for name in ("a", "b"):
        config = _config(tmp_path / name, tiny_llama, "seq-cls", rounds=1)
        config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(300, seed=1))
        config.simulation.eval_examples = 50
        histories.append(run_simulation(config).history)
    assert histories[0][0]["eval_loss"] == histories[1][0]["eval_loss"]
    assert histories[0][0]["train_loss"] == histories[1][0]["train_loss"]


def test_eval_every_evaluates_every_nth_round_and_the_last_with_the_same_figures(tmp_path, tiny_llama):
    rows = {}
    for every in (1, 2):
        config = _config(tmp_path / f"every{every}", tiny_llama, "seq-cls", rounds=3)
        config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(120, seed=1))
        config.simulation.eval_examples = 30
        config.training.local_steps = 2
        config.eval.every = every
        rows[every] = run_simulation(config).history
    assert [r["eval_loss"] is not None for r in rows[2]] == [False, True, True]  # round 2, and 3 as the last
    assert "eval_accuracy" not in rows[2][0] and rows[2][0]["train_loss"] == rows[1][0]["train_loss"]
    assert [r["eval_loss"] for r in rows[2][1:]] == [r["eval_loss"] for r in rows[1][1:]]  # skipping changes no figure
    config = RunConfig()
    config.eval.every = 0
    with pytest.raises(ConfigError, match="eval.every: must be at least 1"):
        config.validate()


def test_a_simulation_is_the_same_at_any_parallel(tmp_path, tiny_bert):
    """Clients trained side by side in threads (dropout on: BERT's 0.1) end exactly where the
    same clients trained one after another do."""
    states = []
    for parallel in (1, 3):
        config = _config(tmp_path / f"p{parallel}", tiny_bert, "seq-cls", rounds=2)
        config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(300, seed=1))
        config.simulation.eval_examples = 50
        config.simulation.parallel = parallel
        threads = torch.get_num_threads()
        result = run_simulation(config)
        assert torch.get_num_threads() == threads  # the training threads' own setting does not leak
        assert not result.client_errors and [r["clients"] for r in result.history] == [3, 3]
        states.append(load_file(str(result.run_dir / "checkpoints" / "round-0002" / "state.safetensors")))
    assert states[0].keys() == states[1].keys()
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_resume_continues_at_the_next_round(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "seq-cls", rounds=2)
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(300, seed=1))
    config.simulation.eval_examples = 50
    first = run_simulation(config)
    # A crash after the metrics row of round 3 but before its checkpoint leaves a stray row.
    with open(first.run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": 3, "stray": True}) + "\n")
    # the operator restarts from the run's own config.toml, asking for more rounds
    config = load_config(first.run_dir / "config.toml")
    config.federation.rounds = 4
    resumed = Coordinator(config, resume=True)
    try:
        assert resumed.engine.start_round == 3
        ckpt = load_file(str(first.run_dir / "checkpoints" / "round-0002" / "state.safetensors"))
        assert all(torch.equal(resumed.engine.state[k], v) for k, v in ckpt.items())
        rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
    finally:
        resumed.stop()


def test_cli_simulate_prints_rounds_and_writes_the_run_dir(tmp_path, tiny_llama, capsys):
    from fedtune.cli import main

    data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(120, seed=3))
    code = main([
        "simulate", "--model", tiny_llama, "--data", data, "--clients", "2", "--rounds", "2",
        "--local-steps", "2", "--eval-examples", "20", "--max-length", "16", "--partition", "dirichlet",
        "--dirichlet-alpha", "1.0", "--run-dir", str(tmp_path / "cli-run"),
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "fedtune simulate: 2 clients, 2 rounds" in out and "eval acc" in out
    rows = [json.loads(line) for line in (tmp_path / "cli-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    config = (tmp_path / "cli-run" / "config.toml").read_text()
    assert "alpha = 1.0" in config and 'partition = "dirichlet"' in config


def test_a_simulated_device_whose_update_is_refused_does_not_hold_its_round_until_the_deadline(tmp_path, tiny_llama):
    """A parked simulated device stays alive through the fleet's heartbeats: before, one whose
    update was refused was never asked again and its round waited for it until the deadline. Now
    it asks for work again, as a real device does, and is given up with the reason."""
    config = _config(tmp_path, tiny_llama, "seq-cls", rounds=2)
    config.model.labels = ["negative", "positive"]
    config.simulation.clients = 2
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(120, seed=1))
    config.simulation.eval_examples = 20
    config.training.local_steps = 2
    config.federation.round_timeout_s = 600.0  # per wave: far beyond what two small rounds take
    config.federation.update_norm_bound, config.federation.update_norm_action = 1e-9, "refuse"  # every update refused
    result = run_simulation(config)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients"] == 0 and len(row["rejected_by"]) == 2
        assert all("exceeds the bound 1e-09" in why for why in row["rejected_by"].values())
        assert row["seconds"] < 300  # closed once both devices were given up, long before the deadline
