"""LoHa (FedPara): the update of each module is ``scale * (W1a @ W1b) * (W2a @ W2b)``. Its four
factors are averaged slot by slot like LoRA's, heterogeneous ranks train leading slices, the
adapter exports as a plain peft LoHa folder, and what cannot work with it is refused at start."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedtune.adapters import AdapterPlan, adapter_state, export_adapter, inject_lora, load_adapter_state, load_exported_adapter
from fedtune.aggregation import ClientInfo, RoundContext, build_strategy
from fedtune.compose import checked, compose
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.adapter_kinds import adapter_kind
from fedtune.contract.cost import CostModel
from fedtune.contract.plans import AdapterError
from fedtune.methods.loha.adapter import W1_A, W1_B, W2_A, W2_B
from fedtune.methods.loha.strategy import LoHaVariant
from fedtune.models import ModelStore, resolve_source
from fedtune.names import FROZEN_SUFFIXES
from fedtune.protocol.messages import plan_from_proto, plan_to_proto
from fedtune.protocol.tensors import TensorSpec

from strategy_fixtures import HEAD, IN, MODULES, OUT, RMAX, echo, trained

LABELS = ["negative", "positive"]
KIND = adapter_kind("loha")


def loha_plan(rank: int = RMAX, layers: tuple[int, ...] = (0, 1), ranks: dict[int, int] | None = None) -> AdapterPlan:
    return AdapterPlan(rank=rank, alpha=2.0 * rank, layers=layers, rank_per_layer=ranks or {}, kind="loha")


def loha_spec(p: AdapterPlan) -> dict[str, TensorSpec]:
    out = {}
    for layer in p.layers:
        r = p.rank_per_layer.get(layer, p.rank)
        for suffix, shape in ((W1_A, (OUT, r)), (W1_B, (r, IN)), (W2_A, (OUT, r)), (W2_B, (r, IN))):
            out[MODULES[layer] + suffix] = TensorSpec(shape, torch.float32)
    out[HEAD] = TensorSpec((3, IN), torch.float32)
    return out


GLOBAL = loha_plan()
MIXED = {"phone": loha_plan(2, (1,)), "laptop": loha_plan(4, (0, 1), {0: 2}), "server": loha_plan()}


def loha_context(plans: dict[str, AdapterPlan], examples: dict[str, int] | None = None) -> RoundContext:
    clients = {cid: ClientInfo(cid, p, loha_spec(p), num_examples=(examples or {}).get(cid, 10)) for cid, p in sorted(plans.items())}
    return RoundContext(1, clients, global_plan=GLOBAL, global_spec=loha_spec(GLOBAL), spec_of=loha_spec)


def random_loha(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.randn(s.shape, generator=g) for n, s in loha_spec(GLOBAL).items()}


# ---------------------------------------------------------------- plain tensors


@pytest.mark.parametrize("inner", ["fedavg", "hetlora"])
def test_echo_clients_of_mixed_ranks_leave_the_global_loha_unchanged(inner):
    strategy = LoHaVariant(build_strategy(inner, {"weighting": "norm"} if inner == "hetlora" else {}))
    state = strategy.initial_state(random_loha(torch.Generator().manual_seed(0)))
    ctx = loha_context(MIXED)
    instructions = strategy.configure(ctx, state)
    # the phone (rank 2, layer 1 only) starts from the leading slices of the global factors
    phone = instructions["phone"]
    m = MODULES[1]
    assert set(phone.expect) == {m + s for s in (W1_A, W1_B, W2_A, W2_B)} | {HEAD}
    torch.testing.assert_close(phone.tensors[m + W1_A], state[m + W1_A][:, :2])
    torch.testing.assert_close(phone.tensors[m + W2_B], state[m + W2_B][:2])
    # no frozen remainder: the tail of a Hadamard product moves with the trained slice
    assert not any(n.endswith(FROZEN_SUFFIXES) for ins in instructions.values() for n in ins.tensors)
    new, _ = strategy.aggregate(ctx, state, echo(instructions))
    for name in state:
        assert torch.equal(new[name], state[name]), name


def test_each_slot_is_the_example_weighted_mean_of_the_clients_that_trained_it():
    strategy = LoHaVariant(build_strategy("fedavg"))
    g = torch.Generator().manual_seed(1)
    state = strategy.initial_state(random_loha(g))
    counts = {"phone": 10, "laptop": 30, "server": 60}
    ctx = loha_context(MIXED, counts)
    updates = {u.client_id: u for u in trained(strategy.configure(ctx, state), g, counts)}
    new, _ = strategy.aggregate(ctx, state, list(updates.values()))
    m = MODULES[1] + W1_A  # out x 8: slots 0-1 by all three, 2-3 by laptop and server, 4-7 by the server alone
    t = {cid: u.tensors[m] for cid, u in updates.items()}
    torch.testing.assert_close(new[m][:, :2], (10 * t["phone"] + 30 * t["laptop"][:, :2] + 60 * t["server"][:, :2]) / 100)
    torch.testing.assert_close(new[m][:, 2:4], (30 * t["laptop"][:, 2:4] + 60 * t["server"][:, 2:4]) / 90)
    torch.testing.assert_close(new[m][:, 4:], t["server"][:, 4:])


def test_norm_weighting_weighs_each_client_by_its_loha_update():
    strategy = build_strategy("hetlora", {"weighting": "norm"})
    g = torch.Generator().manual_seed(2)
    plans = {"a": GLOBAL, "b": GLOBAL}
    ctx = loha_context(plans)
    state = random_loha(g)
    updates = trained(strategy.configure(ctx, state), g)
    new, _ = strategy.aggregate(ctx, state, updates)
    m = MODULES[0]
    norms = [float(torch.linalg.matrix_norm(KIND.delta(u.tensors, m))) for u in updates]
    expect = sum(w * u.tensors[m + W2_B].double() for w, u in zip(norms, updates)) / sum(norms)
    torch.testing.assert_close(new[m + W2_B].double(), expect)


def test_the_plan_keeps_its_kind_across_the_wire_and_refuses_lora_only_options():
    from fedtune.aggregation.base import VARIANTS
    from fedtune.contract.adapter_kinds import ADAPTER_KINDS

    assert "loha" in ADAPTER_KINDS.available() and "loha" in VARIANTS.available()  # found in this folder, listed nowhere
    assert plan_from_proto(plan_to_proto(GLOBAL)) == GLOBAL
    assert plan_from_proto(plan_to_proto(GLOBAL)).key() != plan_from_proto(plan_to_proto(dataclasses.replace(GLOBAL, kind="lora"))).key()
    with pytest.raises(AdapterError, match="freeze_a and core are options of LoRA"):
        KIND.check(dataclasses.replace(GLOBAL, freeze_a=True))
    with pytest.raises(AdapterError, match="unknown adapter kind 'lokr'.*loha"):
        adapter_kind("lokr")


# ---------------------------------------------------------------- on a model


def test_loha_module_computes_the_scaled_hadamard_product_and_starts_at_the_base(tiny_llama):
    source, store = resolve_source(tiny_llama), ModelStore()
    plan = AdapterPlan(rank=4, alpha=8.0, kind="loha", rank_per_layer={1: 2})
    model = inject_lora(store.instance(source, "seq-cls", LABELS), plan, "seq-cls", seed=0).eval()
    base = store.instance(source, "seq-cls", LABELS).eval()
    state = adapter_state(model)
    modules = KIND.modules(state)
    assert modules and all(KIND.is_factor(n) or "score" in n for n in state)
    q0 = next(m for m in modules if ".0." in m and m.endswith("q_proj"))
    q1 = next(m for m in modules if ".1." in m and m.endswith("q_proj"))
    assert state[q0 + W1_A].shape[1] == 4 and state[q1 + W1_B].shape[0] == 2  # per-block ranks
    ids = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert all(not KIND.delta(state, m).any() for m in modules)  # peft starts W2b at zero
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
        g = torch.Generator().manual_seed(1)
        load_adapter_state(model, {n: torch.randn(t.shape, generator=g) * 0.1 if KIND.is_factor(n) else t for n, t in state.items()})
        moved = adapter_state(model)
        layer = model.base_model.model.model.layers[1].self_attn.q_proj
        # peft's own update of the module is the plan's scale times the Hadamard product
        torch.testing.assert_close(layer.get_delta_weight("default").double(), plan.scale * KIND.delta(moved, q1), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_cost_model_counts_two_pairs_per_rank(tiny_llama):
    from fedtune.coordinator.app import model_geometry

    source, store = resolve_source(tiny_llama), ModelStore()
    plan = AdapterPlan(rank=4, alpha=8.0, kind="loha")
    geometry, plan = model_geometry(store.base(source, "seq-cls", LABELS), plan)
    state = adapter_state(inject_lora(store.instance(source, "seq-cls", LABELS), plan, "seq-cls"))
    cost = CostModel(batch_size=4, seq_len=16, local_steps=1)
    assert cost.lora_params(geometry, plan) == sum(t.numel() for n, t in state.items() if KIND.is_factor(n))
    assert cost.lora_params(geometry, plan) == 2 * cost.lora_params(geometry, dataclasses.replace(plan, kind="lora"))


def test_export_is_a_peft_loha_folder_that_plain_peft_loads(tiny_llama, tmp_path):
    source, store = resolve_source(tiny_llama), ModelStore()
    plan = AdapterPlan(rank=4, alpha=8.0, kind="loha")
    model = inject_lora(store.instance(source, "seq-cls", LABELS), plan, "seq-cls", seed=0).eval()
    g = torch.Generator().manual_seed(3)
    load_adapter_state(model, {n: torch.randn(t.shape, generator=g) * 0.1 for n, t in adapter_state(model).items()})
    folder = export_adapter(model, tmp_path / "adapter", {"task": "seq-cls"})
    assert '"peft_type": "LOHA"' in (folder / "adapter_config.json").read_text()
    loaded = load_exported_adapter(store.instance(source, "seq-cls", LABELS), folder).eval()
    ids = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------------------------------------------------------------- composition


def _config(**settings) -> RunConfig:
    config = RunConfig()
    config.lora.variant = "loha"
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


@pytest.mark.parametrize("settings, conflict", [
    ({"federation__strategy": "flexlora"}, "flexlora re-factorizes the mean update into LoRA's B·A"),
    ({"federation__strategy": "flora"}, "flora stacks the clients' LoRA factors"),
    ({"federation__share_a": True}, "a LoHa adapter has no LoRA B to keep on the device"),
    ({"privacy__dp": "sample"}, "Opacus cannot compute their per-example gradients"),
    ({"federation__strategy": "hetlora", "federation__options": {"rank_pruning": 0.1}}, "penalizes the tail ranks of LoRA's B·A"),
])
def test_what_needs_lora_factors_is_refused_at_start_in_one_line(settings, conflict):
    with pytest.raises(ConfigError, match="lora.variant loha") as info:
        checked(_config(**settings))
    assert conflict in str(info.value)
    assert "\n" not in str(info.value)


def test_heterogeneous_ranks_keep_the_classification_default():
    chain = compose(_config(federation__strategy="hetlora").validate())
    names = [link.name for link in chain.chain()]
    assert {"loha", "hetlora", "fedlc"} <= set(names), names


# ---------------------------------------------------------------- a run


def test_three_tiers_learn_with_loha_adapters_of_different_ranks(tmp_path, tiny_llama):
    from fedtune.simulation.runner import run_simulation

    from conftest import sentiment_examples
    from test_end_to_end import _write_jsonl
    from test_heterogeneous_e2e import _config as tiers_config
    from test_heterogeneous_e2e import _three_tiers

    config = tiers_config(tmp_path, tiny_llama, "hetlora")
    config.lora.variant = "loha"
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(600, seed=1))
    result = run_simulation(checked(config), capabilities=_three_tiers(tiny_llama, config))
    rows = result.history
    assert not result.client_errors and [r["clients"] for r in rows] == [3, 3, 3]
    sizes = sorted(sum(p["ranks"]) for p in rows[0]["plans"].values())
    assert len(set(sizes)) > 1, rows[0]["plans"]  # devices trained LoHa adapters of different sizes
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert '"peft_type": "LOHA"' in (result.run_dir / "adapter" / "adapter_config.json").read_text()
