"""Sequence-to-sequence: an encoder-decoder model (T5, mT5, BART...) reads a source text and
learns to write the target text. The loss is the token cross-entropy of the target alone (the
source is the encoder's input and carries none), as transformers' own seq2seq models compute it
from ``labels``.

Data: prompt/response examples (``Example.prompt`` is the source, ``Example.text`` the target;
``fedtune.data`` reads them from fields such as ``source``/``input`` and ``target``/``output``).
Scored by ``eval_loss`` (mean token cross-entropy over the held-out targets) and
``eval_perplexity``; with ``eval.generate`` N > 0, also by the exact match of greedy
generations for the first N held-out sources against their targets
(``eval_generate_exact_match``, compared as causal LM compares them).

Encoder-decoder models have two block stacks, so split learning (one stack cut in two) cannot
take them: the task refuses ``split-model`` and the composer says so at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fedtune.contract.properties import declare
from fedtune.data import Example
from fedtune.tasks.base import TASKS, EncodedExample, EvalOptions, Task, attention_mask, pad, safe_exp, token_array, window_warnings
from fedtune.tasks.causal_lm import IGNORE, _generation_eos, exact_match

log = logging.getLogger(__name__)

# Examples per tokenizer call when encoding a dataset (as classification does).
ENCODE_SLICE = 1024


def source_ids(tokenizer, sources: Sequence[str], max_length: int) -> list[list[int]]:
    """The encoder's tokens of each source: the tokenizer's own framing (T5 ends with ``</s>``,
    BART frames ``<s> ... </s>``), cut to ``max_length`` tokens with the framing kept."""
    return tokenizer(list(sources), truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def target_ids(tokenizer, targets: Sequence[str], max_length: int) -> list[list[int]]:
    """The tokens the decoder learns to write for each target, at most ``max_length``, ending
    with the EOS token (added when the tokenizer's framing does not end with it, so the model
    learns where to stop). Tokenized as targets (``text_target``: tokenizers with a separate
    target language, such as mBART's, frame them as such)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(text_target=list(targets), truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    if eos is None:
        return [list(t) for t in ids]
    return [list(t) if t and t[-1] == eos else list(t)[: max(max_length - 1, 0)] + [eos] for t in ids]


@dataclass(frozen=True)
class GenerationCases:
    """What the generation evaluation needs: the held-out sources (tokenized), their target
    texts, the EOS ids that end an answer and how many new tokens an answer may take."""

    sources: list[Sequence[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    eos_ids: tuple[int, ...] = ()
    max_new_tokens: int = 32


@TASKS.register("seq2seq")
class Seq2Seq(Task):
    name = "seq2seq"
    declares = declare(refuses={
        "split-model": "seq2seq trains encoder-decoder models, which have two block stacks; split learning cuts a model's one stack of blocks",
    })

    def encode(self, examples: Sequence[Example], tokenizer, max_length: int, labels: Sequence[str] = (), chat_template: str = "auto") -> list[EncodedExample]:
        """Source tokens (the encoder's input) and target tokens (the labels), each at most
        ``max_length``; no chat template (an encoder-decoder reads the source as it is).
        Examples whose source or target has no tokens are dropped; a warning says how many were
        dropped and how many fill the window (their source or target may have been cut)."""
        out, full = [], 0
        # In slices: the tokenizer's Python output for a whole device's data at once would cost
        # several times the compact result.
        for start in range(0, len(examples), ENCODE_SLICE):
            chunk = examples[start : start + ENCODE_SLICE]
            sources = source_ids(tokenizer, [ex.prompt for ex in chunk], max_length)
            targets = target_ids(tokenizer, [ex.text for ex in chunk], max_length)
            kept = [(s, t) for s, t in zip(sources, targets) if s and t]
            full += sum(len(s) >= max_length or len(t) >= max_length for s, t in kept)
            out.extend(EncodedExample(token_array(s), token_array(t)) for s, t in kept)
        dropped = len(examples) - len(out)
        if (dropped or full) and window_warnings():
            log.warning("max_length %d: %d of %d examples dropped (no source or target tokens) and %d fill the window "
                        "(their source or target may be cut); raise --max-length to train on them whole",
                        max_length, dropped, len(examples), full)
        return out

    def collate(self, items: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        """Sources padded with ``pad_id`` (and their attention mask), targets padded with
        IGNORE: the model derives the decoder's input from ``labels`` (shifted right, IGNORE read
        as padding), and padding after a target never reaches its tokens (causal decoder)."""
        sources = [it.input_ids for it in items]
        return {"input_ids": pad(sources, pad_id), "attention_mask": attention_mask(sources), "labels": pad([it.target for it in items], IGNORE)}

    def _token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token losses, labels), both batch x target length; IGNORE positions lose 0."""
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits.float()
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"), labels

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's mean token loss over its own target tokens (transformers' model loss
        averages over the whole batch's tokens instead)."""
        tokens, labels = self._token_losses(model, batch)
        return tokens.sum(dim=1) / (labels != IGNORE).sum(dim=1).clamp(min=1)

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        tokens, labels = self._token_losses(model, batch)
        return {"loss_sum": float(tokens.sum()), "tokens": float((labels != IGNORE).sum())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums.get("loss_sum", 0.0) / max(sums.get("tokens", 0.0), 1.0)
        return {"eval_loss": loss, "eval_perplexity": safe_exp(loss)}

    # ------------------------------------------------------------------- generation

    def prepare_eval(self, examples: Sequence[Example], tokenizer, max_length: int, options: EvalOptions) -> GenerationCases | None:
        """The first ``options.generate`` held-out sources (tokenized as in training) with their
        targets; None when generation is off or there are no examples."""
        chosen = [ex for ex in examples if ex.prompt][: max(options.generate, 0)]
        if not chosen:
            return None
        sources = [token_array(s) for s in source_ids(tokenizer, [ex.prompt for ex in chosen], max_length)]
        eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        return GenerationCases(sources, [ex.text for ex in chosen], eos, options.max_new_tokens)

    def evaluate_prepared(self, model: torch.nn.Module, prepared: GenerationCases | None, pad_id: int, batch_size: int,
                          decode: Callable[[list[list[int]]], list[str]]) -> dict[str, float]:
        """``eval_generate_exact_match`` and ``eval_generate_count`` over the prepared sources."""
        if prepared is None or not prepared.sources:
            return {}
        eos = sorted(set(prepared.eos_ids) | set(_generation_eos(model)))
        new = self.generate(model, prepared.sources, pad_id, eos, prepared.max_new_tokens, batch_size)
        return {"eval_generate_exact_match": exact_match(decode(new), prepared.references), "eval_generate_count": float(len(new))}

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module, sources: Sequence[Sequence[int]], pad_id: int, eos_ids: Sequence[int],
                 max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
        """Greedy answers to ``sources`` (transformers' ``generate``, batched over length-sorted
        sources, right-padded as encoders take them): for each, the decoder's tokens after its
        start token, at most ``max_new_tokens``, ending before the first EOS (any of
        ``eos_ids``)."""
        was_training = model.training
        model.eval()
        out: list[list[int]] = [[] for _ in sources]
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        stop = set(eos_ids)
        device = next(model.parameters()).device
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                chunk = [sources[i] for i in rows]
                generated = model.generate(
                    input_ids=pad(chunk, pad_id).to(device), attention_mask=attention_mask(chunk).to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=list(eos_ids) or None,
                )
                for r, i in enumerate(rows):
                    tokens = generated[r, 1:].tolist()  # position 0 holds the decoder's start token
                    cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
                    out[i] = tokens[:cut]
        finally:
            model.train(was_training)
        return out
