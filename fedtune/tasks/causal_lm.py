"""Causal language modelling: next-token prediction on text, or on the response of a
prompt/response pair (the prompt's tokens carry no loss). Scored by token cross-entropy, and,
on held-out data, the way LLM users measure a model:

- generation accuracy: greedy answers to held-out prompts, exact match against the response
  (``eval_generate_exact_match``);
- multiple-choice accuracy: each choice of a question scored by the summed log-likelihood of
  its tokens after the prompt, the best one compared with the answer, as lm-evaluation-harness
  scores MMLU-style tasks (``eval_choice_accuracy``; ``eval_choice_accuracy_norm`` divides each
  choice's log-likelihood by its length in characters, the harness's ``acc_norm``).

Prompts are formatted with the tokenizer's chat template when it has one (``chat_template``
"auto"; "none": the prompt's own tokens). ``prompt_ids`` is the one place that turns a prompt
into the tokens the model is conditioned on, in training and in every evaluation alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fedtune.data import Example
from fedtune.tasks.base import (
    CHAT_TEMPLATE_MODES, TASKS, EncodedExample, EvalOptions, Task, attention_mask, pad, safe_exp, token_array, window_warnings,
)

log = logging.getLogger(__name__)

IGNORE = -100


def uses_chat_template(tokenizer, chat_template: str) -> bool:
    """Whether prompts are formatted with ``tokenizer``'s chat template under the mode
    ``chat_template``: "auto" when the tokenizer has a template, "none" never."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat template mode must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {chat_template!r}")
    return chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, prompt: str, response: str | None) -> str:
    """The chat template's text for a user turn (and the assistant's reply, when given)."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    except Exception as exc:  # a template's own errors (jinja, raise_exception in the template)
        raise ValueError(f"the tokenizer's chat template cannot format a prompt/response pair ({exc}); "
                         "use --chat-template none (model.chat_template = \"none\")") from exc


def prompt_ids(tokenizer, prompt: str, chat_template: str = "auto") -> list[int]:
    """The tokens a prompt conditions the model on: the chat template's user turn and the
    assistant's header (the generation prompt) when the template is used, else the prompt's own
    tokens with the tokenizer's special tokens (fedtune's format before chat templates).
    An empty prompt gives no tokens."""
    if not prompt:
        return []
    if uses_chat_template(tokenizer, chat_template):
        return tokenizer(_render(tokenizer, prompt, None), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def response_ids(tokenizer, prompt: str, text: str, chat_template: str = "auto") -> list[int]:
    """The tokens the model learns to produce after ``prompt_ids(prompt)``: under the chat
    template, the assistant turn as the template writes it (with its end-of-turn marker) and the
    EOS token unless the turn holds it already; otherwise the text's tokens and EOS (with the
    tokenizer's special tokens when there is no prompt: plain text is never templated)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if prompt and uses_chat_template(tokenizer, chat_template):
        head, whole = _render(tokenizer, prompt, None), _render(tokenizer, prompt, text)
        # The assistant's turn is what the whole conversation adds to the generation prompt; a
        # template that writes earlier turns differently once a reply follows gets the bare text.
        tail = whole[len(head):] if whole.startswith(head) else text
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        return ids if not eos or eos[0] in ids else ids + eos
    return tokenizer(text, add_special_tokens=not prompt)["input_ids"] + eos


def normalize_answer(text: str) -> str:
    """The form generated text and references are compared in: surrounding whitespace stripped,
    inner runs of whitespace collapsed to one space, case folded."""
    return " ".join(text.split()).casefold()


def exact_match(generated: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of ``generated`` equal to their reference after ``normalize_answer``."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations for {len(references)} references")
    if not references:
        return 0.0
    return sum(normalize_answer(g) == normalize_answer(r) for g, r in zip(generated, references)) / len(references)


@dataclass(frozen=True)
class ChoiceCase:
    """A multiple-choice question, tokenized: the prompt, each choice's tokens (scored after the
    prompt), each choice's length in characters (for the normalized score) and the answer."""

    prompt_ids: Sequence[int]
    choice_ids: tuple[Sequence[int], ...]
    choice_chars: tuple[int, ...]
    answer: int


@dataclass(frozen=True)
class HeldOutCases:
    """What the extra causal-LM evaluations need: the prompts to answer by generation with their
    references, the multiple-choice questions, and how generation stops."""

    generation_prompts: list[Sequence[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    choices: list[ChoiceCase] = field(default_factory=list)
    eos_ids: tuple[int, ...] = ()
    max_new_tokens: int = 32


def fit_left(context: Sequence[int], continuations: Sequence[Sequence[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """(context, continuations) so that the context followed by any continuation holds at most
    ``max_length`` tokens: the context is cut from the left (lm-evaluation-harness's rule), the
    same for every continuation, keeping at least one token of it; a continuation longer than
    the window loses its end."""
    conts = [list(c)[: max(max_length - 1, 1)] for c in continuations]
    room = max(max_length - max((len(c) for c in conts), default=0), 1)
    return list(context)[-room:], conts


@TASKS.register("causal-lm")
class CausalLM(Task):
    name = "causal-lm"

    def encode(self, examples: Sequence[Example], tokenizer, max_length: int, labels: Sequence[str] = (), chat_template: str = "auto") -> list[EncodedExample]:
        """Prompt then response tokens, cut at ``max_length``; the target holds the response's
        tokens (the prompt's positions are IGNORE). Examples whose prompt fills the window are
        dropped, and a warning says how many were dropped or cut (a chat template's system
        prompt alone can take half of a short window)."""
        out, cut = [], 0
        for ex in examples:
            prompt = prompt_ids(tokenizer, ex.prompt, chat_template)
            text = response_ids(tokenizer, ex.prompt, ex.text, chat_template)
            ids = (prompt + text)[:max_length]
            target = ([IGNORE] * len(prompt) + text)[:max_length]
            if sum(t != IGNORE for t in target[1:]) == 0:
                continue  # nothing to learn once truncated: the prompt filled the window
            cut += len(prompt) + len(text) > max_length
            out.append(EncodedExample(token_array(ids), token_array(target)))
        dropped = len(examples) - len(out)
        if (dropped or cut) and window_warnings():
            log.warning("max_length %d: %d of %d examples dropped (the prompt fills the window) and %d cut short; "
                        "raise --max-length to train on them whole", max_length, dropped, len(examples), cut)
        return out

    def collate(self, items: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        sequences = [it.input_ids for it in items]
        labels = pad([it.target for it in items], IGNORE)
        return {"input_ids": pad(sequences, pad_id), "attention_mask": attention_mask(sequences), "labels": labels}

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's mean token loss over its own target tokens (transformers' model loss
        averages over the whole batch's tokens instead)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        tokens = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        counted = (targets != IGNORE).sum(dim=1).clamp(min=1)
        return tokens.sum(dim=1) / counted

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        targets = batch["labels"][:, 1:].reshape(-1)
        loss = F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
        return {"loss_sum": float(loss), "tokens": float((targets != IGNORE).sum())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums.get("loss_sum", 0.0) / max(sums.get("tokens", 0.0), 1.0)
        return {"eval_loss": loss, "eval_perplexity": safe_exp(loss)}

    # ------------------------------------------------------------ generation and choices

    def prepare_eval(self, examples: Sequence[Example], tokenizer, max_length: int, options: EvalOptions) -> HeldOutCases | None:
        """The first ``options.generate`` prompt/response examples as generation prompts (cut
        from the left to ``max_length`` tokens) with their responses, and every example with
        choices as a tokenized question. None when there is neither."""
        prompts, references = [], []
        if options.generate > 0:
            for ex in (e for e in examples if e.prompt):
                if len(prompts) == options.generate:
                    break
                prompts.append(token_array(prompt_ids(tokenizer, ex.prompt, options.chat_template)[-max_length:]))
                references.append(ex.text)
        cases = []
        for ex in (e for e in examples if e.choices):
            context = prompt_ids(tokenizer, ex.prompt, options.chat_template)
            conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.choices]
            if not all(conts):
                log.warning("a multiple-choice question has a choice with no tokens; it is left out of eval_choice_accuracy")
                continue
            context, conts = fit_left(context, conts, max_length)
            cases.append(ChoiceCase(
                prompt_ids=token_array(context),
                choice_ids=tuple(token_array(c) for c in conts),
                choice_chars=tuple(len(c) for c in ex.choices),
                answer=int(ex.answer),
            ))
        if not prompts and not cases:
            return None
        eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        return HeldOutCases(prompts, references, cases, eos, options.max_new_tokens)

    def evaluate_prepared(self, model: torch.nn.Module, prepared: HeldOutCases | None, pad_id: int, batch_size: int,
                          decode: Callable[[list[list[int]]], list[str]]) -> dict[str, float]:
        """``eval_generate_exact_match`` (and ``eval_generate_count``) over the generation
        prompts, ``eval_choice_accuracy`` and ``eval_choice_accuracy_norm`` (and
        ``eval_choice_count``) over the questions."""
        if prepared is None:
            return {}
        metrics: dict[str, float] = {}
        if prepared.generation_prompts:
            eos = set(prepared.eos_ids) | set(_generation_eos(model))
            new = self.generate(model, prepared.generation_prompts, pad_id, sorted(eos), prepared.max_new_tokens, batch_size)
            metrics["eval_generate_exact_match"] = exact_match(decode(new), prepared.references)
            metrics["eval_generate_count"] = float(len(new))
        if prepared.choices:
            scores = self.choice_loglikelihoods(model, prepared.choices, pad_id, batch_size)
            raw = norm = 0
            for case, lls in zip(prepared.choices, scores):
                raw += max(range(len(lls)), key=lambda j: lls[j]) == case.answer
                norm += max(range(len(lls)), key=lambda j: lls[j] / case.choice_chars[j]) == case.answer
            metrics["eval_choice_accuracy"] = raw / len(scores)
            metrics["eval_choice_accuracy_norm"] = norm / len(scores)
            metrics["eval_choice_count"] = float(len(scores))
        return metrics

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, eos_ids: Sequence[int],
                 max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (transformers' ``generate``, batched over
        length-sorted prompts, left-padded as decoder-only models need): for each prompt, at
        most ``max_new_tokens`` new tokens, ending before the first EOS (any of ``eos_ids``)."""
        was_training = model.training
        model.eval()
        out: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        stop = set(eos_ids)
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    n = len(prompts[i])
                    if n:
                        ids[r, width - n :] = torch.tensor(list(prompts[i]), dtype=torch.long)
                        mask[r, width - n :] = 1
                device = next(model.parameters()).device
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=list(eos_ids) or None,
                )
                for r, i in enumerate(rows):
                    tokens = generated[r, width:].tolist()
                    cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
                    out[i] = tokens[:cut]
        finally:
            model.train(was_training)
        return out

    @torch.inference_mode()
    def choice_loglikelihoods(self, model: torch.nn.Module, cases: Sequence[ChoiceCase], pad_id: int, batch_size: int = 64) -> list[list[float]]:
        """For each question, each choice's summed log-probability of its tokens given the
        prompt (one forward pass per prompt + choice, batched by length)."""
        was_training = model.training
        model.eval()
        pairs = [(q, j) for q, case in enumerate(cases) for j in range(len(case.choice_ids))]
        pairs.sort(key=lambda p: len(cases[p[0]].prompt_ids) + len(cases[p[0]].choice_ids[p[1]]))
        out = [[0.0] * len(case.choice_ids) for case in cases]
        device = next(model.parameters()).device
        try:
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start : start + batch_size]
                seqs = [list(cases[q].prompt_ids) + list(cases[q].choice_ids[j]) for q, j in batch]
                logits = model(input_ids=pad(seqs, pad_id).to(device), attention_mask=attention_mask(seqs).to(device)).logits
                for row, (q, j) in enumerate(batch):
                    context, cont = len(cases[q].prompt_ids), torch.tensor(list(cases[q].choice_ids[j]), dtype=torch.long, device=device)
                    # the logits at position t predict the token at t + 1
                    logp = F.log_softmax(logits[row, context - 1 : context - 1 + len(cont)].float(), dim=-1)
                    out[q][j] = float(logp.gather(-1, cont[:, None]).sum())
        finally:
            model.train(was_training)
        return out


def _generation_eos(model: torch.nn.Module) -> list[int]:
    """The EOS ids of the model's generation config (instruct models list their end-of-turn
    token there)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
