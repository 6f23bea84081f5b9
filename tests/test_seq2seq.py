"""The seq2seq task on encoder-decoder models (tiny random T5 and BART built from their configs,
no download): its data, its encoding and loss checked against a hand computation from the
model's own logits, greedy generation checked against a hand-written greedy loop, federated
rounds that learn and export an adapter plain peft reloads exactly, and the combinations that
cannot work refused at start with one line."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from fedtune.adapters import load_exported_adapter
from fedtune.config import ConfigError, RunConfig
from fedtune.data import DataError, Example, load_examples
from fedtune.models import ModelError, load_base_model, load_tokenizer, resolve_source
from fedtune.simulation.runner import run_simulation
from fedtune.tasks import EvalOptions, get_task

from test_families import TINY, WORDS, _tokenizer

# Per encoder-decoder family: the config keys that make it tiny (its config names them so).
SEQ2SEQ = {
    "t5": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2, "decoder_start_token_id": 0},
    "bart": {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
             "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "decoder_start_token_id": 2, "forced_eos_token_id": None},
}
SENTIMENT = WORDS[5:21]  # the words a target copies
FILLER = WORDS[21:]
EOS = 3  # "[SEP]", the tokenizer's EOS


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """family name ("t5", "bart", or "llama": a decoder-only model) -> a saved tiny random model
    folder with a word-level tokenizer (built on first use)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    folders: dict[str, str] = {}

    def build(name: str) -> str:
        if name not in folders:
            folder = tmp_path_factory.mktemp(name)
            config = AutoConfig.for_model(name, **{**TINY, **SEQ2SEQ.get(name, {"num_key_value_heads": 2})})
            torch.manual_seed(0)
            (AutoModelForSeq2SeqLM if name in SEQ2SEQ else AutoModelForCausalLM).from_config(config).save_pretrained(folder)
            _tokenizer(framed=False).save_pretrained(folder)
            folders[name] = str(folder)
        return folders[name]

    return build


def copy_rows(n: int, seed: int) -> list[dict]:
    """Source: three filler words and a sentiment word; target: that word (a copy)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(SENTIMENT)
        rows.append({"source": " ".join(rng.sample(FILLER, 3) + [word]), "target": word})
    return rows


def _write(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, folder: str, *, rounds: int = 1, steps: int = 2, lr: float = 1e-2) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = folder, "seq2seq", 16
    config.federation.rounds, config.federation.strategy = rounds, "fedavg"
    config.simulation.clients, config.simulation.partition = 2, "iid"
    config.simulation.data = _write(tmp_path / "train.jsonl", copy_rows(64, 1))
    config.eval.data = _write(tmp_path / "eval.jsonl", copy_rows(16, 2))
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = steps, 8, lr
    config.lora.rank, config.lora.alpha = 4, 8.0
    config.run_dir = str(tmp_path / "run")
    return config


# ------------------------------------------------------------------------------ data


def test_data_reads_source_target_pairs_and_names_the_line_of_a_missing_source(tmp_path):
    path = tmp_path / "pairs.jsonl"
    _write(path, [{"source": "the car", "target": "good"}, {"source": "my trip", "target": "bad"}])
    assert [(e.prompt, e.text) for e in load_examples(path, task="seq2seq")] == [("the car", "good"), ("my trip", "bad")]
    # the causal-LM names work too (input is a source field, output a target one), and CSV
    csv = tmp_path / "pairs.csv"
    csv.write_text("input,output\nthe road,bad\nmy trip,nice\n")
    assert [(e.prompt, e.text) for e in load_examples(csv, task="seq2seq")] == [("the road", "bad"), ("my trip", "nice")]
    # a record without a source is an error naming file and line (causal LM would train on the text alone)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "the car", "output": "good"}) + "\n" + json.dumps({"output": "bad"}) + "\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: seq2seq needs a non-empty source text: field 'input'$"):
        load_examples(bad, task="seq2seq")
    assert load_examples(bad, task="causal-lm")[1] == Example(text="bad")
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"target": "bad"}) + "\n")
    with pytest.raises(DataError, match=rf"^{none}:1: seq2seq needs a non-empty source text: a source field \(one of prompt, .*source\)$"):
        load_examples(none, task="seq2seq")
    text = tmp_path / "plain.txt"
    text.write_text("the car\n")
    with pytest.raises(DataError, match="plain-text data has no source/target pairs; use JSONL or CSV for seq2seq"):
        load_examples(text, task="seq2seq")


# ------------------------------------------------------------------------------ encoding and loss


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoding_pads_labels_with_ignore_and_the_loss_is_the_targets_own(model_folder, name, caplog):
    source = resolve_source(model_folder(name))
    tokenizer, task = load_tokenizer(source), get_task("seq2seq")
    model = load_base_model(source, "seq2seq")
    assert type(model).__name__.endswith("ForConditionalGeneration")
    examples = [Example(text="great", prompt="the car drives today great"), Example(text="bad sad", prompt="my trip bad")]
    items = task.encode(examples, tokenizer, 16)
    ids = {w: i for i, w in enumerate(WORDS)}
    assert [list(it.input_ids) for it in items] == [[ids[w] for w in ex.prompt.split()] for ex in examples]
    assert [list(it.target) for it in items] == [[ids["great"], EOS], [ids["bad"], ids["sad"], EOS]]  # the EOS ends each target
    assert [list(it.target) for it in task.encode(examples, tokenizer, 2)] == [[ids["great"], EOS], [ids["bad"], EOS]]  # cut, EOS kept
    caplog.clear()  # (the window of 2 above warned already)
    with caplog.at_level("WARNING", logger="fedtune.tasks.seq2seq"):
        task.encode(examples, tokenizer, 16)
        assert not caplog.records  # everything fits: no warning
        task.encode(examples, tokenizer, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "max_length 2: 0 of 2 examples dropped (no source or target tokens) and 2 fill the window "
        "(their source or target may be cut); raise --max-length to train on them whole"]

    pad_id = tokenizer.pad_token_id
    batch = task.collate(items, pad_id)
    assert batch["input_ids"].tolist() == [list(items[0].input_ids), list(items[1].input_ids) + [pad_id, pad_id]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[ids["great"], EOS, -100], [ids["bad"], ids["sad"], EOS]]

    # By hand: each example alone (no padding anywhere), the decoder fed its start token and the
    # target shifted right, the loss the mean -log p of the target's tokens and nothing else.
    start = model.config.decoder_start_token_id
    hand, token_sum, token_count = [], 0.0, 0
    with torch.no_grad():
        for it in items:
            target = list(it.target)
            logits = model(input_ids=torch.tensor([list(it.input_ids)]), decoder_input_ids=torch.tensor([[start] + target[:-1]])).logits[0]
            logp = F.log_softmax(logits.double(), dim=-1)[torch.arange(len(target)), torch.tensor(target)]
            hand.append(float(-logp.mean()))
            token_sum, token_count = token_sum - float(logp.sum()), token_count + len(target)
        got = task.example_losses(model, batch)
    assert got.tolist() == pytest.approx(hand, abs=1e-5)
    metrics = task.evaluate(model, items, pad_id)
    assert metrics["eval_loss"] == pytest.approx(token_sum / token_count, abs=1e-5)  # token-weighted over the targets
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(token_sum / token_count), rel=1e-5)
    with torch.no_grad():  # the mean over the batch's target tokens is transformers' own loss
        assert float(model(**batch).loss) == pytest.approx(token_sum / token_count, abs=1e-5)


def test_generation_is_greedy_decoding_and_exact_match_compares_its_text(model_folder):
    source = resolve_source(model_folder("t5"))
    tokenizer, task = load_tokenizer(source), get_task("seq2seq")
    model = load_base_model(source, "seq2seq")
    examples = [Example(text="?", prompt="the car drives great"), Example(text="?", prompt="my bad")]
    cases = task.prepare_eval(examples, tokenizer, 16, EvalOptions(generate=2, max_new_tokens=4))
    assert task.prepare_eval(examples, tokenizer, 16, EvalOptions(generate=0)) is None

    def greedy(src: list[int]) -> list[int]:
        out = [model.config.decoder_start_token_id]
        with torch.no_grad():
            for _ in range(4):
                nxt = int(model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([out])).logits[0, -1].argmax())
                if nxt == EOS:
                    break
                out.append(nxt)
        return out[1:]

    want = [greedy(list(s)) for s in cases.sources]
    assert task.generate(model, cases.sources, tokenizer.pad_token_id, [EOS], 4) == want  # batched, right-padded sources
    decode = lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True)  # noqa: E731
    texts = decode(want)
    right = [Example(text=f"  {texts[0].upper()} ", prompt=examples[0].prompt), Example(text=texts[1] + " extra", prompt=examples[1].prompt)]
    metrics = task.evaluate_prepared(model, task.prepare_eval(right, tokenizer, 16, EvalOptions(generate=2, max_new_tokens=4)),
                                     tokenizer.pad_token_id, 8, decode)
    assert metrics == {"eval_generate_exact_match": 0.5, "eval_generate_count": 2.0}  # case and spaces do not count, words do


# ------------------------------------------------------------------------------ federated runs


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_a_federated_round_trains_and_its_export_reloads_exactly(tmp_path, model_folder, name):
    folder = model_folder(name)
    config = _config(tmp_path, folder)
    config.eval.generate = 3
    result = run_simulation(config)
    assert not result.client_errors and [r["round"] for r in result.history] == [1]
    row = result.history[-1]
    assert math.isfinite(row["eval_loss"]) and math.isfinite(row["train_loss"])
    assert row["eval_generate_count"] == 3.0 and 0.0 <= row["eval_generate_exact_match"] <= 1.0
    adapter = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert set(adapter["target_modules"]) == ({"q", "v"} if name == "t5" else {"q_proj", "v_proj"})  # peft's defaults
    # plain peft on a fresh base reproduces the run's evaluation
    source = resolve_source(folder)
    model = load_exported_adapter(load_base_model(source, "seq2seq"), result.run_dir / "adapter").eval()
    tokenizer, task = load_tokenizer(source), get_task("seq2seq")
    items = task.encode(load_examples(config.eval.data, task="seq2seq"), tokenizer, 16)
    assert task.evaluate(model, items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(row["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("name,precision", [("t5", "4bit"), ("bart", "int8")])
def test_an_encoder_decoder_trains_on_a_quantized_base_and_its_export_reproduces_the_evaluation(tmp_path, model_folder, name, precision):
    """Both stacks (and their cross-attention) held at 8 or 4 bits; the adapter, loaded on a base
    held as the run held it, gives the run's last evaluation."""
    folder = model_folder(name)
    config = _config(tmp_path, folder, rounds=2, steps=4, lr=3e-2)
    config.model.base_precision = precision
    result = run_simulation(config)
    assert not result.client_errors, result.client_errors
    first, last = result.history[0], result.history[-1]
    assert math.isfinite(last["eval_loss"]) and last["train_loss"] < first["train_loss"]
    source = resolve_source(folder, precision)
    model = load_exported_adapter(load_base_model(source, "seq2seq"), result.run_dir / "adapter").eval()
    tokenizer, task = load_tokenizer(source), get_task("seq2seq")
    items = task.encode(load_examples(config.eval.data, task="seq2seq"), tokenizer, 16)
    assert task.evaluate(model, items, tokenizer.pad_token_id)["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)


def test_training_learns_to_copy_a_source_word(tmp_path, model_folder):
    config = _config(tmp_path, model_folder("t5"), rounds=2, steps=8, lr=3e-2)
    result = run_simulation(config)
    assert not result.client_errors
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"] - 0.3
    assert last["eval_loss"] < first["eval_loss"] - 0.1


# ------------------------------------------------------------------------------ refusals


def _one_line_error(capsys, argv: list[str]) -> str:
    from fedtune.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_split_mode_and_decoder_only_models_are_refused_at_start_with_one_line(tmp_path, model_folder, capsys):
    config = _config(tmp_path, model_folder("t5"))
    config.split.mode, config.split.cut = "split", 1
    with pytest.raises(ConfigError, match=r"^model.task seq2seq cannot be combined with split.mode split \(split-model\): .*two block stacks"):
        run_simulation(config)
    data = _write(tmp_path / "cli.jsonl", copy_rows(16, 3))
    err = _one_line_error(capsys, ["simulate", "--model", model_folder("t5"), "--task", "seq2seq", "--data", data, "--mode", "split",
                                   "--run-dir", str(tmp_path / "cli-split")])
    assert "model.task seq2seq cannot be combined with split.mode split" in err

    llama = model_folder("llama")
    config = _config(tmp_path, llama)
    config.run_dir = str(tmp_path / "run-llama")
    with pytest.raises(ModelError, match=r"^task seq2seq needs an encoder-decoder model .* is a llama model, not an encoder-decoder"):
        run_simulation(config)
    err = _one_line_error(capsys, ["simulate", "--model", llama, "--task", "seq2seq", "--data", data, "--rounds", "1",
                                   "--run-dir", str(tmp_path / "cli-llama")])
    assert "task seq2seq needs an encoder-decoder model" in err and "llama model" in err
