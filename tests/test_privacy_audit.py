"""The one-run privacy audit (fedtune.privacy.audit): the bound on plain numbers, then fedtune's
real DP mechanisms at both levels, correct ones below their epsilon and broken ones caught.

Every random draw is seeded (the auditor's coins, honest data, and the mechanism's draws in the
broken runs) except the correct mechanisms' own secret noise and sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.privacy import audit as A

BETA = 0.05


# ---------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("r", [5, 10, 64, 500])
def test_all_correct_without_delta_is_the_closed_form(r):
    p = BETA ** (1 / r)  # p^r = beta
    want = math.log(p / (1 - p))
    assert A.epsilon_lower_bound(r, r, r, 0.0, BETA) == pytest.approx(want, abs=1e-6)
    assert A.all_correct_bound(r, BETA) == pytest.approx(want, rel=1e-12)


def test_too_few_guesses_bound_nothing():
    # 4 right out of 4 happen with probability 1/16 > beta even at eps = 0
    assert A.epsilon_lower_bound(4, 4, 4, 0.0, BETA) == 0.0 == A.all_correct_bound(4, BETA)
    assert A.epsilon_lower_bound(10, 0, 0, 1e-5, BETA) == 0.0


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_half_correct_gives_zero(r):
    assert A.epsilon_lower_bound(r, r, r // 2, 0.0, BETA) == 0.0
    assert A.epsilon_lower_bound(2 * r, r, r // 2, 1e-5, BETA) == 0.0
    assert A.epsilon_lower_bound(r, r, 0, 0.0, BETA) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_bound_grows_with_correct_guesses_and_never_exceeds_the_max_for_m(delta):
    m = 200
    cap = A.all_correct_bound(m, BETA)
    for r in (20, 100, 200):
        bounds = [A.epsilon_lower_bound(m, r, v, delta, BETA) for v in range(r // 2, r + 1)]
        assert all(b2 >= b1 - 1e-9 for b1, b2 in zip(bounds, bounds[1:]))
        assert bounds[-1] > 0 and max(bounds) <= cap + 1e-9
    assert A.epsilon_lower_bound(m, m, m, 0.0, BETA) == pytest.approx(cap, abs=1e-6)  # reached by all m right


def test_delta_only_lowers_the_bound():
    for v in (70, 85, 100):
        without = A.epsilon_lower_bound(1000, 100, v, 0.0, BETA)
        assert A.epsilon_lower_bound(1000, 100, v, 1e-4, BETA) <= without
        assert A.p_value(1000, 100, v, 1.0, 1e-4) >= A.p_value(1000, 100, v, 1.0, 0.0)
    # with delta the bound of the paper's appendix: the binomial tail plus 2 m delta alpha
    p = 1 / (1 + math.exp(-1.0))
    tail = sum(math.comb(20, k) * p**k * (1 - p) ** (20 - k) for k in range(18, 21))
    pmf = [math.comb(20, 18 - i) * p ** (18 - i) * (1 - p) ** (2 + i) for i in range(1, 19)]
    alpha = max(sum(pmf[:i]) / i for i in range(1, 19))
    assert A.p_value(50, 20, 18, 1.0, 1e-3) == pytest.approx(tail + 2 * 50 * 1e-3 * alpha, rel=1e-9)


def test_the_exact_fallback_agrees_with_scipy():
    ks = np.arange(0, 301)
    from scipy.stats import binom

    for p in (0.5, 0.731, 0.99):
        np.testing.assert_allclose(A._binom_pmf_exact(ks, 300, p), binom.pmf(ks, 300, p), rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("eps", [0.5, 2.0, 4.0])
def test_the_test_has_its_level_on_randomized_response(eps):
    """eps-DP randomized response answers each of m canaries right with probability e^eps /
    (1 + e^eps), the worst case of the theorem: v ~ Binomial(m, p). The probability that the
    bound exceeds eps, summed exactly over v, is at most beta."""
    from scipy.stats import binom

    m = 300
    p = 1 / (1 + math.exp(-eps))
    exceed = sum(binom.pmf(v, m, p) for v in range(m + 1) if A.epsilon_lower_bound(m, m, v, 0.0, BETA) > eps)
    assert exceed <= BETA
    assert exceed > BETA / 10  # and it is not vacuous: this mechanism is as leaky as eps-DP allows


def test_guesses_take_the_ends_and_break_ties_by_the_given_order():
    scores = np.array([0.0, 5.0, 0.0, -3.0, 2.0, 0.0])
    g = A.guesses(scores, 2, 1)
    assert g.tolist() == [0, 1, 0, -1, 1, 0]
    ties = A.guesses(np.zeros(4), 1, 1, tiebreak=np.array([3, 0, 2, 1]))
    assert ties.tolist() == [1, -1, 0, 0]  # lowest key out, highest key in
    with pytest.raises(ValueError):
        A.guesses(scores, 4, 3)


def test_the_grid_is_fixed_by_m_and_split_by_bonferroni():
    counts = A.guess_counts(1000)
    assert (10, 0) in counts and (400, 400) in counts and all(k1 + k2 <= 1000 for k1, k2 in counts)
    included = np.arange(1000) % 2 == 0
    perfect = np.where(included, 1.0, -1.0)
    b = A.best_bound(perfect, included, 0.0, BETA)
    assert (b.guesses, b.correct, b.tests) == (800, 800, len(counts))
    assert b.epsilon == pytest.approx(A.all_correct_bound(800, BETA / len(counts)), abs=1e-6)
    assert b.epsilon < A.bound_cap(1000, BETA)


def test_the_auditor_records_its_coins():
    coins = A.draw_coins(100, seed=12345)
    again = A.draw_coins(100, seed=12345)
    assert np.array_equal(coins.included, again.included) and coins.seed == 12345
    decoded = np.unpackbits(np.frombuffer(bytes.fromhex(coins.hex), dtype=np.uint8))[:100].astype(bool)
    assert np.array_equal(decoded, coins.included)
    assert 0 < coins.included.sum() < 100
    assert A.draw_coins(100).seed != A.draw_coins(100).seed  # without a seed: a fresh secret


# ---------------------------------------------------------------------------- fedtune's mechanisms

# 200 canaries: all guessed right, the bound reaches about 3.4, so a broken mechanism
# reporting epsilon 1 is caught with a wide margin.
SETTINGS = A.AuditSettings(canaries=200, sample_honest=32, client_honest=20, client_rate=0.25)
EPSILON = 1.0


@pytest.mark.parametrize("level", A.LEVELS)
def test_a_correct_mechanism_stays_at_or_below_its_epsilon(level):
    result = A.audit(level, EPSILON, "correct", SETTINGS, seed=101)
    assert not result.repeatable  # the mechanism's own secrets
    assert result.epsilon_reported == pytest.approx(EPSILON, abs=0.02)
    assert result.epsilon_reported <= EPSILON
    assert result.epsilon_lower_bound <= result.epsilon_reported and result.held
    assert result.epsilon_cap > 2 * result.epsilon_reported  # the audit could have shown more
    assert result.guesses > 0 and result.canaries == 200


@pytest.mark.parametrize("level", A.LEVELS)
def test_noise_off_is_caught(level):
    result = A.audit(level, EPSILON, "noise-off", SETTINGS, seed=202, repeatable=True)
    assert result.noise_multiplier > 1 and result.noise_multiplier_used == 0
    # client level: only "in" guesses tell (an unselected canary looks like an absent one)
    assert result.epsilon_lower_bound > result.epsilon_reported + 0.5 and result.held
    assert result.correct == result.guesses


@pytest.mark.parametrize("level", A.LEVELS)
def test_a_known_seed_is_caught(level):
    result = A.audit(level, EPSILON, "known-seed", SETTINGS, seed=303)
    assert result.repeatable and result.noise_multiplier_used == result.noise_multiplier > 1
    assert result.epsilon_lower_bound > result.epsilon_reported + 1 and result.held
    assert result.correct == result.guesses


def test_rows_and_report():
    rows = A.standard_rows()
    names = [r[0] for r in rows]
    for want in ("sample-eps1", "sample-eps4", "sample-eps8", "client-eps1", "client-eps4", "client-eps8", "broken-noise-off", "broken-known-seed"):
        assert want in names
    result = A.audit("sample", 2.0, "noise-off", A.AuditSettings(canaries=50, sample_honest=8, steps=5), seed=1, name="x", repeatable=True)
    out = A.report([result], A.AuditSettings(canaries=50), seed=1)
    row = out["rows"][0]
    for key in ("name", "epsilon_reported", "epsilon_lower_bound", "canaries", "guesses", "correct", "held", "auditor_seed", "coins_hex"):
        assert key in row
    assert "x" in A.format_table([result])
    with pytest.raises(ValueError):
        A.audit("sample", 1.0, "known-seed", SETTINGS, repeatable=False)


def test_the_cli_prints_the_table_and_writes_the_rows(tmp_path, capsys):
    import json

    from fedtune.cli import main

    out = tmp_path / "audit.json"
    code = main(["privacy-audit", "--level", "sample", "--epsilon", "2", "--canaries", "60", "--seed", "7", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["sample-eps2", "broken-noise-off", "broken-known-seed"]
    assert code == (0 if all(r["held"] for r in data["rows"]) else 1)
    assert data["seed"] == 7 and data["confidence"] == pytest.approx(0.95)
    printed = capsys.readouterr().out
    assert "broken-known-seed" in printed and "eps lower bound" in printed
    assert main(["privacy-audit", "--canaries", "1"]) == 2
