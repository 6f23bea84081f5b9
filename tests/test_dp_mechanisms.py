"""The DP mechanisms checked as mechanisms: each example's gradient depends on that example
alone (what makes the clip norm the sensitivity), the Gaussian noise has the standard deviation
the accountant assumes, batches and client selections are Poisson samples (what amplification
by sampling assumes), secret randomness is secret and research mode repeats, and FedLC's label
prior is released once through a Gaussian mechanism of its own, whose cost the accountant sees.

Statistical checks use fixed seeds for what the test draws and tolerances of 5 standard
deviations or more; each one is shown to fail on a sampler that breaks the property it checks.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedtune.adapters import AdapterPlan, adapter_parameters, adapter_state, inject_lora
from fedtune.client.policy import PrivacyPolicy
from fedtune.client.recipes import RECIPES, TrainSettings, make_recipe
from fedtune.client.recipes.base import LocalOptions, Recipe
from fedtune.client.state import DeviceState, state_from_bytes, state_to_bytes
from fedtune.data import Example
from fedtune.models import ModelStore, resolve_source
from fedtune.options import OptionsError
from fedtune.privacy import epsilon
from fedtune.privacy import sample_level
from fedtune.privacy.randomness import poisson_select
from fedtune.privacy.sample_level import BudgetSpent, PrivacyRefusal, poisson_batches
from fedtune.tasks import get_task
from fedtune.tasks.base import sample_batches

from conftest import FILLER, NEGATIVE, POSITIVE, _minilm_tokenizer, sentiment_examples

LABELS = ["negative", "positive"]
SIGMAS = 5.0  # every statistical tolerance, in standard deviations
STORE = ModelStore()

# Opacus' hooks on a model whose base weights are frozen: harmless (see dp_train).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


# ---------------------------------------------------------------- tiny models without dropout


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    """A 2-block BERT, random weights, every dropout probability 0."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert-no-dropout")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    _minilm_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A 2-block Llama, random weights, every dropout probability 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-no-dropout")
    tokenizer = _minilm_tokenizer()
    tokenizer.eos_token = "[SEP]"
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _lora(folder: str, task: str) -> torch.nn.Module:
    """The model with a rank-4 adapter (no LoRA dropout) whose every trainable tensor is moved
    off its initial value, so that no per-example gradient is trivially zero (B = 0 at init
    zeroes every gradient of A)."""
    model = inject_lora(STORE.instance(resolve_source(folder), task, LABELS if task == "seq-cls" else ()),
                        AdapterPlan(rank=4, alpha=8.0, dropout=0.0), task, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _encode(folder: str, task_name: str, examples):
    task = get_task(task_name)
    source = resolve_source(folder)
    return task, STORE.encode(source, task, examples, 64, LABELS if task_name == "seq-cls" else ()), STORE.pad_id(source)


@pytest.fixture(scope="module")
def sentiment(bert_dir):
    """120 labelled sentences on the BERT, and their true label counts."""
    task, items, pad = _encode(bert_dir, "seq-cls", sentiment_examples(120, seed=1))
    counts = torch.bincount(torch.tensor([it.target for it in items]), minlength=2)
    return bert_dir, task, items, pad, counts


# ---------------------------------------------------------------- statistics


def binomial_mismatch(sizes: list[int], n: int, q: float) -> list[str]:
    """Why ``sizes`` are not draws of Binomial(n, q) (empty: they pass), at SIGMAS standard
    deviations: the sample mean against n q, the sample variance against n q (1 - q), whose
    standard error is sqrt((2 var^2 + kappa4) / k) with kappa4 = n q (1 - q) (1 - 6 q (1 - q))
    the binomial's fourth cumulant."""
    k = len(sizes)
    mean_want, var_want = n * q, n * q * (1 - q)
    kappa4 = var_want * (1 - 6 * q * (1 - q))
    mean = sum(sizes) / k
    var = sum((s - mean) ** 2 for s in sizes) / (k - 1)
    problems = []
    if abs(mean - mean_want) > SIGMAS * math.sqrt(var_want / k):
        problems.append(f"mean {mean:.4g} != n q = {mean_want:.4g}")
    if abs(var - var_want) > SIGMAS * math.sqrt((2 * var_want**2 + kappa4) / k):
        problems.append(f"variance {var:.4g} != n q (1 - q) = {var_want:.4g}")
    return problems


def assert_frequency(hits: int, trials: int, p: float, what: str) -> None:
    freq = hits / trials
    assert abs(freq - p) <= SIGMAS * math.sqrt(p * (1 - p) / trials), f"{what}: frequency {freq:.4f}, expected {p:.4f}"


def assert_gaussian_std(draws: torch.Tensor, std: float, what: str) -> None:
    """``draws`` of N(0, std^2): sum(x^2) / std^2 is chi-square with N degrees of freedom (mean
    N, variance 2 N), and the mean is within SIGMAS standard errors of 0."""
    x = draws.double().flatten()
    n = x.numel()
    chi2 = float((x**2).sum()) / std**2
    assert abs(chi2 - n) <= SIGMAS * math.sqrt(2 * n), f"{what}: sample std {math.sqrt(chi2 / n) * std:.5g}, expected {std:.5g} ({n} draws)"
    assert abs(float(x.mean())) <= SIGMAS * std / math.sqrt(n), f"{what}: mean {float(x.mean()):.4g} is not 0"


def test_the_statistics_helpers_reject_what_they_should():
    gen = torch.Generator().manual_seed(0)

    def binomial(k: int) -> list[int]:
        return torch.binomial(torch.full((k,), 50.0), torch.full((k,), 0.3), generator=gen).int().tolist()

    assert binomial_mismatch(binomial(3000), 50, 0.3) == []
    assert any("variance" in p for p in binomial_mismatch([15] * 3000, 50, 0.3))
    assert any("mean" in p for p in binomial_mismatch([s + 1 for s in binomial(3000)], 50, 0.3))
    assert_gaussian_std(torch.randn(20000, generator=gen) * 0.7, 0.7, "N(0, 0.7^2)")
    with pytest.raises(AssertionError, match="sample std"):
        assert_gaussian_std(torch.randn(20000, generator=gen) * 0.7 * 1.05, 0.7, "5% too wide")


# ---------------------------------------------------------------- 1. per-example independence


def _word_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(FILLER + POSITIVE + NEGATIVE) for _ in range(words))


def _examples(task_name: str, seed: int, words: int, count: int) -> list[Example]:
    rng = random.Random(seed)
    label = (lambda: rng.choice(LABELS)) if task_name == "seq-cls" else (lambda: None)
    return [Example(text=_word_text(rng, words), label=label()) for _ in range(count)]


def _grad_samples(model: torch.nn.Module, params: dict, reduction: str, batch_loss, inputs: dict) -> dict[str, torch.Tensor]:
    """Opacus' per-example gradients of ``batch_loss(wrapped, inputs)`` under ``reduction``."""
    model.train()
    wrapped = GradSampleModule(model, loss_reduction=reduction)
    try:
        batch_loss(wrapped, inputs).backward()
        return {n: p.grad_sample.detach().clone() for n, p in params.items()}
    finally:
        wrapped._close()
        for p in params.values():
            p.grad_sample, p.grad = None, None
        model.eval()


CASES = [("seq-cls", "local"), ("seq-cls", "fedlc"), ("causal-lm", "local")]


def _composer_allows_sample_dp(correction: str) -> bool:
    from fedtune.compose import compose
    from fedtune.config import ConfigError, RunConfig

    config = RunConfig()
    config.privacy.dp, config.federation.client_correction = "sample", correction
    try:
        compose(config)
        return True
    except ConfigError:
        return False


# The recipes the coordinator may send under sample-level DP, from the parts' declarations:
# plain local training, and each client correction the composer lets DP-SGD wrap.
DP_RECIPES = ("local", *(c for c in ("fedlc", "fedprox", "scaffold") if _composer_allows_sample_dp(c)))


def test_the_cases_cover_every_recipe_dp_sgd_accepts():
    assert sorted({recipe for _, recipe in CASES}) == sorted(DP_RECIPES)


@pytest.mark.parametrize("task_name,recipe_name", CASES)
def test_each_examples_gradient_is_the_same_whatever_its_batchmates(task_name, recipe_name, bert_dir, llama_dir):
    """Example x's per-example gradient (Opacus, ``loss_reduction="sum"`` over the recipe's
    ``example_losses``) alone, beside short batchmates (x the longest: they are padded), and
    beside long batchmates at another position (x padded; for causal LM, about 4x its target
    tokens each). For causal LM, transformers' batch-mean loss (the old way) fails the same
    comparison: the check has the power to see a batchmate-dependent gradient."""
    folder = bert_dir if task_name == "seq-cls" else llama_dir
    model = _lora(folder, task_name)
    params = adapter_parameters(model)
    task, x, pad = _encode(folder, task_name, _examples(task_name, 10, 10, 1))
    _, short, _ = _encode(folder, task_name, _examples(task_name, 11, 2, 2))
    _, long, _ = _encode(folder, task_name, _examples(task_name, 12, 40, 3))
    assert len(x[0].input_ids) > max(len(s.input_ids) for s in short) and len(x[0].input_ids) * 3 < min(len(s.input_ids) for s in long)
    layouts = {"alone": ([x[0]], 0), "short mates": ([x[0], *short], 0), "long mates": ([long[0], long[1], x[0], long[2]], 2)}

    options = {"recipe": recipe_name, "dp_clip": "1.0", "dp_noise_multiplier": "1.0"}
    privacy = _kept_prior(LABELS, [3.5, 17.25]) if recipe_name == "fedlc" else {}  # a fixed prior: no draw
    recipe = make_recipe(options, {}, privacy)
    recipe.begin(model, {}, x, task)
    if recipe_name == "fedlc":
        assert recipe.counts.tolist() == [3.5, 17.25]

    def new_way(wrapped, inputs):
        return recipe.example_losses(wrapped, inputs, task).sum()

    def old_way(wrapped, inputs):
        return wrapped(**inputs).loss

    def x_grad(way, reduction):
        out = {}
        for name, (batch, at) in layouts.items():
            grads = _grad_samples(model, params, reduction, way, task.collate(batch, pad))
            out[name] = {n: g[at] for n, g in grads.items()}
        return out

    grads = x_grad(new_way, "sum")
    for n in params:
        scale = float(grads["alone"][n].abs().max())
        assert scale > 0, f"{n}: zero gradient, the comparison would be vacuous"
        for layout in ("short mates", "long mates"):
            torch.testing.assert_close(grads[layout][n], grads["alone"][n], rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"{n}, {layout}: {m}")

    if task_name == "causal-lm":
        old = x_grad(old_way, "mean")
        flat = {k: torch.cat([g.flatten() for g in v.values()]) for k, v in old.items()}
        # x's share of the batch's tokens (times the batch size) scales its old gradient.
        change = float((flat["long mates"] - flat["short mates"]).norm() / flat["short mates"].norm())
        assert change > 0.5, f"the batch-mean loss's per-example gradient moved by only {change:.3f}"


# ---------------------------------------------------------------- 2. the noise's standard deviation


def _noise_only_rounds(monkeypatch, sentiment, repeatable: bool, seed: int, runs: int, sigma: float, clip: float, batch_size: int, steps: int):
    """``runs`` rounds of the local recipe under DP-SGD through ``Recipe.run``, their Poisson
    batches (drawn as usual) all emptied: every step releases noise alone, and what reaches the
    inner optimizer is noise / expected batch size. Returns the captured gradients per run."""
    folder, task, items, pad, _ = sentiment
    captured: list[list[torch.Tensor]] = []
    real_batches, real_pre_step = sample_level.poisson_batches, DPOptimizer.pre_step

    def empty_batches(n, q, count, generator):
        return [[] for _ in real_batches(n, q, count, generator)]

    def recording_pre_step(self, closure=None):
        out = real_pre_step(self, closure)
        captured[-1].append(torch.cat([p.grad.detach().flatten().clone() for p in self.params]))
        return out

    monkeypatch.setattr(sample_level, "poisson_batches", empty_batches)
    monkeypatch.setattr(DPOptimizer, "pre_step", recording_pre_step)
    options = {"dp_clip": str(clip), "dp_noise_multiplier": str(sigma), "dp_repeatable": "true" if repeatable else "false"}
    model = _lora(folder, "seq-cls")
    start = adapter_state(model)
    for _ in range(runs):
        captured.append([])
        recipe = make_recipe(options, {}, {})
        _, metrics = recipe.run(model, start, {}, task, items, TrainSettings(steps, batch_size, 1e-3, 0.0, seed=seed), pad)
        assert metrics["dp_sample_secret"] == (0.0 if repeatable else 1.0)
    monkeypatch.undo()
    return [torch.stack(run) for run in captured]


@pytest.mark.parametrize("repeatable", [False, True])
def test_noise_has_std_sigma_clip_over_batch_and_secret_noise_never_repeats(monkeypatch, sentiment, repeatable):
    """With zero gradients (empty batches) the gradient DP-SGD hands to AdamW is the noise over
    the expected batch size: std sigma C / B per coordinate (chi-square bounds on ~20k draws).
    Two rounds with the same round seed draw different noise from the device's secrets and the
    same noise in research mode."""
    sigma, clip, batch_size, steps = 2.0, 0.5, 8, 10
    runs = _noise_only_rounds(monkeypatch, sentiment, repeatable, seed=7, runs=2, sigma=sigma, clip=clip, batch_size=batch_size, steps=steps)
    for run in runs:
        assert run.shape[0] == steps and run.numel() > 10_000
        assert_gaussian_std(run, sigma * clip / batch_size, f"noise, repeatable={repeatable}")
        # fresh noise at every step
        assert all(not torch.equal(run[i], run[i + 1]) for i in range(steps - 1))
    if repeatable:
        assert torch.equal(runs[0], runs[1])
    else:  # independent draws: uncorrelated
        a, b = runs[0].double().flatten(), runs[1].double().flatten()
        correlation = float((a * b).sum() / (a.norm() * b.norm()))
        assert not torch.equal(runs[0], runs[1]) and abs(correlation) <= SIGMAS / math.sqrt(a.numel()), correlation


def test_noise_std_check_has_power(monkeypatch, sentiment):
    """The same check rejects noise drawn at another multiplier (10% more) or another clip."""
    runs = _noise_only_rounds(monkeypatch, sentiment, False, seed=7, runs=1, sigma=2.2, clip=0.5, batch_size=8, steps=10)
    with pytest.raises(AssertionError, match="sample std"):
        assert_gaussian_std(runs[0], 2.0 * 0.5 / 8, "noise at sigma 2.2 checked against 2.0")


# ---------------------------------------------------------------- 3. Poisson batches


def test_batch_sizes_are_binomial_and_each_example_drawn_with_probability_q():
    n, q, steps = 200, 0.05, 4000
    batches = poisson_batches(n, q, steps, torch.Generator().manual_seed(0))
    assert len(batches) == steps
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in batches)
    assert binomial_mismatch([len(b) for b in batches], n, q) == []
    hits = [0] * n
    for b in batches:
        for i in b:
            hits[i] += 1
    for i in range(n):
        assert_frequency(hits[i], steps, q, f"example {i}")
    assert any(len(b) == 0 for b in poisson_batches(n, 0.005, 200, torch.Generator().manual_seed(1)))  # empty batches happen

    # Power: a fixed-size batcher (the non-DP one) has the right mean and no variance.
    items = list(range(n))
    fixed = [len(b) for b in sample_batches(items, steps, round(n * q), torch.Generator().manual_seed(0), group_by_length=1)]
    problems = binomial_mismatch(fixed, n, q)
    assert problems and all("variance" in p for p in problems), problems


# ---------------------------------------------------------------- 4. Poisson client selection


def _fixed_size_select(candidates, rate, rng):
    return sorted(rng.sample(list(candidates), round(rate * len(candidates))))


@pytest.mark.parametrize("repeatable", [True, False])
def test_client_selection_is_bernoulli_per_client(repeatable):
    candidates = [f"client-{i:02d}" for i in range(40)]
    q, rounds = 0.25, 2000
    chosen = [poisson_select(candidates, q, repeatable, 11, r) for r in range(rounds)]
    assert all(set(c) <= set(candidates) and c == sorted(c) for c in chosen)
    for name in candidates:
        assert_frequency(sum(name in c for c in chosen), rounds, q, name)
    # independent clients: a pair is chosen together with probability q^2
    for a, b in ((0, 1), (5, 30), (38, 39)):
        assert_frequency(sum(candidates[a] in c and candidates[b] in c for c in chosen), rounds, q * q, f"pair {a}, {b}")
    assert binomial_mismatch([len(c) for c in chosen], len(candidates), q) == []
    # different rounds, different selections (two equal ones: probability 0.625^40 ~ 7e-9)
    assert all(chosen[r] != chosen[r + 1] for r in range(rounds - 1))
    assert len({tuple(c) for c in chosen}) >= rounds - 5

    # Power: a fixed-size sampler has the right per-client frequency but fails the variance.
    rng = random.Random(0)
    fixed = [_fixed_size_select(candidates, q, rng) for _ in range(rounds)]
    assert_frequency(sum(candidates[0] in c for c in fixed), rounds, q, "fixed-size sampler")
    problems = binomial_mismatch([len(c) for c in fixed], len(candidates), q)
    assert problems and all("variance" in p for p in problems), problems


def test_secret_selection_never_repeats_and_research_mode_does():
    candidates = [f"client-{i:02d}" for i in range(64)]   # two equal draws at q = 1/2: 2^-64
    assert poisson_select(candidates, 0.5, False, 3, 9) != poisson_select(candidates, 0.5, False, 3, 9)
    assert poisson_select(candidates, 0.5, True, 3, 9) == poisson_select(candidates, 0.5, True, 3, 9)
    assert poisson_select(candidates, 0.5, True, 3, 9) != poisson_select(candidates, 0.5, True, 4, 9)
    assert poisson_select(candidates, 0.0, False, 3, 9) == [] and poisson_select(candidates, 1.0, False, 3, 9) == candidates


# ---------------------------------------------------------------- FedLC's label prior under DP-SGD


DP = {"recipe": "fedlc", "dp_clip": "1.0", "dp_noise_multiplier": "1.5"}
PRIOR_NOISE = 10.0  # FedLCRecipeOptions' default


def _kept_prior(labels, counts: list[float], noise: float = 10.0) -> dict:
    """A device's privacy state holding a noised label prior for ``labels``."""
    return {"label_priors": {json.dumps(list(labels)): {"counts": counts, "noise": noise}}}


def _prior(privacy: dict) -> list[float]:
    """The one label prior a device's privacy state holds."""
    (kept,) = privacy["label_priors"].values()
    return kept["counts"]


def _fedlc_round(sentiment, options: dict, privacy: dict, seed: int = 1, steps: int = 2, batch_size: int = 8):
    folder, task, items, pad, _ = sentiment
    model = _lora(folder, "seq-cls")
    recipe = make_recipe(options, {}, privacy)
    _, metrics = recipe.run(model, adapter_state(model), {}, task, items, TrainSettings(steps, batch_size, 1e-3, 0.0, seed=seed), pad)
    return recipe, metrics


def test_fedlc_prior_is_noised_under_dp_and_exact_without(sentiment):
    folder, task, items, _, counts = sentiment
    plain, privacy = {"recipe": "fedlc"}, {}
    recipe, _ = _fedlc_round(sentiment, plain, privacy)
    assert torch.equal(recipe.counts.cpu(), counts) and privacy == {}

    recipe, metrics = _fedlc_round(sentiment, DP, privacy)
    prior = _prior(privacy)
    assert len(prior) == 2 and all(isinstance(c, float) and c >= 0 for c in prior)
    assert prior != [float(c) for c in counts]
    assert recipe.counts.tolist() == prior
    assert privacy["history"][0] == (PRIOR_NOISE, 1.0, 1)
    assert metrics["dp_sample_secret"] == 1.0

    # The noise is N(0, prior_noise^2) per class: 600 fresh devices' draws (secret mode).
    model = _lora(folder, "seq-cls")
    draws = []
    for _ in range(600):
        fresh: dict = {}
        make_recipe(DP, {}, fresh).begin(model, {}, items, task)
        draws.append(torch.tensor(_prior(fresh), dtype=torch.float64))
    priors = torch.stack(draws)
    assert (priors > 0).all()  # no draw was clamped at 0 (counts ~60, noise std 10)
    assert_gaussian_std(priors - counts, PRIOR_NOISE, "label prior noise")


def test_fedlc_prior_is_drawn_once_and_reused(sentiment):
    privacy: dict = {}
    first, m1 = _fedlc_round(sentiment, DP, privacy, seed=1)
    prior = list(_prior(privacy))
    # as the agent keeps it between rounds (and across restarts)
    privacy = state_from_bytes(state_to_bytes(DeviceState("federation", privacy=privacy))).privacy
    second, m2 = _fedlc_round(sentiment, DP, privacy, seed=2)
    assert _prior(privacy) == prior and second.counts.tolist() == prior
    q = 8 / len(sentiment[2])
    assert privacy["history"] == [(PRIOR_NOISE, 1.0, 1), (1.5, q, 2), (1.5, q, 2)]
    assert m2["dp_sample_epsilon"] == pytest.approx(epsilon(privacy["history"], 1e-5), rel=1e-12)
    assert m1["dp_sample_prior_noise"] == m2["dp_sample_prior_noise"] == PRIOR_NOISE

    # A later task asking for another prior noise reuses the kept prior and reports the noise
    # it was drawn with (what the report must count), not the task's.
    third, m3 = _fedlc_round(sentiment, {**DP, "prior_noise": "3"}, privacy, seed=3)
    assert third.counts.tolist() == prior and m3["dp_sample_prior_noise"] == PRIOR_NOISE

    # Another label set, even of the same size, is another histogram: a new prior, drawn and
    # accounted (reusing the old one would calibrate by the wrong classes).
    folder, task, items, _, _ = sentiment
    for labels in (["a", "b", "c"], ["x", "y"]):
        privacy = _kept_prior(LABELS, [1.0, 2.0])
        recipe = make_recipe(DP, {}, privacy)
        recipe.begin(_model_with_labels(folder, labels), {}, items, task)
        assert len(recipe.counts) == len(labels) and privacy["history"] == [(PRIOR_NOISE, 1.0, 1)]
        assert set(privacy["label_priors"]) == {json.dumps(LABELS), json.dumps(labels)}


def _model_with_labels(folder, labels):
    return inject_lora(STORE.instance(resolve_source(folder), "seq-cls", labels), AdapterPlan(rank=4, alpha=8.0), "seq-cls", seed=0)


def test_fedlc_prior_costs_epsilon_in_the_report_the_budget_and_the_target_noise(sentiment):
    n = len(sentiment[2])
    fedlc_privacy, local_privacy = {}, {}
    _, fedlc = _fedlc_round(sentiment, DP, fedlc_privacy)
    _, local = _fedlc_round(sentiment, {**DP, "recipe": "local"}, local_privacy)
    round_only = epsilon([(1.5, 8 / n, 2)], 1e-5)
    with_prior = epsilon([(PRIOR_NOISE, 1.0, 1), (1.5, 8 / n, 2)], 1e-5)
    assert local["dp_sample_epsilon"] == pytest.approx(round_only, rel=1e-12)
    assert fedlc["dp_sample_epsilon"] == pytest.approx(with_prior, rel=1e-12)
    assert with_prior > round_only + 0.01

    # A budget between the two: the prior's cost is what makes fedlc decline.
    budget = {"dp_budget": str((round_only + with_prior) / 2)}
    _fedlc_round(sentiment, {**DP, **budget, "recipe": "local"}, {})
    declined: dict = {}
    with pytest.raises(BudgetSpent):
        _fedlc_round(sentiment, {**DP, **budget}, declined)
    # judged with the round before it was drawn: nothing spent on a prior that would go unused
    assert declined.get("history", []) == [] and not declined.get("label_priors")

    # A target epsilon: the noise multiplier is searched after the prior's cost.
    target = {"dp_target_epsilon": "3.0", "dp_total_steps": "2"}
    p_local, p_fedlc = {}, {}
    _fedlc_round(sentiment, {**DP, **target, "recipe": "local"}, p_local)
    _, m = _fedlc_round(sentiment, {**DP, **target}, p_fedlc)
    (s_fedlc,), (s_local,) = p_fedlc["sigmas"].values(), p_local["sigmas"].values()
    assert s_fedlc > s_local
    assert 3.0 - 0.05 <= m["dp_sample_epsilon"] <= 3.0


@pytest.mark.parametrize("policy, options, error, reason", [
    (PrivacyPolicy(min_noise_multiplier=1.0), {"prior_noise": "0.5"}, PrivacyRefusal, "label prior's noise multiplier 0.5 is below"),
    (PrivacyPolicy(max_epsilon=5.0), {"prior_noise": "0.05"}, BudgetSpent, "label prior's noise multiplier 0.05 with the task's noise"),
    # the prior passes alone, the round that would use it does not: judged together, nothing drawn
    (PrivacyPolicy(min_noise_multiplier=1.0), {"dp_noise_multiplier": "0.5"}, PrivacyRefusal, "the task's noise multiplier 0.5 is below"),
    (PrivacyPolicy(max_epsilon=float(epsilon([(PRIOR_NOISE, 1.0, 1), (1.5, 8 / 120, 2)], 1e-5) * 0.98)), {}, BudgetSpent,
     "label prior's noise multiplier 10 with the task's noise multiplier 1.5 would take"),
])
def test_a_device_policy_judges_the_label_prior_before_it_is_drawn(sentiment, policy, options, error, reason):
    """The noised label prior is a release of its own: a device's policy sees its noise and
    epsilon before it is drawn, and a refused prior leaves nothing drawn or recorded (a
    coordinator must not be able to burn a device's budget with a prior it never uses)."""
    privacy = {"policy": policy.to_dict()}
    with pytest.raises(error, match=reason):
        _fedlc_round(sentiment, {**DP, **options}, privacy)
    assert not privacy.get("label_priors") and privacy.get("history", []) == []
    if policy.max_epsilon < 5.0:
        return
    _fedlc_round(sentiment, DP, privacy)  # the default prior noise (10) and sigma 1.5 pass
    assert privacy["history"][0] == (PRIOR_NOISE, 1.0, 1)


def test_fedlc_prior_repeats_in_research_mode_only(sentiment):
    def prior(repeatable: bool, seed: int) -> list[float]:
        privacy: dict = {}
        _fedlc_round(sentiment, {**DP, "dp_repeatable": str(repeatable).lower()}, privacy, seed=seed, steps=1)
        return _prior(privacy)

    assert prior(True, 5) == prior(True, 5) != prior(True, 6)
    assert prior(False, 5) != prior(False, 5)


def test_fedlc_prior_noise_option():
    assert make_recipe({"recipe": "fedlc"}, {}).options.prior_noise == PRIOR_NOISE
    assert make_recipe({**DP, "prior_noise": "3"}, {}).options.prior_noise == 3.0
    make_recipe({"recipe": "fedlc", "prior_noise": "0"}, {})  # no DP: the option is unused
    for bad in ({**DP, "prior_noise": "0"}, {"recipe": "fedlc", "prior_noise": "-1"}):
        with pytest.raises(OptionsError, match="prior_noise"):
            make_recipe(bad, {})


# ---------------------------------------------------------------- recipes DP-SGD refuses


class _LossOnly(Recipe):
    """Changes the loss (a batch-level reduction) without giving its per-example form."""

    name = "loss-only"

    def loss(self, model, inputs, task):
        return model(**inputs).loss * 2


def test_dp_sgd_refuses_recipes_it_cannot_clip_per_example(sentiment):
    folder, task, items, pad, _ = sentiment
    dp = {"dp_clip": "1.0", "dp_noise_multiplier": "1.0"}
    settings = TrainSettings(1, 8, 1e-3, 0.0, seed=0)
    model = _lora(folder, "seq-cls")
    with pytest.raises(ValueError, match="changes the loss but gives no per-example form"):
        _LossOnly(LocalOptions(dp_clip=1.0, dp_noise_multiplier=1.0), {}, {}).train(model, task, items, settings, pad, "cpu")

    accepted = []
    for name in RECIPES.names():
        try:
            recipe = make_recipe({"recipe": name, **dp}, {}, {})
        except OptionsError:
            continue  # refused at its options (zeroth-order, split training)
        if name == "fedlc":
            recipe.begin(model, {}, items, task)  # its prior: what its loss needs
        try:
            recipe.train(model, task, items, settings, pad, "cpu")
        except ValueError as exc:
            assert "sample-level DP-SGD cannot clip" in str(exc) or "per-example form" in str(exc), (name, exc)
            continue
        accepted.append(name)
    assert sorted(accepted) == sorted(DP_RECIPES)
