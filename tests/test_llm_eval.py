"""LLM evaluation as LLM users measure it: chat-templated prompt/response encoding, greedy
generation scored by exact match, multiple-choice questions scored by log-likelihood, and the
metrics in a run's rows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from fedtune.cli import COMMON_KEYS, _config_from_args, _optional_columns, _row_cells, build_parser
from fedtune.config import ConfigError, RunConfig
from fedtune.data import DataError, Example, load_examples
from fedtune.models import ModelStore, load_base_model, load_tokenizer, resolve_source
from fedtune.tasks import EvalOptions, get_task
from fedtune.tasks.causal_lm import IGNORE, ChoiceCase, HeldOutCases, exact_match, normalize_answer, prompt_ids

# A small chat template: the user's turn, then the assistant's, each closed by [SEP] (the tiny
# models' EOS); the generation prompt is the assistant's header.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory) -> str:
    """``tiny_llama`` whose saved tokenizer has ``TEMPLATE`` as its chat template."""
    folder = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, folder)
    tokenizer = load_tokenizer(resolve_source(str(folder)))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


def _old_encoding(ex: Example, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """fedtune's causal-LM encoding before chat templates, written out again."""
    eos = [tokenizer.eos_token_id]
    prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"] if ex.prompt else []
    text = tokenizer(ex.text, add_special_tokens=not ex.prompt)["input_ids"] + eos
    return (prompt + text)[:max_length], ([IGNORE] * len(prompt) + text)[:max_length]


EXAMPLES = [Example(text="four", prompt="what is two plus two?"), Example(text="the red car drives")]


def test_the_chat_template_formats_the_prompt_and_the_loss_covers_only_the_response(chat_llama):
    tokenizer = load_tokenizer(resolve_source(chat_llama))
    assert tokenizer.chat_template == TEMPLATE  # it survived save and load
    task = get_task("causal-lm")
    templated, plain = task.encode(EXAMPLES, tokenizer, 64, chat_template="auto")
    ids, target = list(templated.input_ids), list(templated.target)
    head = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": EXAMPLES[0].prompt}], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    # the prompt part is the template's user turn and assistant header, with no loss on it
    assert ids[: len(head)] == head == prompt_ids(tokenizer, EXAMPLES[0].prompt, "auto")
    assert tokenizer.convert_ids_to_tokens(head)[:3] == ["<", "|", "user"] and "assistant" in tokenizer.convert_ids_to_tokens(head)
    assert target[: len(head)] == [IGNORE] * len(head)
    # the response part is the assistant's turn as the template closes it ([SEP], the EOS, once)
    response = ids[len(head):]
    assert tokenizer.convert_ids_to_tokens(response) == ["four", "[SEP]"] and target[len(head):] == response
    # plain text is never templated; "none" is exactly the old encoding
    assert (list(plain.input_ids), list(plain.target)) == _old_encoding(EXAMPLES[1], tokenizer, 64)
    for item, ex in zip(task.encode(EXAMPLES, tokenizer, 64, chat_template="none"), EXAMPLES):
        assert (list(item.input_ids), list(item.target)) == _old_encoding(ex, tokenizer, 64)
    with pytest.raises(ValueError, match="chat template mode must be one of auto, none"):
        task.encode(EXAMPLES, tokenizer, 64, chat_template="chatml")


def test_without_a_template_auto_is_the_old_encoding(tiny_llama):
    tokenizer = load_tokenizer(resolve_source(tiny_llama))
    assert not getattr(tokenizer, "chat_template", None)
    items = get_task("causal-lm").encode(EXAMPLES, tokenizer, 9)  # the response cut short
    assert [(list(i.input_ids), list(i.target)) for i in items] == [_old_encoding(ex, tokenizer, 9) for ex in EXAMPLES]


def test_examples_a_short_window_drops_or_cuts_are_counted_in_a_warning(chat_llama, caplog):
    tokenizer = load_tokenizer(resolve_source(chat_llama))
    task = get_task("causal-lm")
    head = len(prompt_ids(tokenizer, EXAMPLES[0].prompt, "auto"))
    with caplog.at_level("WARNING", logger="fedtune.tasks.causal_lm"):
        assert len(task.encode(EXAMPLES[:1], tokenizer, 256)) == 1
        assert not caplog.records  # everything fits: no warning
        assert task.encode(EXAMPLES[:1], tokenizer, head) == []  # the templated prompt alone fills the window
        assert task.encode(EXAMPLES[:1], tokenizer, head + 1)  # one response token fits: kept, cut short
    assert [r.getMessage() for r in caplog.records] == [
        f"max_length {head}: 1 of 1 examples dropped (the prompt fills the window) and 0 cut short; raise --max-length to train on them whole",
        f"max_length {head + 1}: 0 of 1 examples dropped (the prompt fills the window) and 1 cut short; raise --max-length to train on them whole",
    ]


def test_a_devices_timing_sample_at_its_own_window_does_not_warn_about_max_length(chat_llama, caplog):
    """Calibration encodes a sample at a fixed window that is not the run's --max-length: no
    warning that would send the user to raise it; encoding elsewhere still warns."""
    from fedtune.client.calibrate import calibrate

    source = resolve_source(chat_llama)
    tokenizer = load_tokenizer(source)
    head = len(prompt_ids(tokenizer, EXAMPLES[0].prompt, "auto"))
    with caplog.at_level("WARNING", logger="fedtune.tasks.causal_lm"):
        calibrate(ModelStore(), source, "causal-lm", (), EXAMPLES[:1] * 4, batch_size=2, seq_len=head + 1, steps=1)
        assert not caplog.records
        get_task("causal-lm").encode(EXAMPLES[:1], tokenizer, head + 1)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [f"max_length {head + 1}: 0 of 1 examples dropped (the prompt fills the window) and 1 cut short"]


def test_exact_match_compares_normalized_text():
    assert normalize_answer("  The  Answer\n is 4 ") == "the answer is 4"
    assert exact_match(["  Four\n", "five", "4 2"], ["four", "four", "4  2"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 generations for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_greedy_generation_is_bounded_stops_at_eos_and_scores_exact_match(tiny_llama):
    source = resolve_source(tiny_llama)
    tokenizer, model = load_tokenizer(source), load_base_model(source, "causal-lm")
    task, pad_id = get_task("causal-lm"), tokenizer.pad_token_id
    prompts = [prompt_ids(tokenizer, p, "none") for p in ("two plus two", "the red car drives on the long road", "hi")]
    never = [tokenizer.vocab_size + 7]  # an id no model output takes: no stop
    free = task.generate(model, prompts, pad_id, never, max_new_tokens=6, batch_size=3)
    assert [len(t) for t in free] == [6, 6, 6]
    # left-padded batches give what each prompt gives alone
    assert free == [task.generate(model, [p], pad_id, never, 6)[0] for p in prompts]
    assert [len(t) for t in task.generate(model, prompts, pad_id, never, max_new_tokens=2)] == [2, 2, 2]
    # stop at EOS: make the first generated token that is new in its row the EOS
    row = free[1]
    k = next(k for k in range(1, 6) if row[k] not in row[:k])
    stopped = task.generate(model, prompts[1:2], pad_id, [row[k]], max_new_tokens=6)[0]
    assert stopped == row[:k]
    # exact match of the decoded answers against references: one right (case and spaces aside), one wrong
    decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    answer = decode([free[0]])[0]
    cases = HeldOutCases(prompts[:2], ["  " + answer.upper() + " ", answer + " x"], [], tuple(never), 6)
    metrics = task.evaluate_prepared(model, cases, pad_id, 4, decode)
    assert metrics == {"eval_generate_exact_match": 0.5, "eval_generate_count": 2.0}


def test_multiple_choice_scores_are_summed_log_likelihoods(tiny_llama):
    source = resolve_source(tiny_llama)
    tokenizer, model = load_tokenizer(source), load_base_model(source, "causal-lm")
    task = get_task("causal-lm")
    questions = [Example(text="four", prompt="what is two plus two?", choices=("four", "twenty two", "a red car"), answer=0),
                 Example(text="blue", prompt="the sky is", choices=("blue", "green road"), answer=1)]
    cases = task.prepare_eval(questions, tokenizer, 64, EvalOptions(chat_template="none")).choices
    scores = task.choice_loglikelihoods(model, cases, tokenizer.pad_token_id, batch_size=5)  # mixed lengths in one padded batch
    by_hand = []
    for ex in questions:
        context = tokenizer(ex.prompt)["input_ids"]
        row = []
        for choice in ex.choices:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([context + cont])).logits[0]
            logp = F.log_softmax(logits.double(), dim=-1)
            row.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
        by_hand.append(row)
    assert len(cases[0].choice_ids[1]) == 2 and len(cases[0].choice_ids[2]) == 3  # choices of different lengths
    for got, want in zip(scores, by_hand):
        assert got == pytest.approx(want, abs=1e-4)
    best = [max(range(len(r)), key=r.__getitem__) for r in by_hand]
    best_norm = [max(range(len(r)), key=lambda j: r[j] / len(ex.choices[j])) for r, ex in zip(by_hand, questions)]
    metrics = task.evaluate_prepared(model, HeldOutCases(choices=cases), tokenizer.pad_token_id, 64, lambda ids: [])
    assert metrics["eval_choice_accuracy"] == sum(b == ex.answer for b, ex in zip(best, questions)) / 2
    assert metrics["eval_choice_accuracy_norm"] == sum(b == ex.answer for b, ex in zip(best_norm, questions)) / 2
    assert metrics["eval_choice_count"] == 2.0
    # a long prompt is cut from the left, the same for every choice, to fit the window
    long = task.prepare_eval([Example(text="a", prompt="word " * 40, choices=("a", "b c d"), answer=0)], tokenizer, 16, EvalOptions()).choices[0]
    assert all(len(long.prompt_ids) + len(c) <= 16 for c in long.choice_ids) and len(long.prompt_ids) == 13
    assert isinstance(long, ChoiceCase) and list(long.prompt_ids)[-1] == tokenizer.sep_token_id


def test_jsonl_multiple_choice_records_are_read_and_checked(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n'
                    '{"question": "Capital of France?", "response": "Paris", "choices": ["Rome", "Paris"], "answer": 1}\n'
                    '{"question": "Say hi", "response": "hi"}\n')
    a, b, c = load_examples(path, task="causal-lm")
    assert (a.prompt, a.text, a.choices, a.answer) == ("2+2?", "4", ("3", "4"), 1)
    assert (b.text, b.choices) == ("Paris", ("Rome", "Paris")) and (c.text, c.choices, c.answer) == ("hi", (), None)
    # choices train on the right one as the response
    assert load_examples(path, task="causal-lm")[0] == Example(text="4", prompt="2+2?", choices=("3", "4"), answer=1)
    bad = {
        '{"prompt": "q", "choices": ["a", "b"], "answer": 2}': "mc.jsonl:1: field 'answer' is 2, out of range for 2 choices",
        '{"prompt": "q", "choices": ["a", "b"], "answer": -1}': "field 'answer' is -1, out of range",
        '{"prompt": "q", "choices": ["a", "b"], "answer": "b"}': "field 'answer' must be the index of the right choice",
        '{"prompt": "q", "choices": ["a", "b"], "answer": true}': "field 'answer' must be the index",
        '{"prompt": "q", "choices": ["a", "b"]}': "field 'answer' (the index of the right choice) is missing",
        '{"prompt": "q", "choices": ["a", ""], "answer": 0}': "field 'choices': choice 1 must be a non-empty string",
        '{"prompt": "q", "choices": ["a", 3], "answer": 0}': "field 'choices': choice 1 must be a non-empty string",
        '{"prompt": "q", "choices": [], "answer": 0}': "field 'choices' must be a list of at least 2 strings",
        '{"prompt": "q", "choices": "a b", "answer": 0}': "field 'choices' must be a list of at least 2 strings",
        '{"prompt": "", "choices": ["a", "b"], "answer": 0}': "a record with 'choices' needs a non-empty prompt field ('prompt')",
    }
    for line, message in bad.items():
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_examples(path, task="causal-lm")


def test_config_keys_and_flags(capsys):
    args = build_parser().parse_args(["simulate", "--chat-template", "none", "--eval-generate", "8", "--eval-max-new-tokens", "16"])
    config = _config_from_args(args, COMMON_KEYS)
    assert (config.model.chat_template, config.eval.generate, config.eval.max_new_tokens) == ("none", 8, 16)
    assert (RunConfig().model.chat_template, RunConfig().eval.generate, RunConfig().eval.max_new_tokens) == ("auto", 0, 32)
    for key, value, message in (("model.chat_template", "chatml", "model.chat_template: must be auto or none"),
                                ("eval.generate", -1, "eval.generate: must be >= 0"),
                                ("eval.max_new_tokens", 0, "eval.max_new_tokens: must be between 1 and 4096")):
        config = RunConfig()
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
        with pytest.raises(ConfigError, match=message):
            config.validate()


def test_a_run_reports_generation_and_choice_accuracy(tmp_path, chat_llama, monkeypatch):
    from fedtune.simulation.runner import run_simulation

    records = [{"prompt": f"the {w} car", "response": f"drives {w}"} for w in ("red", "blue", "green", "old", "new", "fast")] * 8
    records += [{"prompt": f"color of {w}?", "choices": [w, "grey"], "answer": 0} for w in ("red", "blue", "green", "old")] * 2
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    evals = [{"prompt": f"the {w} car", "response": f"drives {w}"} for w in ("red", "blue", "new")]
    evals += [{"prompt": f"color of {w}?", "choices": ["grey", w, "pink"], "answer": 1} for w in ("red", "fast")]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = chat_llama, "causal-lm", 32
    config.model.chat_template = "none"
    config.federation.rounds, config.simulation.clients, config.simulation.partition = 2, 2, "iid"
    config.training.local_steps, config.training.batch_size, config.lora.rank = 2, 8, 4
    config.simulation.data, config.eval.data = str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
    config.eval.generate, config.eval.max_new_tokens = 4, 3
    config.run_dir = str(tmp_path / "run")
    seen: list[str] = []
    original = ModelStore.encode

    def spy(self, source, task, examples, max_length, labels=(), chat_template="auto"):
        seen.append(chat_template)
        return original(self, source, task, examples, max_length, labels, chat_template=chat_template)

    monkeypatch.setattr(ModelStore, "encode", spy)
    result = run_simulation(config)
    assert not result.client_errors and len(seen) >= 3 and set(seen) == {"none"}  # coordinator and both clients
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["eval_generate_exact_match"] <= 1.0 and row["eval_generate_count"] == 4.0  # the first 4 prompts
        assert row["eval_choice_accuracy"] in (0.0, 0.5, 1.0) and row["eval_choice_accuracy_norm"] in (0.0, 0.5, 1.0)
        assert row["eval_choice_count"] == 2.0 and row["eval_perplexity"] > 1.0
    # the round table gets a column per optional metric present
    optional = _optional_columns(rows[0])
    assert [title for _, title, _ in optional] == ["gen EM", "choice acc", "choice acc norm"]
    assert _row_cells(rows[0], "causal-lm", optional)[-3:] == [format(rows[0][k], ".3f") for k, _, _ in optional]
    assert _optional_columns({"eval_loss": 1.0}) == []


def test_the_round_table_shows_the_optional_columns_when_the_first_evaluated_round_comes(tmp_path, chat_llama, capsys):
    """With --eval-every the first rows have no eval figures: the columns of the metrics the run
    reports come with the first evaluated row, and the earlier rows show '-'."""
    from fedtune.cli import main

    records = [{"prompt": f"the {w} car", "response": f"drives {w}"} for w in ("red", "blue", "green", "old")] * 6
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    evals = [{"prompt": f"color of {w}?", "choices": ["grey", w], "answer": 1} for w in ("red", "fast")]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    code = main(["simulate", "--model", chat_llama, "--task", "causal-lm", "--data", str(tmp_path / "train.jsonl"),
                 "--eval-data", str(tmp_path / "eval.jsonl"), "--clients", "2", "--rounds", "3", "--eval-every", "2",
                 "--local-steps", "1", "--max-length", "32", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "choice acc" in out
    first = next(line for line in out.splitlines() if line.strip("│ ").startswith("1 "))
    assert first.count(" - ") >= 3  # round 1: eval loss, perplexity and choice accuracy not measured
