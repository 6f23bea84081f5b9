"""Transformer families a user brings: tiny random models of each built from its config (no
download) train a federated round, export and reload exactly, take Fed-SB and FFA on transposed
(Conv1D) weights with the right numbers, split at a cut reproducing the whole model, and the
combinations that cannot work are refused with one line naming the setting."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fedtune.adapters import AdapterPlan, apply_base_delta, inject_lora, load_exported_adapter
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.cost import ModelGeometry, default_target_modules, model_geometry
from fedtune.models import load_base_model, load_tokenizer, resolve_source
from fedtune.simulation.runner import run_simulation

from conftest import sentiment_examples
from test_end_to_end import _write_jsonl

LABELS = ["negative", "positive"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "great", "love", "wonderful", "happy", "excellent", "nice", "good", "amazing",
         "awful", "hate", "terrible", "sad", "horrible", "bad", "poor", "worst",
         "the", "car", "drives", "today", "my", "road", "trip", "was", "this", "city", "new", "a"]
TINY = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
# Per family: the task it trains and the config keys its config names otherwise.
FAMILIES = {
    "gpt2": ("causal-lm", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64, "n_positions": 64}),
    "distilbert": ("seq-cls", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}),
    "bert": ("seq-cls", {}),
    "llama": ("causal-lm", {"num_key_value_heads": 2}),
    "gpt_neox": ("causal-lm", {"rotary_pct": 0.5}),
    "opt": ("causal-lm", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "t5": ("seq-cls", {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2, "decoder_start_token_id": 0}),
    "albert": ("seq-cls", {"embedding_size": 16, "num_hidden_groups": 1}),
}


def _tokenizer(framed: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if framed:  # encoders frame their input; T5's classifier pools at the final end token
        core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]",
                                   model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family name -> a saved tiny random model folder (built on first use)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folders: dict[str, str] = {}

    def build(name: str) -> str:
        if name not in folders:
            task, keys = FAMILIES[name]
            folder = tmp_path_factory.mktemp(name)
            config = AutoConfig.for_model(name, **{**TINY, **keys})
            torch.manual_seed(0)
            (AutoModelForCausalLM if task == "causal-lm" else AutoModel).from_config(config).save_pretrained(folder)
            _tokenizer(framed=task == "seq-cls").save_pretrained(folder)
            folders[name] = str(folder)
        return folders[name]

    return build


def _base(folder: str, name: str):
    task = FAMILIES[name][0]
    return load_base_model(resolve_source(folder), task, LABELS if task == "seq-cls" else [])


def _config(tmp_path, folder: str, name: str) -> RunConfig:
    task = FAMILIES[name][0]
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = folder, task, 16
    config.model.labels = list(LABELS) if task == "seq-cls" else []
    config.federation.rounds, config.federation.strategy = 1, "fedavg"
    config.simulation.clients, config.simulation.partition = 2, "iid"
    examples = sentiment_examples(48, seed=1)
    if task == "causal-lm":
        examples = [type(e)(text=e.text) for e in examples]
    config.simulation.data = _write_jsonl(tmp_path / "train.jsonl", examples)
    config.eval.data = _write_jsonl(tmp_path / "eval.jsonl", [type(e)(text=e.text, label=e.label if task == "seq-cls" else None) for e in sentiment_examples(12, seed=2)])
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 2, 8, 1e-2
    config.lora.rank, config.lora.alpha = 4, 8.0
    config.run_dir = str(tmp_path / "run")
    return config


@pytest.mark.parametrize("name", ["gpt2", "distilbert", "bert", "llama", "gpt_neox", "opt"])
def test_a_federated_round_trains_and_its_export_reloads_exactly(tmp_path, family, name):
    """The default strategy with the planner on (as a new user runs it): one round, and the
    exported adapter on a fresh base reproduces the run's evaluation loss."""
    from fedtune.data import load_examples
    from fedtune.tasks import get_task

    folder = family(name)
    config = _config(tmp_path, folder, name)
    result = run_simulation(config)
    assert not result.client_errors and [r["round"] for r in result.history] == [1]
    want = result.history[-1]["eval_loss"]
    assert math.isfinite(want)
    task = FAMILIES[name][0]
    model = load_exported_adapter(_base(folder, name), result.run_dir / "adapter").eval()
    tokenizer = load_tokenizer(resolve_source(folder))
    items = get_task(task).encode(load_examples(config.eval.data, task=task), tokenizer, 16, LABELS if task == "seq-cls" else [])
    assert get_task(task).evaluate(model, items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(want, abs=1e-5)


def test_default_targets_and_geometry_read_conv1d_fused_and_named_projections(family):
    gpt2, neox, distil = _base(family("gpt2"), "gpt2"), _base(family("gpt_neox"), "gpt_neox"), _base(family("distilbert"), "distilbert")
    # GPT-2's fused c_attn is a Conv1D with its weight stored in x out (32 x 96)
    g, plan = model_geometry(gpt2, AdapterPlan())
    assert plan.target_modules == ("c_attn",)
    assert list(g.modules) == [(0, "transformer.h.0.attn.c_attn", 32, 96), (1, "transformer.h.1.attn.c_attn", 32, 96)]
    assert g.num_blocks == 2 and g.hidden == 32 and g.heads == 2
    g = ModelGeometry.from_model(neox, default_target_modules(neox))  # fused query_key_value: a Linear 32 -> 96
    assert [(i, o) for _, _, i, o in g.modules] == [(32, 96), (32, 96)]
    # peft has no default for DistilBERT: its attention's query and value projections, by name
    assert default_target_modules(distil) == ("q_lin", "v_lin")
    g, _ = model_geometry(distil, AdapterPlan())
    assert len(g.modules) == 4 and all((i, o) == (32, 32) for _, _, i, o in g.modules)
    with pytest.raises(ValueError, match=r"lora.target_modules: the model \(gpt2\) has no Linear module named 'q_proj'.*c_attn"):
        model_geometry(gpt2, AdapterPlan(target_modules=("q_proj",)))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fedsb_on_conv1d_factors_the_real_out_by_in_weight_and_starts_as_the_base(family):
    from peft.tuners.lora import LoraLayer

    base = _base(family("gpt2"), "gpt2")
    ids = torch.tensor([[2, 21, 22, 23, 7, 3]])
    before = _logits(base, ids)
    model = inject_lora(base, AdapterPlan(rank=4, alpha=8.0, core=True), "causal-lm", seed=0)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2
    for layer in layers:
        w = layer.get_base_layer().weight.double().T  # Conv1D: stored in x out; the map is out x in
        assert tuple(w.shape) == (96, 32)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        a = layer.lora_A["default"].weight.double()
        b = layer.lora_B["default"].weight.double()
        assert torch.allclose(b @ a, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5)
        assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-5)  # A = V_r^T
    assert torch.allclose(_logits(model, ids), before, atol=1e-6)  # zero cores: the base model


def test_ffa_and_base_deltas_on_conv1d_follow_the_out_by_in_math(family):
    from peft.tuners.lora import LoraLayer

    base = _base(family("gpt2"), "gpt2")
    ids = torch.tensor([[2, 21, 22, 23, 7, 3]])
    before = _logits(base, ids)
    model = inject_lora(base, AdapterPlan(rank=4, alpha=8.0, freeze_a=True), "causal-lm", seed=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_B." in n)
    assert torch.allclose(_logits(model, ids), before, atol=1e-6)  # B = 0
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(96, 4, generator=g))
    x = torch.randn(3, 32, generator=g)
    w, bias = layer.get_base_layer().weight, layer.get_base_layer().bias
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # scale alpha / r = 2, out x in
    assert torch.allclose(layer(x), x @ w + bias + x @ delta.T, atol=1e-5)
    # a dense out x in update of a Conv1D weight (FLoRA's base delta) acts as x @ delta^T
    name = next(n for n, m in model.named_modules() if m is layer)
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    apply_base_delta(model, {name: delta})
    assert torch.allclose(layer(x), x @ w + bias + x @ delta.T, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "distilbert", "llama", "gpt_neox", "opt"])
def test_split_finds_the_block_stack_and_its_halves_compute_the_whole_model(family, name):
    from fedtune.split.segments import anatomy, bottom_forward, middle_forward, top_forward

    model = _base(family(name), name)
    parts = anatomy(model)
    assert parts.num_blocks == 2 and len(parts.blocks) == 2 and parts.embed is model.get_input_embeddings()
    ids = torch.tensor([[2, 21, 22, 23, 7, 3], [2, 24, 25, 13, 3, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([0, 1]) if FAMILIES[name][0] == "seq-cls" else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, labels=labels)
        hidden = bottom_forward(model, {"input_ids": ids, "attention_mask": mask}, 1)
        top = top_forward(model, hidden, mask, labels, 1, 0)  # blocks [1, 2) and the head
        assert torch.allclose(top.logits, whole.logits, atol=1e-5) and torch.allclose(top.loss, whole.loss, atol=1e-5)
        upper = middle_forward(model, hidden, mask, 1, 0)     # U-shaped: blocks [1, 2) ...
        head = top_forward(model, upper, mask, labels, 2, 0)  # ... and the head alone
        assert torch.allclose(head.logits, whole.logits, atol=1e-5)


@pytest.mark.parametrize("name", ["distilbert", "bert"])  # heads with a dropout of their own
def test_the_head_alone_draws_the_same_dropout_masks_whether_or_not_it_is_the_first_call(family, name):
    """The first empty slice of a block class runs one real block to learn its output's form.
    That probe must draw no random numbers: which client's step runs it first depends on
    thread timing, and a draw there would shift the head's dropout masks for that one step,
    so the same seed would not repeat a run bit for bit."""
    from fedtune.rng import thread_draws
    from fedtune.split import segments

    model = _base(family(name), name)
    model.train()
    count = segments.anatomy(model).num_blocks
    ids = torch.tensor([[2, 21, 22, 23, 7, 3], [2, 24, 25, 13, 3, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([0, 1]) if FAMILIES[name][0] == "seq-cls" else ids.masked_fill(mask == 0, -100)
    hidden = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    last = segments.anatomy(model).blocks[count - 1]
    segments._TUPLE_OUTPUT.pop(type(last), None)  # the next call is the first: it probes
    with thread_draws(7):
        first = segments.top_forward(model, hidden, mask, labels, count, 0).logits
    assert type(last) in segments._TUPLE_OUTPUT and last.training  # learned, and put back in training mode
    with thread_draws(7):
        later = segments.top_forward(model, hidden, mask, labels, count, 0).logits
    with thread_draws(8):
        other_seed = segments.top_forward(model, hidden, mask, labels, count, 0).logits
    assert torch.equal(first, later)
    assert not torch.equal(first, other_seed)  # the head does draw masks: the check above could fail


def test_refusals_name_the_family_and_the_setting(tmp_path, family):
    from fedtune.split.segments import SplitError, anatomy

    t5 = _base(family("t5"), "t5")
    with pytest.raises(SplitError, match="split learning: t5 is an encoder-decoder model"):
        anatomy(t5)
    # ALBERT computes every block with one shared set of weights: no per-block plans
    folder = family("albert")
    config = _config(tmp_path, folder, "albert")
    config.federation.strategy, config.simulation.tiers = "hetlora", ["phone", "server"]
    with pytest.raises(ConfigError, match=r"planner.enabled \(strategy hetlora\): albert has no LoRA modules of its own in blocks \[1\]"):
        run_simulation(config)
    config = _config(tmp_path, family("gpt2"), "gpt2")
    config.lora.target_modules = ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"lora.target_modules: the model \(gpt2\) has no Linear module named 'q_proj', 'v_proj'"):
        run_simulation(config)


def test_target_modules_flag_sets_the_lora_key_and_rejects_bad_lists(capsys):
    from fedtune.cli import COMMON_KEYS, _config_from_args, build_parser

    for command in ("simulate", "coordinator"):
        args = build_parser().parse_args([command, "--target-modules", "q_lin, v_lin"])
        assert _config_from_args(args, COMMON_KEYS).lora.target_modules == ["q_lin", "v_lin"]
    args = build_parser().parse_args(["simulate", "--target-modules", "all-linear"])
    assert _config_from_args(args, COMMON_KEYS).lora.target_modules == ["all-linear"]
    for bad, message in ((",", "expected module names"), ("all-linear,q_proj", "all-linear .* stands alone")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["simulate", "--target-modules", bad])
        assert re.search(message, capsys.readouterr().err)
    config = RunConfig()
    config.lora.target_modules = ["all-linear", "q_proj"]
    with pytest.raises(ConfigError, match="lora.target_modules"):
        config.validate()
