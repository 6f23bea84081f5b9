"""The capability planner: monotone in capability, within memory, plans that fit the model, and
coverage that reports what nobody trains."""

from __future__ import annotations

import itertools

import pytest

from fedtune.adapters import AdapterPlan, adapter_state, inject_lora
from fedtune.coordinator.app import model_geometry
from fedtune.coordinator.planner import CostModel, Planner, coverage, plan_ranks
from fedtune.devices import GIB, TIERS, Capabilities, ProfileError, load_profiles
from fedtune.models import ModelStore, resolve_source

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def minilm():
    store = ModelStore()
    source = resolve_source("minilm")
    base = store.base(source, "seq-cls", LABELS)
    geometry, plan = model_geometry(base, AdapterPlan(rank=8, alpha=16.0))
    return store, source, geometry, plan


def _planner(minilm, **options):
    _, _, geometry, plan = minilm
    return Planner(geometry, CostModel(16, 64, 20), plan, **{"min_rank": 2, "max_rank": 16, "round_budget_s": 60.0, **options})


def _dominates(big: AdapterPlan, small: AdapterPlan, blocks: int) -> bool:
    rb, rs = plan_ranks(big, blocks), plan_ranks(small, blocks)
    return all(layer in rb and rb[layer] >= r for layer, r in rs.items())


def test_ladder_is_a_chain_of_growing_plans_with_higher_ranks_near_the_output(minilm):
    planner = _planner(minilm)
    blocks = minilm[2].num_blocks
    for small, big in zip(planner.ladder, planner.ladder[1:]):
        assert _dominates(big, small, blocks) and big.key() != small.key()
    top = plan_ranks(planner.global_plan, blocks)
    assert sorted(top) == list(range(blocks))
    assert top[blocks - 1] >= top[0]                       # LEGEND: larger ranks near the output
    for plan in planner.ladder:
        assert max(plan.layers) == blocks - 1               # depth counted from the output side
        assert plan.alpha / plan.rank == pytest.approx(2.0)  # alpha follows rank: one LoRA scale


def test_more_capable_devices_never_get_smaller_plans(minilm):
    planner = _planner(minilm)
    blocks = minilm[2].num_blocks
    grid = [
        Capabilities(int(m * 1024**2), f * 1e9, u * 1e6, d * 1e6)
        for m, f, u, d in itertools.product([100, 200, 300, 500, 4096], [5, 20, 60, 1000], [0.1, 5], [0.5, 20])
    ]
    assigned = [(caps, planner.assign(caps)) for caps in grid]
    for (c1, a1), (c2, a2) in itertools.product(assigned, assigned):
        if c1.at_least(c2):
            assert a1.rung >= a2.rung and _dominates(a1.plan, a2.plan, blocks)
    tiers = [planner.assign(TIERS[name]).rung for name in ("phone", "laptop", "server")]
    assert tiers[0] < tiers[1] < tiers[2] == len(planner.ladder) - 1


def test_assigned_plans_respect_memory_and_time(minilm):
    planner = _planner(minilm)
    _, _, geometry, _ = minilm
    for memory_mib in (160, 230, 300, 420, 600):
        caps = Capabilities(memory_mib * 1024**2, 50e9, 1e6, 1e6)
        a = planner.assign(caps)
        if a.fits:
            assert planner.cost.memory_bytes(geometry, a.plan) <= caps.memory_bytes
            assert planner.cost.round_seconds(geometry, a.plan, caps) <= 60.0
            if a.rung + 1 < len(planner.ladder):  # the next plan up would not have fit
                nxt = planner.ladder[a.rung + 1]
                assert planner.cost.memory_bytes(geometry, nxt) > caps.memory_bytes or planner.cost.round_seconds(geometry, nxt, caps) > 60.0
    too_small = planner.assign(Capabilities(10 * 1024**2, 50e9))
    assert not too_small.fits and too_small.rung == 0


def test_every_plan_builds_on_the_model_within_its_layer_sizes(minilm):
    store, source, geometry, _ = minilm
    planner = _planner(minilm, max_rank=1000)   # capped at the narrowest module (384)
    assert planner.global_plan.rank <= 384
    for plan in (planner.ladder[0], planner.ladder[len(planner.ladder) // 2], planner.global_plan):
        model = inject_lora(store.instance(source, "seq-cls", LABELS), plan, "seq-cls")
        state = adapter_state(model)
        ranks = plan_ranks(plan, geometry.num_blocks)
        for name, t in state.items():
            if name.endswith("lora_A.weight"):
                layer = int(name.split(".layer.")[1].split(".")[0])
                assert t.shape[0] == ranks[layer] <= min(geometry.hidden, t.shape[1])
        trained = {int(n.split(".layer.")[1].split(".")[0]) for n in state if ".layer." in n}
        assert trained == set(ranks)


def test_coverage_reports_untrained_layers(minilm):
    planner = _planner(minilm)
    global_plan, blocks = planner.global_plan, minilm[2].num_blocks
    shallow = {"c1": planner.ladder[0], "c2": planner.ladder[4]}      # top 1 and top 2 blocks
    cov = coverage(shallow, global_plan, blocks)
    assert cov["per_layer"][blocks - 1] == 2 and cov["per_layer"][blocks - 2] == 1
    assert cov["uncovered_layers"] == list(range(blocks - 2)) and cov["min_coverage"] == 0
    full = coverage({"c1": global_plan, "c2": planner.ladder[0]}, global_plan, blocks)
    assert full["uncovered_layers"] == [] and full["min_coverage"] == 1


def test_profiles_file(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[[device]]\ntier = "phone"\ncount = 2\n\n[[device]]\ntier = "laptop"\nmemory_gb = 8\n')
    devices = load_profiles(path)
    assert [d.tier for d in devices] == ["phone", "phone", "laptop"]
    assert devices[2].memory_bytes == 8 * GIB and devices[2].flops_per_second == TIERS["laptop"].flops_per_second
    for text, message in [
        ('[[device]]\ntier = "watch"\n', "unknown device tier 'watch'"),
        ('[[device]]\ntier = "phone"\nram = 1\n', "unknown key 'ram'"),
        ('[[device]]\nmemory_gb = -1\n', "memory_gb must be a positive number"),
        ('[[device]]\ntier = "phone"\ncount = 0\n', "count must be a positive integer"),
        ('title = "x"\n', "expected one or more [[device]] tables"),
    ]:
        path.write_text(text)
        with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_profiles(path)


@pytest.mark.parametrize("variant", ["lora", "freeze_a", "core"])
def test_cost_model_counts_what_each_variant_holds_trains_and_sends(minilm, variant):
    from dataclasses import replace

    from fedtune.adapters import adapter_parameters

    store, source, geometry, plan = minilm
    plan = replace(plan, layers=(3, 4, 5), freeze_a=variant == "freeze_a", core=variant == "core")
    model = inject_lora(store.instance(source, "seq-cls", LABELS), plan, "seq-cls")
    head = {n for n in adapter_state(model) if "lora_" not in n}
    state = adapter_state(model)
    trained = {n: p for n, p in adapter_parameters(model).items() if n not in head}
    cost = CostModel(16, 64, 20)
    assert cost.lora_params(geometry, plan) == sum(t.numel() for n, t in state.items() if n not in head)
    assert cost.trained_params(geometry, plan) == sum(p.numel() for p in trained.values())
    head_params = sum(state[n].numel() for n in head)
    assert geometry.head_params == head_params
    assert cost.bytes_up(geometry, plan) == 4 * (sum(p.numel() for p in trained.values()) + head_params)
    assert cost.bytes_down(geometry, plan) == 4 * sum(t.numel() for t in state.values())
