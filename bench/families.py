"""Which transformer families fedtune trains, and with what: one row per model type, each cell a
real tiny run through fedtune's own code paths.

    python bench/families.py [--families gpt2,llama,...] [--out FILE]

The families are every model type in peft's default LoRA target map
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) that transformers
can build for sequence classification, causal LM or seq2seq LM from a config, plus DistilBERT
(which peft has no default for). Each is built here from a tiny random config (hidden 32, 2
blocks, 2 heads, a 60-word vocabulary) and saved with ``save_pretrained`` next to a word-level
tokenizer built from the same words: no download. Encoders train ``seq-cls``, encoder-decoders
``seq2seq`` (the target: the source's sentiment word, a copy), decoders ``causal-lm``. A model
type transformers or its tokenizer cannot build offline is
listed as ``skipped: <why>``.

Columns, each ``ok``, ``refused: <reason>`` (fedtune said no at start, with one line) or
``failed: <error's first line>``:

- ``federated``: a FedAvg round of 2 simulated clients with the default LoRA;
- ``planner``: a HetLoRA round of 3 clients of different device tiers (phone, laptop, server),
  each given its own plan by the capability planner;
- ``split``: a SplitFed round (U-shaped, cut after block 1, fp32 activations);
- ``ffa``, ``fedsb``: FedAvg rounds of the FFA-LoRA and Fed-SB variants;
- ``dp_sample``: a round with sample-level DP-SGD (Opacus) on the devices;
- ``export``: the federated run's exported PEFT adapter loaded by plain peft on a fresh base
  reproduces the run's final evaluation loss;

plus ``step_ms`` (median AdamW step of a client, batch 8 of 16 tokens, fedtune's calibration
routine) and ``peak_mib`` (that client process's peak resident memory while training; every
family runs in a child process of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HIDDEN, BLOCKS, HEADS, FFN = 32, 2, 2, 64
LABELS = ["negative", "positive"]
POSITIVE = ["great", "love", "wonderful", "happy", "excellent", "nice", "good", "amazing"]
NEGATIVE = ["awful", "hate", "terrible", "sad", "horrible", "bad", "poor", "worst"]
FILLER = ["the", "car", "drives", "today", "my", "road", "trip", "was", "this", "city", "new", "a"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 64  # the specials and words above, padded to a round size
COLUMNS = ("federated", "planner", "split", "ffa", "fedsb", "dp_sample", "export")

# Per family: the config keys that make it tiny, where its config names them otherwise than
# (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size).
OVERRIDES: dict[str, dict] = {
    "t5": {"d_model": HIDDEN, "d_kv": HIDDEN // HEADS, "d_ff": FFN, "num_layers": BLOCKS, "num_decoder_layers": BLOCKS, "num_heads": HEADS,
           "decoder_start_token_id": 0},
    "mt5": {"d_model": HIDDEN, "d_kv": HIDDEN // HEADS, "d_ff": FFN, "num_layers": BLOCKS, "num_decoder_layers": BLOCKS, "num_heads": HEADS,
            "decoder_start_token_id": 0},
    "bart": {"d_model": HIDDEN, "encoder_layers": BLOCKS, "decoder_layers": BLOCKS, "encoder_attention_heads": HEADS,
             "decoder_attention_heads": HEADS, "encoder_ffn_dim": FFN, "decoder_ffn_dim": FFN, "decoder_start_token_id": 2},
    "gpt2": {"n_embd": HIDDEN, "n_layer": BLOCKS, "n_head": HEADS, "n_inner": FFN, "n_positions": 64},
    "gpt_bigcode": {"n_embd": HIDDEN, "n_layer": BLOCKS, "n_head": HEADS, "n_inner": FFN, "n_positions": 64},
    "bloom": {"n_embed": HIDDEN, "n_layer": BLOCKS, "n_head": HEADS},
    "opt": {"ffn_dim": FFN, "word_embed_proj_dim": HIDDEN},
    "gptj": {"n_embd": HIDDEN, "n_layer": BLOCKS, "n_head": HEADS, "n_inner": FFN, "rotary_dim": 8, "n_positions": 64},
    "codegen": {"n_embd": HIDDEN, "n_layer": BLOCKS, "n_head": HEADS, "n_inner": FFN, "rotary_dim": 8, "n_positions": 64, "n_ctx": 64},
    "gpt_neo": {"num_layers": BLOCKS, "attention_types": [[["global", "local"], 1]], "window_size": 16},
    "gpt_neox": {"rotary_pct": 0.5},
    "mpt": {"d_model": HIDDEN, "n_heads": HEADS, "n_layers": BLOCKS, "expansion_ratio": 2, "max_seq_len": 64},
    "falcon": {"new_decoder_architecture": False, "multi_query": True, "head_dim": None},
    "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 1},
    "distilbert": {"dim": HIDDEN, "n_layers": BLOCKS, "n_heads": HEADS, "hidden_dim": FFN},
    "deberta": {"pooler_hidden_size": HIDDEN},
    "deberta-v2": {"pooler_hidden_size": HIDDEN},
    "phi": {"partial_rotary_factor": 0.5},
    "stablelm": {"partial_rotary_factor": 0.5},
    "rwkv": {"attention_hidden_size": HIDDEN, "context_length": 64},
    "gemma2": {"sliding_window": 16},
    "gemma3_text": {"sliding_window": 16},
    "gemma4": {"sliding_window": 16, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8},
    "nemotron_h": {"layers_block_type": ["linear_attention", "full_attention"], "use_mamba_kernels": False, "ssm_state_size": 8,
                   "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 1, "chunk_size": 16, "moe_intermediate_size": FFN,
                   "moe_shared_expert_intermediate_size": FFN, "num_logits_to_keep": 0},
}
# Composite (vision-language) model types whose text model is its own type: a text-only user
# brings that one, so the row builds it.
TEXT_MODEL = {"llama4": "llama4_text", "gemma4": "gemma4_text"}
COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": BLOCKS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
          "intermediate_size": FFN, "head_dim": HIDDEN // HEADS, "max_position_embeddings": 64}
# Model types fedtune does not try, and why (checked again below: a type transformers later
# learns to build would show up as built).
NOT_BUILT = {
    "blip-2": "a vision-language model (image encoder and Q-Former): no text-only seq-cls or causal-lm class",
}


@dataclass(frozen=True)
class Family:
    name: str
    task: str      # "seq-cls", "causal-lm" or "seq2seq"
    folder: str


class Skip(Exception):
    """The family cannot be built offline from a config; the message says why."""


def family_names() -> list[str]:
    """peft's default-target model types plus DistilBERT, in peft's order."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

    return [*targets, "distilbert"]


def _tokenizer(framed: bool):
    """A word-level tokenizer over the bench's words (what ``save_pretrained`` of any fast
    tokenizer writes, so ``AutoTokenizer`` loads it back as it would a real model's). With
    ``framed``, texts are framed ``[CLS] ... [SEP]`` as encoders' tokenizers do (encoder-decoder
    classifiers pool at the final end-of-sequence token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *POSITIVE, *NEGATIVE, *FILLER]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if framed:
        core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])


def task_of(model_type: str, config) -> str:
    """seq2seq for encoder-decoders (what they are pretrained for), seq-cls for encoders (and
    encoder-decoders without a seq2seq LM class; a causal-LM class of either is a decoder bolted
    on), causal-lm for decoders."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False) and model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    encoder = getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder:
        return "causal-lm"
    if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "seq-cls"
    raise Skip("transformers has no sequence-classification, causal-LM or seq2seq-LM class for it")


def build_family(name: str, folder: str | Path) -> Family:
    """Save a tiny random ``name`` model (seed 0) and its tokenizer in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if name in NOT_BUILT:
        raise Skip(NOT_BUILT[name])
    tokenizer = _tokenizer(framed=False)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "sep_token_id": tokenizer.sep_token_id}
    keys = {**COMMON, **OVERRIDES.get(name, {}), **ids}
    try:
        config = AutoConfig.for_model(TEXT_MODEL.get(name, name), **{k: v for k, v in keys.items() if v is not None})
    except ValueError as exc:
        raise Skip(f"transformers {__import__('transformers').__version__} has no config for it (remote code only): {str(exc).splitlines()[0][:60]}") from None
    task = task_of(config.model_type, config)
    if task == "seq-cls":
        tokenizer = _tokenizer(framed=True)
    factory = {"causal-lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}.get(task, AutoModelForSequenceClassification)
    torch.manual_seed(0)
    try:
        model = factory.from_config(config)
    except Exception as exc:  # noqa: BLE001 - the first line of whatever transformers raised
        raise Skip(f"transformers cannot build it from a config: {str(exc).splitlines()[0][:120]}") from None
    # Save the backbone's class where the head is task-specific, as model hubs hold them: the
    # run adds its own head.
    if task == "seq-cls":
        try:
            torch.manual_seed(0)
            model = AutoModel.from_config(config)
        except Exception:  # noqa: BLE001 - no bare backbone: keep the classifier
            pass
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Family(name, task, str(folder))


def examples(n: int, seed: int, task: str) -> list[dict]:
    """Sentences whose label is their last word (seq-cls), the same sentences as text
    (causal-lm), or as sources whose target is that last word (seq2seq: a copy)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(LABELS)
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        text = " ".join(rng.sample(FILLER, 5) + [word])
        if task == "seq-cls":
            out.append({"text": text, "label": label})
        elif task == "seq2seq":
            out.append({"prompt": text, "text": word})
        else:
            out.append({"text": text})
    return out


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------ the cells

REFUSALS = ("ConfigError", "ModelError", "AdapterError", "SplitError", "CoordinatorError")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:240]


def _config(fam: Family, tmp: Path, cell: str):
    """One round, few steps, tiny data: what every cell starts from."""
    from fedtune.config import RunConfig

    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length = fam.folder, fam.task, 16
    config.model.labels = list(LABELS) if fam.task == "seq-cls" else []
    config.federation.rounds, config.federation.strategy = 1, "fedavg"
    config.simulation.clients, config.simulation.partition = 2, "iid"
    config.simulation.data = _write(tmp / "train.jsonl", examples(64, 1, fam.task))
    config.eval.data = _write(tmp / "eval.jsonl", examples(16, 2, fam.task))
    config.training.local_steps, config.training.batch_size, config.training.learning_rate = 2, 8, 1e-2
    config.lora.rank, config.lora.alpha = 4, 8.0
    config.planner.min_rank, config.planner.max_rank = 2, 4
    config.run_dir = str(tmp / cell)
    config.seed = 0
    return config


def _run(config) -> tuple[str, object]:
    """``run_simulation`` of ``config``: (cell text, result or None)."""
    from fedtune.simulation.runner import run_simulation

    try:
        result = run_simulation(config)
    except Exception as exc:  # noqa: BLE001 - the cell reports what happened
        kind = "refused" if type(exc).__name__ in REFUSALS else "failed"
        return f"{kind}: {_first_line(exc) if kind == 'refused' else type(exc).__name__ + ': ' + _first_line(exc)}", None
    if result.client_errors:
        return f"failed: client: {_first_line(Exception(result.client_errors[0]))}", result
    if not result.history:
        return "failed: no round completed", result
    return "ok", result


def _export_cell(fam: Family, result) -> str:
    """The run's exported adapter, loaded by plain peft onto a fresh base model, reproduces the
    run's last evaluation loss."""
    from fedtune.adapters import load_exported_adapter
    from fedtune.data import load_examples
    from fedtune.models import load_base_model, load_tokenizer, resolve_source
    from fedtune.tasks import get_task

    if result is None:
        return "failed: the federated run did not finish"
    try:
        source = resolve_source(fam.folder)
        labels = LABELS if fam.task == "seq-cls" else []
        model = load_exported_adapter(load_base_model(source, fam.task, labels), result.run_dir / "adapter").eval()
        task, tokenizer = get_task(fam.task), load_tokenizer(source)
        items = task.encode(load_examples(str(Path(fam.folder).parent / "data" / "eval.jsonl"), task=fam.task), tokenizer, 16, labels)
        got = task.evaluate(model, items, tokenizer.pad_token_id)["eval_loss"]
    except Exception as exc:  # noqa: BLE001
        return f"failed: {type(exc).__name__}: {_first_line(exc)}"
    want = result.history[-1]["eval_loss"]
    return "ok" if abs(got - want) <= 1e-4 * max(1.0, abs(want)) else f"failed: reloaded eval loss {got:.6f}, the run's {want:.6f}"


def _client_measure(fam: Family) -> dict:
    """A client's median AdamW step (batch 8 of 16 tokens) and its process's peak memory."""
    from fedtune.adapters import AdapterPlan, inject_lora
    from fedtune.client.calibrate import fixed_length, median_step_seconds
    from fedtune.data import Example
    from fedtune.models import ModelStore, resolve_source
    from fedtune.tasks import get_task

    store, source, task = ModelStore(), resolve_source(fam.folder), get_task(fam.task)
    labels = LABELS if fam.task == "seq-cls" else []
    items = store.encode(source, task, [Example(**e) for e in examples(64, 3, fam.task)], 16, labels)
    items = fixed_length(items, 16, store.pad_id(source))
    model = inject_lora(store.instance(source, fam.task, labels), AdapterPlan(rank=4, alpha=8.0), fam.task, seed=0)
    seconds = median_step_seconds(model, task, items, store.pad_id(source), batch_size=8, steps=5, warmup=1)
    return {"step_ms": round(1000 * seconds, 2), "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_family(name: str, tmp: Path) -> dict:
    """Every cell of one family's row (in this process)."""
    import logging

    logging.getLogger("fedtune").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    row: dict = {"name": name}
    try:
        fam = build_family(name, tmp / "model")
    except Skip as exc:
        return {**row, "skipped": str(exc)}
    (tmp / "data").mkdir(exist_ok=True)
    _write(tmp / "data" / "eval.jsonl", examples(16, 2, fam.task))
    row["task"] = fam.task
    if name in TEXT_MODEL:
        row["built_as"] = TEXT_MODEL[name]
    try:
        row.update(_client_measure(fam))
    except Exception as exc:  # noqa: BLE001
        row.update({"step_ms": None, "peak_mib": None, "measure": f"failed: {type(exc).__name__}: {_first_line(exc)}"})
    started = time.monotonic()
    config = _config(fam, tmp, "federated")
    row["federated"], result = _run(config)
    row["export"] = _export_cell(fam, result) if row["federated"] == "ok" else "failed: the federated run did not finish"

    config = _config(fam, tmp, "planner")
    config.federation.strategy, config.simulation.clients, config.simulation.tiers = "hetlora", 3, ["phone", "laptop", "server"]
    row["planner"], result = _run(config)
    if row["planner"] == "ok" and not result.history[0].get("plans"):
        row["planner"] = "failed: the round carried no per-client plans"

    config = _config(fam, tmp, "split")
    config.split.mode, config.split.cut = "split", 1
    config.split.act_codec = config.split.grad_codec = "fp32"
    row["split"], _ = _run(config)

    for variant in ("ffa", "fedsb"):
        config = _config(fam, tmp, variant)
        config.lora.variant = variant
        row[variant], _ = _run(config)

    config = _config(fam, tmp, "dp_sample")
    config.privacy.dp = "sample"
    row["dp_sample"], _ = _run(config)
    row["cells_s"] = round(time.monotonic() - started, 1)
    return row


def _worker(name: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f"fedtune-family-{name}-") as tmp:
        row = run_family(name, Path(tmp))
    out.write_text(json.dumps(row))


def _row_in_child(name: str, timeout_s: float) -> dict:
    """One family in a child process of its own: a crash or a hang costs that row only, and
    each row's peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--worker-out", str(out)], timeout=timeout_s,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"name": name, **{c: f"failed: the family ran past {timeout_s:.0f} s" for c in COLUMNS}}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return {"name": name, **{c: f"failed: worker crashed: {tail[:200]}" for c in COLUMNS}}
        return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (long reasons shortened; the JSON has them whole)."""
    head = ["family", "task", *COLUMNS, "step_ms", "peak_mib"]
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append([r["name"], f"skipped: {r['skipped']}"])
            continue
        cells = [(r.get(c) or "-")[:28] for c in COLUMNS]
        lines.append([r["name"], r.get("task", "-"), *cells, f"{r.get('step_ms') or '-'}", f"{r.get('peak_mib') or '-'}"])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if len(l) == len(head))) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    for l in lines:
        out.append(("  ".join(c.ljust(w) for c, w in zip(l, widths))) if len(l) == len(head) else "  ".join(l))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--out", default="", help="write the rows and settings as JSON here")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds one family may take")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, Path(args.worker_out))
        return 0
    names = [n.strip() for n in args.families.split(",") if n.strip()] or family_names()
    rows, started = [], time.monotonic()
    for name in names:
        row = _row_in_child(name, args.timeout)
        rows.append(row)
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'name'})}", file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        settings = {"hidden": HIDDEN, "blocks": BLOCKS, "heads": HEADS, "vocab": VOCAB, "clients": 2, "rounds": 1, "local_steps": 2,
                    "batch_size": 8, "max_length": 16, "rank": 4, "seconds": round(time.monotonic() - started, 1)}
        Path(args.out).write_text(json.dumps({"rows": rows, **settings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
