"""Reading users' data files: formats, field detection, and errors that point at the line."""

from __future__ import annotations

import pytest

from fedtune.data import DataError, embedded_tweets, label_ids, load_examples, resolve_labels


def test_jsonl_csv_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good day", "label": "pos"}\n\n{"text": "bad day", "label": "neg"}\n')
    (tmp_path / "b.csv").write_bytes("sentiment,text\npos,caf\xe9 is nice\n".encode("latin-1"))
    (tmp_path / "c.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "d.jsonl").write_text('{"prompt": "Q: 2+2?", "response": "4"}\n')
    a = load_examples(tmp_path / "a.jsonl", task="seq-cls")
    assert [(e.text, e.label) for e in a] == [("good day", "pos"), ("bad day", "neg")]
    assert load_examples(tmp_path / "b.csv", task="seq-cls")[0].text == "café is nice"
    assert [e.text for e in load_examples(tmp_path / "c.txt", task="causal-lm")] == ["first line", "second line"]
    d = load_examples(tmp_path / "d.jsonl", task="causal-lm")[0]
    assert (d.prompt, d.text) == ("Q: 2+2?", "4")
    assert resolve_labels(a) == ["neg", "pos"] and label_ids(a, ["neg", "pos"]) == [1, 0]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.jsonl", '{"text": "a", "label": 1}\n{oops\n', "x.jsonl:2: not valid JSON"),
        ("x.jsonl", '[1, 2]\n', "x.jsonl:1: expected a JSON object"),
        ("x.jsonl", '{"body": "a", "label": 1}\n', "no text field"),
        ("x.jsonl", '{"text": "a"}\n', "no label field"),
        ("x.jsonl", '{"text": "a", "label": 1}\n{"text": "", "label": 1}\n', "x.jsonl:2: field 'text' must be a non-empty string"),
        ("x.jsonl", '{"text": "a", "label": null}\n', "field 'label' must be a class name or index"),
        ("x.txt", "hello\n", "plain-text data has no labels"),
        ("x.jsonl", "", "no examples"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        load_examples(tmp_path / name, task="seq-cls")


def test_labels_outside_the_declared_set_are_errors():
    from fedtune.data import Example

    with pytest.raises(DataError, match="label 'maybe' is not one of"):
        label_ids([Example("t", "maybe")], ["yes", "no"])
    with pytest.raises(DataError, match="class index 5 out of range"):
        label_ids([Example("t", 5)], ["yes", "no"])


def test_embedded_corpus_is_the_real_tweet_data():
    tweets = embedded_tweets()
    assert len(tweets) > 38_000
    counts = {name: sum(t.label == name for t in tweets) for name in ("negative", "neutral", "positive")}
    assert counts["negative"] > counts["neutral"] > counts["positive"] > 6000
