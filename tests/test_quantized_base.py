"""A frozen base held in 8 or 4 bits (fedtune.quantized_base, ``--base-precision``): the bytes
really shrink, the model's outputs stay close to fp32, LoRA trains on top while the base stays
untouched, module trees share one quantized copy, a dense update folded into a quantized
weight is quantized again from the original, the planner counts the bytes held, and a run
trains, exports and reloads with every method that reads or writes base weights."""

from __future__ import annotations

import pytest
import torch

from fedtune.adapters import AdapterPlan, inject_lora, load_exported_adapter
from fedtune.adapters.lora import add_to_weight, out_in_weight
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.cost import CostModel, model_geometry
from fedtune.models import ModelError, ModelStore, load_base_model, load_tokenizer, resolve_source
from fedtune.quantized_base import PrecisionError, dense_weight, held_bytes, is_quantized
from fedtune.simulation.runner import run_simulation

from conftest import sentiment_examples
from test_end_to_end import _write_jsonl

pytest.importorskip("bitsandbytes")

LABELS = ["negative", "neutral", "positive"]
SENTENCES = ["I love this phone, it is wonderful", "the service was slow and the food cold", "meeting moved to 3pm",
             "what a terrible day", "best concert of my life", "the bus is late again"]


@pytest.fixture(scope="module")
def store():
    return ModelStore(seed=0)


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer(resolve_source("minilm"))
    return dict(tokenizer(SENTENCES, return_tensors="pt", padding=True))


def _base(store, precision):
    return store.base(resolve_source("minilm", precision), "seq-cls", LABELS)


@pytest.mark.parametrize("precision,at_most", [("int8", 0.30), ("4bit", 0.25)])
def test_the_base_really_takes_fewer_bytes(store, precision, at_most):
    fp32, quantized = held_bytes(_base(store, "fp32")), held_bytes(_base(store, precision))
    assert fp32 == pytest.approx(sum(p.numel() * 4 for p in _base(store, "fp32").parameters()), rel=0.01)
    assert quantized <= at_most * fp32, f"{precision}: {quantized / 2**20:.1f} MiB held of {fp32 / 2**20:.1f} MiB in fp32"
    model = _base(store, precision)
    # every matrix layer and the word embeddings are quantized; the trained head is not
    assert is_quantized(model.bert.encoder.layer[0].attention.self.query) and is_quantized(model.bert.encoder.layer[5].output.dense)
    assert model.bert.embeddings.word_embeddings.weight.dtype in (torch.int8, torch.uint8)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32


def test_int8_weights_are_the_rows_rounded_to_127_steps_of_their_largest_magnitude(store):
    """LLM.int8's storage: each row scaled by its largest magnitude and rounded to an integer in
    [-127, 127] (bitsandbytes rounds the weight's float16 value)."""
    dense, held = _base(store, "fp32"), _base(store, "int8")
    for name in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.3.intermediate.dense", "bert.pooler.dense"):
        w = dense.get_submodule(name).weight.detach().half().float()
        largest = w.abs().amax(dim=1, keepdim=True)
        want = (w * (127.0 / largest)).round() * (largest / 127.0)
        assert torch.allclose(dense_weight(held.get_submodule(name)), want, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("precision,per_layer,output", [("int8", 0.03, 0.2), ("4bit", 0.12, 0.4)])
def test_the_quantization_error_is_that_of_the_format(store, batch, precision, per_layer, output):
    """NF4 rounds a Gaussian weight with about 10% relative error, int8 rows with 1-2%; the
    encoder's output then moves by what six such layers add up to, and no more."""
    dense, held = _base(store, "fp32"), _base(store, precision)
    errors = [float((dense_weight(m) - dense.get_submodule(n).weight).norm() / dense.get_submodule(n).weight.norm())
              for n, m in held.named_modules() if isinstance(m, torch.nn.Linear) and is_quantized(m)]
    assert len(errors) == 6 * 6 + 1 and 0 < max(errors) < per_layer, (precision, max(errors))
    with torch.no_grad():
        want, got = dense.bert(**batch).last_hidden_state, held.bert(**batch).last_hidden_state
    assert 0 < (got - want).norm() / want.norm() < output


@pytest.mark.parametrize("precision", ["int8", "4bit"])
def test_a_quantized_model_computes_the_same_in_training_and_in_evaluation(store, batch, precision):
    model = store.instance(resolve_source("minilm", precision), "seq-cls", LABELS)
    model.bert.embeddings.dropout.p = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        evaluated = model.eval().bert(**batch).last_hidden_state
        trained = model.train().bert(**batch).last_hidden_state
    assert torch.allclose(evaluated, trained, atol=1e-5)


def test_lora_trains_on_a_4bit_base_and_the_base_stays_untouched(store, batch):
    model = inject_lora(store.instance(resolve_source("minilm", "4bit"), "seq-cls", LABELS), AdapterPlan(rank=4, alpha=8.0), "seq-cls", seed=0)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    before = dense_weight(query).clone()
    labels = torch.tensor([2, 0, 1, 0, 2, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(dense_weight(query), before)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "classifier" in n for n in trained)


@pytest.mark.parametrize("precision", ["int8", "4bit"])
def test_module_trees_share_one_quantized_copy(store, batch, precision):
    source = resolve_source("minilm", precision)
    first, second = store.instance(source, "seq-cls", LABELS), store.instance(source, "seq-cls", LABELS)
    assert first is not second
    assert held_bytes(torch.nn.ModuleList([first, second])) == held_bytes(first)
    with torch.no_grad():
        assert torch.equal(first(**batch).logits, second(**batch).logits)


@pytest.mark.parametrize("precision", ["int8", "4bit"])
def test_a_folded_update_is_quantized_again_from_the_original(store, precision):
    source = resolve_source("minilm", precision)
    model, other = store.instance(source, "seq-cls", LABELS), store.instance(source, "seq-cls", LABELS)
    layer, untouched = model.bert.encoder.layer[1].attention.self.value, other.bert.encoder.layer[1].attention.self.value
    original_weight, original = layer.weight, dense_weight(layer).clone()
    delta = 0.02 * torch.randn(original.shape, generator=torch.Generator().manual_seed(0))
    add_to_weight(layer, delta, original_weight)
    once = dense_weight(layer).clone()
    add_to_weight(layer, delta, original_weight)  # the same fold again, from the original: no accumulation
    assert torch.equal(dense_weight(layer), once)
    step = (once - original - delta).abs().mean() / delta.abs().mean()
    assert step < 0.5, f"the fold is lost in the rounding: {step:.3f}"
    assert is_quantized(layer) and torch.equal(dense_weight(untouched), original)
    assert torch.equal(out_in_weight(layer), once)


@pytest.mark.parametrize("precision", ["int8", "4bit"])
def test_gpt2s_transposed_conv1d_layers_are_held_as_out_x_in_matrices_and_take_lora(precision):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedtune.quantized_base import quantize_base

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=32, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    stored = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: in x out
    quantize_base(model, precision)
    layer = model.transformer.h[0].attn.c_attn
    assert is_quantized(layer) and dense_weight(layer).shape == (3 * 64, 64)
    assert (dense_weight(layer) - stored.T).norm() / stored.norm() < (0.03 if precision == "int8" else 0.12)
    with torch.no_grad():
        assert (model(ids).logits - want).norm() / want.norm() < (0.05 if precision == "int8" else 0.3)
    adapted = inject_lora(model, AdapterPlan(rank=4, alpha=8.0, target_modules=("c_attn",)), "causal-lm", seed=0)
    adapted.train()
    adapted(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_4bit_holds_a_language_models_output_layer_and_its_tied_table_in_8_bits():
    """The logits are the most rounding-sensitive product: at ``4bit`` the output layer and the
    embedding table tied to it are held in 8 bits, the block matrices in NF4."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.quantized_base import quantize_base

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    fp32_bytes = held_bytes(model)
    quantize_base(model, "4bit")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert isinstance(model.lm_head, bnb.nn.Linear8bitLt) and isinstance(model.model.embed_tokens, bnb.nn.Embedding8bit)
    with torch.no_grad():
        assert (model(ids).logits - want).norm() / want.norm() < 0.3
    assert held_bytes(model) < fp32_bytes * 0.5  # the tied table now held twice, in 8 bits each


def test_the_planner_counts_the_bytes_a_device_holds(store):
    plan = AdapterPlan(rank=8, alpha=16.0)
    dense, _ = model_geometry(_base(store, "fp32"), plan)
    small, _ = model_geometry(_base(store, "4bit"), plan)
    assert small.base_params == dense.base_params and small.block_params == dense.block_params  # weights counted, not bytes
    assert small.base_bytes == held_bytes(_base(store, "4bit")) and small.base_bytes <= dense.base_bytes / 4
    cost = CostModel(batch_size=8, seq_len=64, local_steps=4)
    assert cost.memory_bytes(dense, plan) - cost.memory_bytes(small, plan) == dense.base_bytes - small.base_bytes


def test_the_planner_counts_the_updates_of_frozen_weights_a_device_holds(store):
    """An update of a frozen weight (FLoRA's folded aggregate, the rest of a wider global
    adapter) costs a device 4 bytes per element: beside a quantized layer in float32, or as a
    new float weight while the process's frozen base keeps the original. The cost model counts
    them where the strategy sends such updates, and the planner sizes by them."""
    from fedtune.coordinator.planner import Planner
    from fedtune.devices import Capabilities

    template = AdapterPlan(rank=8, alpha=16.0)
    small, template = model_geometry(_base(store, "4bit"), template)
    dense, _ = model_geometry(_base(store, "fp32"), template)
    top = [(name, i, o) for b, name, i, o in small.modules if b == 5]
    assert top
    # what a device really holds, on both kinds of base: the base it shares and its own tree
    for precision in ("4bit", "fp32"):
        source = resolve_source("minilm", precision)
        both = torch.nn.ModuleList([store.base(source, "seq-cls", LABELS), store.instance(source, "seq-cls", LABELS)])
        before = held_bytes(both)
        for name, i, o in top:
            add_to_weight(both[1].get_submodule(name), torch.full((o, i), 0.01))
        assert held_bytes(both) - before == 4 * sum(i * o for _, i, o in top), precision

    def cost(frozen_updates: str) -> CostModel:
        return CostModel(batch_size=8, seq_len=64, local_steps=4, frozen_updates=frozen_updates)

    everything = AdapterPlan(rank=8, alpha=16.0, target_modules=template.target_modules, layers=tuple(range(6)))
    upper = AdapterPlan(rank=8, alpha=16.0, target_modules=template.target_modules, layers=(5,))
    narrow = AdapterPlan(rank=4, alpha=8.0, target_modules=template.target_modules, layers=(4, 5))
    per_block = {b: sum(i * o for bb, _, i, o in small.modules if bb == b) for b in range(6)}
    extra = lambda fu, g, plan: cost(fu).memory_bytes(g, plan, everything) - cost("none").memory_bytes(g, plan, everything)  # noqa: E731
    # every module of the global adapter, whatever the client's plan (FLoRA, FlexLoRA)
    assert extra("all", small, everything) == extra("all", small, narrow) == 4 * sum(per_block.values())
    # the remainder: the modules where the client's rank is below the global adapter's
    assert extra("remainder", small, everything) == 0
    assert extra("remainder", small, upper) == 4 * sum(per_block[b] for b in range(5))
    assert extra("remainder", small, narrow) == 4 * sum(per_block.values())  # rank 4 < 8 on blocks 4 and 5 too
    assert extra("all", dense, upper) == extra("all", small, upper)  # the same bytes on a float base
    with pytest.raises(ValueError, match="frozen_updates must be one of none, remainder, all, got 'some'"):
        cost("some")
    # the planner: a device that holds a rung's adapter but not the updates gets a lower rung
    planners = {fu: Planner(small, cost(fu), template, min_rank=2, max_rank=8) for fu in ("none", "all", "remainder")}
    rung = len(planners["none"].ladder) // 2
    budget = planners["none"].memory_bytes(planners["none"].ladder[rung])
    device = Capabilities(memory_bytes=budget, flops_per_second=1e15)
    assert planners["none"].assign(device).rung == rung
    held = planners["all"].assign(device)
    assert held.rung < rung and held.memory_bytes <= budget and planners["all"].ladder == planners["none"].ladder
    # with a remainder a larger rung can need less memory than a smaller one: the device gets
    # the largest rung that fits, not the last before the first that does not
    remainder = planners["remainder"]
    for device_budget in sorted({remainder.memory_bytes(p) for p in remainder.ladder}):
        got = remainder.assign(Capabilities(memory_bytes=device_budget, flops_per_second=1e15))
        assert got.rung == max(i for i, p in enumerate(remainder.ladder) if remainder.memory_bytes(p) <= device_budget)


def test_strategies_that_send_updates_of_frozen_weights_say_so():
    """The planner reads what the run's strategy declares, never its name."""
    from fedtune.compose import compose
    from fedtune.coordinator.planner import frozen_updates_of

    def held(aggregation: str, **options) -> str:
        config = RunConfig()
        config.federation.aggregation, config.federation.options = aggregation, options
        return frozen_updates_of(compose(config))

    # FLoRA folds the aggregate; FlexLoRA's re-factorized mean has a rank above any client's,
    # and a pruned HetLoRA rank cap narrows even the largest plan: every module, any client
    assert held("flora") == held("flexlora") == held("hetlora", rank_pruning=0.1) == "all"
    assert held("hetlora") == "remainder"
    assert held("hetlora", freeze_remainder=False) == held("flexlora", freeze_remainder=False) == "none"


def test_an_unknown_precision_is_refused_with_one_line_naming_the_setting():
    config = RunConfig()
    config.model.base_precision = "fp16"
    with pytest.raises(ConfigError, match=r"model\.base_precision: unknown base precision 'fp16'; choose one of fp32, int8, 4bit"):
        config.validate()
    with pytest.raises(ModelError, match="unknown base precision '3bit'"):
        resolve_source("minilm", "3bit")
    with pytest.raises(PrecisionError):
        resolve_source("minilm").held_at("nf2")


def test_the_command_line_sets_the_base_precision():
    from fedtune.cli import COMMON_KEYS, _config_from_args, build_parser

    config = _config_from_args(build_parser().parse_args(["simulate", "--base-precision", "4bit"]), COMMON_KEYS)
    assert config.model.base_precision == "4bit"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--base-precision", "fp8"])


def _config(tmp_path, precision, **settings):
    config = RunConfig()
    config.model.labels, config.model.base_precision = list(LABELS), precision
    config.federation.rounds, config.simulation.clients, config.simulation.partition = 2, 2, "iid"
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(48, seed=1))
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", sentiment_examples(24, seed=2))
    config.training.local_steps, config.training.batch_size = 2, 8
    config.run_dir, config.seed = str(tmp_path / "run"), 0
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


def test_a_run_on_a_4bit_base_exports_an_adapter_that_reproduces_its_evaluation(tmp_path):
    """The adapter, loaded on a base held as the run held it, gives the run's last evaluation;
    the merged model is a plain fp32 transformers folder."""
    import json

    from transformers import AutoModelForSequenceClassification

    from fedtune.data import load_examples
    from fedtune.tasks import get_task

    config = _config(tmp_path, "4bit")
    config.export.merged = True
    result = run_simulation(config)
    assert not result.client_errors and len(result.history) == 2
    assert json.loads((result.run_dir / "adapter" / "fedtune.json").read_text())["base_precision"] == "4bit"
    source = resolve_source("minilm", "4bit")
    model = load_exported_adapter(load_base_model(source, "seq-cls", LABELS), result.run_dir / "adapter").eval()
    task, tokenizer = get_task("seq-cls"), load_tokenizer(source)
    items = task.encode(load_examples(str(tmp_path / "eval.jsonl"), task="seq-cls"), tokenizer, 64, LABELS)
    want = result.history[-1]["eval_loss"]
    assert task.evaluate(model, items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(want, rel=1e-5)
    merged = AutoModelForSequenceClassification.from_pretrained(str(result.run_dir / "merged")).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert task.evaluate(merged, items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(want, rel=0.05)  # the same adapter on the fp32 base


@pytest.mark.parametrize("settings", [
    {"privacy__dp": "sample"},                  # Opacus' per-example gradients over a quantized base
    {"split__mode": "split"},                   # both halves of the model quantized
    {"federation__aggregation": "flora"},       # dense updates folded into the base every round
    {"lora__variant": "fedsb"},                 # the adapter built from an SVD of the base weight
], ids=["dp-sample", "split", "flora", "fedsb"])
def test_methods_that_read_or_write_base_weights_run_on_an_int8_base(tmp_path, settings):
    result = run_simulation(_config(tmp_path, "int8", **settings))
    assert not result.client_errors, result.client_errors
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in result.history)


@pytest.mark.parametrize("precision", ["int8", "4bit"])
def test_an_update_folded_into_a_quantized_base_is_held_exactly(precision):
    """FLoRA's aggregate and a smaller plan's frozen remainder are added to the base weights. An
    update of LoRA's size is smaller than a quantization step: quantized into the weight, about 2%
    of it survived (4-bit, rms 1e-3 on a weight of std 0.04). Held beside the weight, all of it
    acts, the quantized weight itself is not touched, and folding again from the original
    weight replaces the update instead of adding to it."""
    from fedtune.adapters.lora import add_to_weight
    from fedtune.quantized_base import dense_weight, held_bytes, quantize_base

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(0.04 * torch.randn(256, 256, generator=g))
    quantize_base(model, precision)
    weight, before, held = model[0].weight, dense_weight(model[0]).clone(), held_bytes(model)
    x = torch.randn(3, 256, generator=g)
    y = model(x)
    delta = 1e-3 * torch.randn(256, 256, generator=g)
    add_to_weight(model[0], delta)
    assert model[0].weight is weight  # the quantized weight is kept as it was
    torch.testing.assert_close(dense_weight(model[0]) - before, delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x) - y, x @ delta.T, atol=1e-5, rtol=0)
    assert held_bytes(model) == held + delta.numel() * 4  # the device holds it, and says so
    add_to_weight(model[0], 2 * delta, original=weight)  # from the original: replaces the update
    torch.testing.assert_close(dense_weight(model[0]) - before, 2 * delta, atol=1e-6, rtol=0)
    add_to_weight(model[0], delta)  # without an original: adds to what the layer holds
    torch.testing.assert_close(dense_weight(model[0]) - before, 3 * delta, atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["int8", "4bit"])
def test_training_keeps_no_dequantized_weight_for_the_backward_pass(store, batch, precision):
    """A quantized layer dequantizes its weight for the product and again in the backward pass:
    the autograd graph holds activations, never an fp32 copy of a base weight (which would
    rebuild the whole fp32 model in memory during training)."""
    model = inject_lora(store.instance(resolve_source("minilm", precision), "seq-cls", LABELS), AdapterPlan(rank=4, alpha=8.0), "seq-cls", seed=0)
    weight_shapes = {tuple(dense_weight(m).shape) for m in model.modules() if isinstance(m, torch.nn.Linear) and is_quantized(m)}
    saved = []
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(**batch, labels=torch.tensor([2, 0, 1, 0, 2, 0])).loss
    loss.backward()
    assert saved and not weight_shapes & set(saved), weight_shapes & set(saved)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def test_modules_a_model_needs_in_fp32_are_left_in_fp32():
    """T5 casts its feed-forward input to ``wo.weight.dtype``: quantized, that is an integer type,
    silently wrong in evaluation and an error in training. Its ``_keep_in_fp32_modules`` stay fp32."""
    from transformers import T5Config, T5ForConditionalGeneration

    from fedtune.quantized_base import kept_in_fp32, quantize_base

    config = T5Config(vocab_size=64, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2,
                      decoder_start_token_id=0, dropout_rate=0.1)
    torch.manual_seed(0)
    reference = T5ForConditionalGeneration(config).eval()
    model = T5ForConditionalGeneration(config).eval()
    model.load_state_dict(reference.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    quantize_base(model, "4bit")
    wo = [m for n, m in model.named_modules() if n.endswith(".wo")]
    assert wo and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in wo)
    assert is_quantized(model.encoder.block[0].layer[1].DenseReluDense.wi)
    ids = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss
    assert abs(float(got) - float(want)) < 0.05 * float(want)  # 4-bit rounding, not an integer cast
    lora = inject_lora(model, AdapterPlan(rank=2, alpha=4, target_modules=("q", "v")), "seq2seq").train()
    lora(input_ids=ids, labels=ids).loss.backward()  # trains (dropout on) without a dtype error
    # the names match as transformers' own quantizers match them: whole trailing components
    keep = kept_in_fp32(type("M", (torch.nn.Module,), {"_keep_in_fp32_modules": ["wo", "indexer.weights_proj"],
                                                      "_keep_in_fp32_modules_strict": ["gate.weight"]})())
    assert keep("encoder.block.0.layer.1.DenseReluDense.wo") and keep("layers.3.indexer.weights_proj") and keep("mlp.gate")
    assert not keep("encoder.block.0.layer.1.DenseReluDense.wi") and not keep("wo_proj") and not keep("weights_proj")
