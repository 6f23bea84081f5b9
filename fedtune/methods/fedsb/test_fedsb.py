"""Fed-SB (LoRA-SB): B and A fixed from the pretrained weight's SVD, only the r x r cores R
trained, sent and averaged; averaging R is exactly averaging the updates B R A."""

from __future__ import annotations

import dataclasses
import pytest
import torch

from fedtune.adapters import AdapterPlan, adapter_parameters, adapter_state, fold_cores, inject_lora, load_adapter_state
from fedtune.aggregation import build_strategy
from fedtune.compose import check_chain, checked
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.properties import CompositionError
from fedtune.methods.client_dp.strategy import ClientDP, ClientDPOptions
from fedtune.methods.fedsb.strategy import FedSB
from fedtune.methods.ffa.strategy import FFALoRA
from fedtune.methods.ffa.test_ffa import variant_run
from fedtune.models import ModelStore, resolve_source
from fedtune.options import OptionsError

from strategy_fixtures import A, B, CORE, HEAD, MODULES, context, echo, plan, random_adapter, spec_of, trained


CORE_PLAN = dataclasses.replace(plan(), core=True)
PLANS = {"a": CORE_PLAN, "b": CORE_PLAN, "c": CORE_PLAN}


def core_adapter(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(s.shape, generator=g) for name, s in spec_of(CORE_PLAN).items()}


def core_context(examples=None):
    ctx = context(PLANS, examples=examples)
    return dataclasses.replace(ctx, global_plan=CORE_PLAN, global_spec=spec_of(CORE_PLAN))


def test_only_cores_and_heads_are_expected_and_the_factors_never_move():
    g = torch.Generator().manual_seed(0)
    strategy = FedSB(build_strategy("fedavg"))
    state = strategy.initial_state(core_adapter(g))
    instructions = strategy.configure(core_context(), state)
    for ins in instructions.values():
        assert set(ins.expect) == {m + CORE for m in MODULES.values()} | {HEAD}
        assert all(m + A in ins.tensors and m + B in ins.tensors for m in MODULES.values())  # factors go down
    new, _ = strategy.aggregate(core_context(), state, trained(instructions, g))
    for m in MODULES.values():
        assert torch.equal(new[m + A], state[m + A]) and torch.equal(new[m + B], state[m + B])
        assert not torch.equal(new[m + CORE], state[m + CORE])
    # clients that return what they got change nothing
    again, _ = strategy.aggregate(core_context(), new, echo(strategy.configure(core_context(), new)))
    for n in new:
        torch.testing.assert_close(again[n], new[n], atol=1e-6, rtol=1e-6)


def test_averaging_cores_is_exactly_averaging_the_full_updates():
    g = torch.Generator().manual_seed(1)
    counts = {"a": 10, "b": 30, "c": 60}
    strategy = FedSB(build_strategy("fedavg"))
    state = strategy.initial_state(core_adapter(g))
    ctx = core_context(examples=counts)
    updates = trained(strategy.configure(ctx, state), g, counts)
    new, _ = strategy.aggregate(ctx, state, updates)
    total = sum(counts.values())
    for m in MODULES.values():
        a, b = state[m + A].double(), state[m + B].double()
        mean_of_products = sum(counts[u.client_id] / total * (b @ u.tensors[m + CORE].double() @ a) for u in updates)
        torch.testing.assert_close(b @ new[m + CORE].double() @ a, mean_of_products, atol=1e-5, rtol=1e-5)


def test_client_level_dp_noises_the_cores_and_never_the_fixed_factors():
    g = torch.Generator().manual_seed(2)
    for variant, frozen in ((FedSB, (A, B)), (FFALoRA, (A,))):
        inner = variant(build_strategy("fedavg"))
        strategy = ClientDP(inner, ClientDPOptions(clip=1.0, noise_multiplier=1.0), seed=3)
        adapter = core_adapter(g) if variant is FedSB else random_adapter(g)
        state = strategy.initial_state(adapter)
        ctx = core_context() if variant is FedSB else context({"a": plan(), "b": plan()})
        instructions = strategy.configure(ctx, state)
        updates = echo(instructions)
        for u in updates:
            u.start = instructions[u.client_id].tensors
        new, metrics = strategy.aggregate(ctx, state, updates)
        assert metrics["dp_noise_multiplier"] == 1.0
        for m in MODULES.values():
            for suffix in frozen:
                assert torch.equal(new[m + suffix], state[m + suffix]), (variant.name, suffix)
        trained_name = CORE if variant is FedSB else B
        assert all(not torch.equal(new[m + trained_name], state[m + trained_name]) for m in MODULES.values())  # the noise


def test_fedsb_refuses_what_it_cannot_average_exactly():
    for name in ("hetlora", "flexlora", "flora"):
        with pytest.raises(CompositionError, match="strategy fedsb cannot be combined|cannot be combined with strategy fedsb"):
            check_chain(FedSB(build_strategy(name)))
    with pytest.raises(OptionsError, match="no cores"):
        FedSB(build_strategy("fedavg")).initial_state(random_adapter(torch.Generator().manual_seed(0)))
    config = RunConfig()
    config.lora.variant, config.federation.share_a = "fedsb", True
    with pytest.raises(ConfigError, match="it sends only the cores R"):
        checked(config)


def test_lora_sb_model_starts_at_the_base_model_trains_only_cores_and_folds_to_plain_lora(tiny_llama):
    source = resolve_source(tiny_llama)
    store = ModelStore()
    labels = ["negative", "positive"]
    model = inject_lora(store.instance(source, "seq-cls", labels), AdapterPlan(rank=4, alpha=8.0, core=True), "seq-cls").eval()
    params = adapter_parameters(model)
    assert params and all(n.endswith(CORE) or "score" in n for n in params)
    state = adapter_state(model)
    # B A is W's best rank-4 approximation (truncated SVD), and R starts at zero
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.get_base_layer().weight.double()
    m = next(n[: -len(CORE)] for n in state if n.endswith(CORE))
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(state[m + B].double() @ state[m + A].double(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)
    assert all(not state[n].any() for n in state if n.endswith(CORE))
    ids = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    base = store.instance(source, "seq-cls", labels).eval()
    with torch.no_grad():
        # the untrained adapter adds nothing (R = 0); the head is the base model's too
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
        for n in state:
            if n.endswith(CORE):
                state[n] = torch.randn(state[n].shape, generator=torch.Generator().manual_seed(1))
        load_adapter_state(model, state)
        plain = inject_lora(store.instance(source, "seq-cls", labels), AdapterPlan(rank=4, alpha=8.0), "seq-cls").eval()
        load_adapter_state(plain, fold_cores(state))
        moved = model(input_ids=ids).logits
        assert not torch.allclose(moved, base(input_ids=ids).logits)
        torch.testing.assert_close(plain(input_ids=ids).logits, moved, atol=1e-5, rtol=1e-5)


def test_opacus_computes_per_example_gradients_of_the_cores(tiny_llama):
    from opacus import GradSampleModule

    source = resolve_source(tiny_llama)
    model = inject_lora(ModelStore().instance(source, "seq-cls", ["negative", "positive"]), AdapterPlan(rank=4, alpha=8.0, core=True), "seq-cls")
    model.train()
    wrapped = GradSampleModule(model, loss_reduction="sum")
    wrapped(input_ids=torch.randint(0, 30, (5, 7), generator=torch.Generator().manual_seed(0))).logits.sum().backward()
    cores = [p for n, p in model.named_parameters() if p.requires_grad and ".core." in n]
    assert cores and all(p.grad_sample.shape == (5, *p.shape) for p in cores)
    # the per-example gradients sum to the batch gradient
    assert all(torch.allclose(p.grad_sample.sum(0), p.grad, atol=1e-5) for p in cores)


def test_fedsb_run_learns_keeps_the_factors_and_uploads_only_cores(tmp_path, small_llama):
    rows = {}
    for variant in ("lora", "fedsb"):
        rows[variant], first, last = variant_run(tmp_path, small_llama, variant)
        if variant == "fedsb":
            factors = [n for n in last if n.endswith((A, B))]
            cores = [n for n in last if n.endswith(CORE)]
            assert factors and cores and all(torch.equal(first[n], last[n]) for n in factors)
            assert all(not torch.equal(first[n], last[n]) for n in cores)
            payload = sum(last[n].numel() * last[n].element_size() for n in last if n.endswith(CORE) or "score" in n)
            lora_payload = payload - sum(last[n].numel() * 4 for n in cores) + sum(last[n].numel() * 4 for n in last if n.endswith((A, B)))
    assert rows["fedsb"][-1]["eval_loss"] < rows["fedsb"][0]["eval_loss"]
    up_sb, up_lora = rows["fedsb"][-1]["bytes_up_per_client"], rows["lora"][-1]["bytes_up_per_client"]
    # the upload is the cores and the head plus framing; plain LoRA's is A, B and the head
    assert payload <= up_sb < payload + 4096
    assert lora_payload <= up_lora and up_sb < 0.2 * up_lora
