"""FFA-LoRA: A is frozen at its initialization, never changes and never crosses the wire back;
B is aggregated as the inner strategy says."""

from __future__ import annotations

import json
import pytest
import torch
from safetensors.torch import load_file

from fedtune.adapters import AdapterPlan, adapter_parameters, inject_lora
from fedtune.aggregation import build_strategy
from fedtune.compose import check_chain, checked
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.properties import CompositionError
from fedtune.methods.ffa.strategy import FFALoRA
from fedtune.models import ModelStore, resolve_source
from fedtune.simulation.runner import run_simulation

from conftest import sentiment_examples
from strategy_fixtures import A, B, GLOBAL_PLAN, MIXED, context, echo, random_adapter, trained
from test_end_to_end import _config, _write_jsonl


PLANS = {"a": GLOBAL_PLAN, "b": GLOBAL_PLAN}


@pytest.mark.parametrize("inner", ["fedavg", "hetlora", "fedadam"])
def test_a_is_neither_expected_nor_changed_and_echo_clients_change_nothing(inner):
    g = torch.Generator().manual_seed(0)
    strategy = FFALoRA(build_strategy(inner))
    state = strategy.initial_state(random_adapter(g))
    plans = MIXED if inner == "hetlora" else PLANS
    instructions = strategy.configure(context(plans), state)
    for ins in instructions.values():
        assert ins.plan.freeze_a and not any(n.endswith(A) for n in ins.expect) and any(n.endswith(B) for n in ins.expect)
        assert any(n.endswith(A) for n in ins.tensors)  # A still goes down: clients freeze what they get
    moved, _ = strategy.aggregate(context(plans), state, trained(instructions, g))
    for n, t in state.items():
        if n.endswith(A):
            assert torch.equal(moved[n], t), n
    assert any(not torch.equal(moved[n], state[n]) for n in state if n.endswith(B))
    # (server-optimizer momentum from the first round is not the model: start it from zero)
    moved = {n: torch.zeros_like(t) if n.startswith("server_opt.") else t for n, t in moved.items()}
    again, _ = strategy.aggregate(context(plans), moved, echo(strategy.configure(context(plans), moved)))
    for n in moved:
        if moved[n].is_floating_point() and not n.startswith("server_opt."):
            torch.testing.assert_close(again[n], moved[n], atol=1e-6, rtol=1e-6)


def test_fedavg_of_b_with_a_shared_is_the_mean_of_the_products():
    g = torch.Generator().manual_seed(1)
    strategy = FFALoRA(build_strategy("fedavg"))
    state = strategy.initial_state(random_adapter(g))
    updates = trained(strategy.configure(context(PLANS), state), g)
    new, _ = strategy.aggregate(context(PLANS), state, updates)
    module = next(n[: -len(A)] for n in state if n.endswith(A))
    mean_product = sum(u.tensors[module + B] @ state[module + A] for u in updates) / len(updates)
    torch.testing.assert_close(new[module + B] @ new[module + A], mean_product)


def test_frozen_a_is_not_trainable_on_the_model(tiny_llama):
    source = resolve_source(tiny_llama)
    model = inject_lora(ModelStore().instance(source, "seq-cls", ["negative", "positive"]), AdapterPlan(rank=4, alpha=8.0, freeze_a=True), "seq-cls")
    params = adapter_parameters(model)
    assert params and not any(n.endswith(A) for n in params) and any(n.endswith(B) for n in params)


def test_strategies_that_rebuild_a_and_share_a_conflicts_are_refused():
    for name in ("flexlora", "flora"):
        with pytest.raises(CompositionError, match=f"strategy {name} cannot be combined with strategy ffa \\(a-frozen\\)"):
            check_chain(FFALoRA(build_strategy(name)))
    config = RunConfig()
    config.lora.variant, config.federation.share_a = "ffa", True
    with pytest.raises(ConfigError, match="nothing LoRA would be shared"):
        checked(config)
    config.federation.share_a, config.lora.variant = False, "ffa-lora"
    with pytest.raises(ConfigError, match="unknown variant 'ffa-lora'; choose one of: lora, fedsb, fedsvd, ffa"):
        checked(config)


def variant_run(tmp_path, model: str, variant: str) -> tuple[list[dict], dict, dict]:
    """A 2-round FedAvg run of the LoRA variant ``variant`` on 3 simulated clients: its metrics
    rows and its checkpointed states after rounds 1 and 2."""
    config = _config(tmp_path / variant, model, "seq-cls", rounds=2)
    config.federation.strategy, config.lora.variant, config.lora.rank = "fedavg", variant, 8
    config.training.learning_rate = 5e-3
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(200, seed=2))
    result = run_simulation(checked(config))
    assert not result.client_errors
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    states = [load_file(str(result.run_dir / "checkpoints" / f"round-000{n}" / "state.safetensors")) for n in (1, 2)]
    return rows, states[0], states[1]


def test_ffa_run_keeps_a_and_halves_the_upload(tmp_path, small_llama):
    rows = {}
    for variant in ("lora", "ffa"):
        rows[variant], first, last = variant_run(tmp_path, small_llama, variant)
        if variant == "ffa":
            a_names = [n for n in last if n.endswith(A)]
            assert a_names and all(torch.equal(first[n], last[n]) for n in a_names)
            assert any(not torch.equal(first[n], last[n]) for n in last if n.endswith(B))
    assert rows["ffa"][-1]["eval_loss"] < rows["ffa"][0]["eval_loss"]
    # The upload is B and the head only: about half of plain LoRA's (the head is the rest).
    ratio = rows["ffa"][-1]["bytes_up_per_client"] / rows["lora"][-1]["bytes_up_per_client"]
    assert 0.45 < ratio < 0.6


def test_fedsvd_keeps_the_product_and_makes_a_orthonormal():
    from fedtune.methods.ffa.strategy import FedSVD, refactorize

    g = torch.Generator().manual_seed(3)
    strategy = FedSVD(build_strategy("fedavg"))
    state = strategy.initial_state(random_adapter(g))
    updates = trained(strategy.configure(context(PLANS), state), g)
    new, _ = strategy.aggregate(context(PLANS), state, updates)
    plain, _ = FFALoRA(build_strategy("fedavg")).aggregate(context(PLANS), state, updates)
    for name in new:
        if name.endswith(A):
            module = name[: -len(A)]
            a, b = new[module + A], new[module + B]
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)   # orthonormal rows
            assert not torch.allclose(a, state[name])                                    # A followed the product
            # the product is exactly FFA-LoRA's: mean of the B's times the old A
            torch.testing.assert_close(b @ a, plain[module + B] @ plain[name], atol=1e-5, rtol=1e-5)
    again = refactorize(new)  # re-factorizing an SVD factorization changes no product
    for name in again:
        if name.endswith(A):
            module = name[: -len(A)]
            torch.testing.assert_close(again[module + B] @ again[name], new[module + B] @ new[name], atol=1e-5, rtol=1e-5)
    with pytest.raises(CompositionError, match="fedsvd cannot be combined with strategy hetlora \\(mixed-shapes\\)"):
        check_chain(FedSVD(build_strategy("hetlora")))
