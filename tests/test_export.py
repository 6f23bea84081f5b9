"""For every strategy, the exported adapter loads with plain peft (no fedtune) and reproduces
the run's last evaluation; the merged model is a plain transformers folder."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.aggregation import STRATEGIES
from fedtune.config import RunConfig
from fedtune.data import load_examples
from fedtune.models import load_tokenizer, resolve_source
from fedtune.simulation.runner import run_simulation
from fedtune.tasks import get_task

from conftest import sentiment_examples
from test_end_to_end import _write_jsonl

LABELS = ["negative", "positive"]
CASES = [(name, False, "lora") for name in STRATEGIES.names()] + [("fedavg", True, "lora"), ("hetlora", True, "lora"), ("fedavg", False, "fedsb"), ("fedavg", False, "fedsvd")]


def _plain_peft_eval(model_dir: str, adapter_dir, eval_path: str) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    task = get_task("seq-cls")
    tokenizer = load_tokenizer(resolve_source(model_dir))
    items = task.encode(load_examples(eval_path, task="seq-cls"), tokenizer, 32, LABELS)
    return task.evaluate(model, items, tokenizer.pad_token_id)


@pytest.mark.parametrize("strategy,share_a,variant", CASES, ids=lambda v: str(v))
def test_export_reproduces_the_last_evaluation_with_plain_peft(tmp_path, tiny_llama, strategy, share_a, variant):
    config = RunConfig()
    config.model.source, config.model.labels, config.model.max_length = tiny_llama, LABELS, 32
    config.federation.rounds, config.federation.strategy, config.federation.share_a = 2, strategy, share_a
    config.simulation.clients, config.simulation.partition = 2, "iid"
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(200, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(100, seed=2))
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 5, 16, 2e-2
    config.lora.rank, config.lora.alpha, config.lora.variant = 4, 8.0, variant
    config.planner.min_rank, config.planner.max_rank = 2, 4
    config.export.merged = strategy == "flora"
    config.run_dir = str(tmp_path / "run")
    result = run_simulation(config)
    assert not result.client_errors
    last = result.history[-1]
    got = _plain_peft_eval(tiny_llama, result.run_dir / "adapter", config.eval.data)
    assert got["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-4)
    assert got["eval_accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)
    meta = json.loads((result.run_dir / "adapter" / "fedtune.json").read_text())
    assert meta["labels"] == LABELS
    if variant == "fedsb":  # the cores were folded into A: a plain LoRA adapter
        assert meta["folded_cores"] and meta["plan"]["core"] is False
    if strategy == "flora":
        assert meta["folded_base_delta"] and meta["relative_error"] < 1e-5
        from transformers import AutoModelForSequenceClassification

        merged = AutoModelForSequenceClassification.from_pretrained(str(result.run_dir / "merged"))
        tokenizer = load_tokenizer(resolve_source(str(result.run_dir / "merged")))
        task = get_task("seq-cls")
        items = task.encode(load_examples(config.eval.data, task="seq-cls"), tokenizer, 32, LABELS)
        assert task.evaluate(merged.eval(), items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-4)


def test_export_rank_truncates_and_records_the_error(tmp_path):
    from fedtune.adapters import AdapterPlan
    from fedtune.coordinator.global_model import fold_deltas

    g = torch.Generator().manual_seed(0)
    m = "base_model.model.layer.0.q"
    adapter = {m + ".lora_A.weight": torch.zeros(2, 6), m + ".lora_B.weight": torch.zeros(5, 2), "head.weight": torch.ones(2, 6)}
    delta = torch.randn(5, 6, generator=g)
    plan, state, errors = fold_deltas(AdapterPlan(rank=2, alpha=4.0), adapter, {m: delta}, rank=3)
    assert plan.rank == 3 and plan.scale == 1.0 and state["head.weight"] is adapter["head.weight"]
    s = torch.linalg.svdvals(delta.double())
    assert errors[m] == pytest.approx(float(s[3:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-6)
    exact_plan, exact, exact_errors = fold_deltas(AdapterPlan(rank=2, alpha=4.0), adapter, {m: delta})
    assert exact_plan.rank == 5 and exact_errors[m] < 1e-6
    torch.testing.assert_close(exact[m + ".lora_B.weight"] @ exact[m + ".lora_A.weight"], delta, atol=1e-5, rtol=1e-5)
