"""Tests for the one-run privacy audit: the bound (against a brute-force binomial tail, the
closed form for all-right guesses, the paper's delta term summed term by term) and experiments/audit.py's
gradient canaries, which must catch a DP-SGD with its noise switched off and pass a correct one.

Run:  python -m pytest tests/test_audit.py -q
"""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import data
import dp
from config.presets import MODEL_PRESETS
import tinylm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from experiments import audit  # noqa: E402


# -----------------------------------------------------------------------------
# the bound


def brute_force_tail(r, v, eps):
    """P[at least v of r independent guesses right], each right with p = e^eps / (1 + e^eps): a sum
    over all 2^r outcomes, not a binomial formula."""
    p = math.exp(eps) / (1 + math.exp(eps))
    return sum(math.prod(p if right else 1 - p for right in outcome)
               for outcome in itertools.product((True, False), repeat=r) if sum(outcome) >= v)


@pytest.mark.parametrize("r,v,eps", [(1, 1, 0.0), (6, 4, 0.5), (8, 8, 2.0), (10, 3, 1.0), (10, 0, 3.0)])
def test_pure_dp_p_value_is_the_binomial_tail(r, v, eps):
    assert audit.audit_p_value(r, v, eps) == pytest.approx(brute_force_tail(r, v, eps), rel=1e-9)


def test_delta_term_follows_the_paper_term_by_term():
    r, v, eps, delta, m = 30, 24, 1.0, 1e-3, 60
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, i) * p**i * (1 - p)**(r - i) for i in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    assert audit.audit_p_value(r, v, eps, delta, m) == pytest.approx(beta + 2 * m * delta * alpha, rel=1e-9)
    # delta > 0 can only weaken the bound
    assert audit.epsilon_lower_bound(r, v, 0.95, delta, m) < audit.epsilon_lower_bound(r, v, 0.95)


@pytest.mark.parametrize("r,confidence", [(20, 0.95), (200, 0.99), (1000, 0.95)])
def test_all_right_gives_the_closed_form(r, confidence):
    p = (1 - confidence) ** (1 / r)   # p^r = 1 - confidence: the largest p this outcome refutes
    assert audit.epsilon_lower_bound(r, r, confidence) == pytest.approx(math.log(p / (1 - p)), rel=1e-8)


def test_bound_grows_with_the_right_guesses_and_is_zero_at_chance():
    bounds = [audit.epsilon_lower_bound(100, v) for v in range(101)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[50] == bounds[58] == 0.0 and bounds[70] > 0   # 58 of 100: p-value ~0.067 at eps = 0
    # at the bound itself the p-value is 5%: eps_lb is refuted, a little more is not
    assert audit.audit_p_value(100, 80, bounds[80]) == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize("call,name", [
    (lambda: audit.audit_p_value(-1, 0, 1.0), "guesses"),
    (lambda: audit.audit_p_value(5, 6, 1.0), "correct"),
    (lambda: audit.audit_p_value(5, 3, -1.0), "epsilon"),
    (lambda: audit.audit_p_value(5, 3, 1.0, 1.5), "delta"),
    (lambda: audit.audit_p_value(5, 3, 1.0, 1e-5), "canaries"),
    (lambda: audit.epsilon_lower_bound(5, 3, confidence=1.0), "confidence"),
    (lambda: audit.one_run_audit(np.zeros(10), np.ones(10, bool), ks=(6,)), "ks"),
    (lambda: audit.one_run_audit(np.zeros(10), np.ones(9, bool)), "scores"),
])
def test_invalid_arguments_name_themselves(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_one_run_audit_perfect_scores_reach_the_maximum_and_noise_does_not():
    rng = np.random.default_rng(0)
    included = rng.permutation(1000) < 500   # exactly half in: all 1000 guesses can be right
    perfect = audit.one_run_audit(included + 0.1 * rng.random(1000), included, delta=1e-5)
    assert perfect["eps_lb"] == perfect["eps_lb_max"] and perfect["k"] == 500
    assert perfect["correct"] == perfect["guesses"] == 1000
    blind = audit.one_run_audit(rng.random(1000), included, delta=1e-5)   # scores that know nothing
    assert blind["eps_lb"] < 0.5


# -----------------------------------------------------------------------------
# the audit catches a broken DP-SGD and passes a correct one (toy size)

STEPS, RATE, CLIP, M, KS = 40, 0.0625, 1.0, 200, (10, 20, 50, 100)


def toy_audit(noise_multiplier):
    """A micro TinyLM (random base) fine-tuned on 64 arith lines plus M gradient canaries, half of
    them in; the audit's eps_lb from the final update alone."""
    torch.manual_seed(0)
    cfg = tinylm.GPTConfig(**{**MODEL_PRESETS["micro"].__dict__, "vocab_size": 257})
    model = tinylm.add_lora(tinylm.GPT(cfg), rank=4, alpha=8.0)
    lines = data.lines_from(data.PAIRS, data.TASK_MIXTURE, 64, np.random.default_rng(0))
    x, y, mask = data.encode_lines(lines, data.get_tokenizer())
    included = np.random.default_rng(1).random(M) < 0.5
    directions = audit.random_directions(M, tinylm.update_shape(cfg, 4), seed=2)
    recipe = tinylm.Recipe(steps=STEPS, lr=3e-3, dp_sigma=noise_multiplier, dp_clip=CLIP, dp_sample_rate=RATE)
    update = audit.canary_finetune(model, x, y, mask, recipe, seed=3, expected_batch=RATE * (64 + M / 2),
                                   directions=directions[torch.from_numpy(included)])
    scores = -(directions @ update.flatten()).numpy()
    return audit.one_run_audit(scores, included, KS, 0.95, 1e-5)


def test_audit_catches_broken_dp_sgd_without_noise():
    claimed = dp.noise_multiplier_for(1.0, RATE, STEPS, 1e-5)   # what the accountant says buys eps = 1
    assert claimed > 0.5
    broken = toy_audit(noise_multiplier=0.0)                    # ... but the noise is switched off
    assert broken["eps_lb"] > 1.0, broken


def test_audit_passes_correct_dp_sgd_at_the_same_size():
    correct = toy_audit(noise_multiplier=dp.noise_multiplier_for(1.0, RATE, STEPS, 1e-5))
    assert correct["eps_lb"] <= 1.0, correct


# -----------------------------------------------------------------------------
# the audit_bound exercise (EXERCISES.md: audit_p_value and epsilon_lower_bound): the bound's own
# tests above are its oracles, and one more for thousands of guesses

test_pure_dp_p_value_is_the_binomial_tail = pytest.mark.audit_bound(test_pure_dp_p_value_is_the_binomial_tail)
test_delta_term_follows_the_paper_term_by_term = pytest.mark.audit_bound(test_delta_term_follows_the_paper_term_by_term)
test_all_right_gives_the_closed_form = pytest.mark.audit_bound(test_all_right_gives_the_closed_form)
test_bound_grows_with_the_right_guesses_and_is_zero_at_chance = pytest.mark.audit_bound(
    test_bound_grows_with_the_right_guesses_and_is_zero_at_chance)


@pytest.mark.audit_bound
def test_thousands_of_guesses_against_an_exact_binomial_tail():
    # eps = log 3 makes p = 3/4, so the tail is a sum of fractions: exact, with no float in it.
    # r = 3000 guesses: binom(3000, 1500) ~ 10^901 overflows a float, so only a sum in log space works
    from fractions import Fraction
    r, v = 3000, 2280                       # mean 2250, standard deviation ~24
    exact = sum(Fraction(math.comb(r, i) * 3**i, 4**r) for i in range(v, r + 1))
    assert audit.audit_p_value(r, v, math.log(3)) == pytest.approx(float(exact), rel=1e-9)
    assert 0.05 < float(exact) < 0.2        # a tail that matters, not a rounding of 0 or 1
    p = 0.05 ** (1 / 2000)                  # and all 2000 of 2000 right: the closed form
    assert audit.epsilon_lower_bound(2000, 2000) == pytest.approx(math.log(p / (1 - p)), rel=1e-8)


def test_the_audit_command_runs_end_to_end_at_smoke_size(tmp_path):
    # every setting kind once (no DP, DP-SGD, output perturbation), both canary kinds, the leak table
    rows, leak = audit.main([f"--out={tmp_path}", "--preset=smoke", "--canaries=40", "--ks=5,10",
                             "--epsilons=0,1", "--output_epsilons=8", "--leak_clients=1", "--leak_epsilons=0",
                             "--leak_prompts=8"])
    assert [(r["mechanism"], r["canaries"]) for r in rows] == [
        (None, "gradient"), (None, "input"), ("sgd", "gradient"), ("sgd", "input"), ("output", "gradient"),
        ("output", "input")]
    assert all(0.0 <= r["auc"] <= 1.0 and r["eps_lb"] >= 0.0 for r in rows)
    assert rows[2]["sigma"] > 0 and rows[0]["sigma"] == 0.0
    assert json.load(open(tmp_path / "audit.json")) == json.loads(json.dumps(rows)) and len(leak) == 1
