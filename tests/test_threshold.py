"""experiments/threshold.py: the deciding gate's threshold learned per privacy level from held-out
shadow runs. Oracles: at 0 and at 1/2 the thresholded ungated gains are the ungated and the deciding
candidates' own (the scores the run's choice stage recorded); the rule's picks on gains built to
call for a threshold; the clients' outcomes at thresholds that send every upload its translation,
or none, are the run's own ungated map and mean update."""
import json
import os

import numpy as np
import pytest

from experiments import kd_candidate, threshold


def gains(per_weight, weights=(0.15, 0.45, 0.85), n_runs=4, spread=0.0):
    """Held-out uploads of n_runs runs, one at each gate weight, with the ungated gain per weight
    (each run's gains shifted by up to `spread`)."""
    weight = np.tile(weights, n_runs)
    runs = np.repeat(np.arange(n_runs), len(weights))
    shift = np.repeat(np.linspace(-spread, spread, n_runs), len(weights))
    ungated = np.array([per_weight[w] for w in weight]) + shift
    return ungated, weight, runs


def test_the_line_moves_only_as_far_as_the_held_out_runs_say():
    # translating the low-weight upload loses 0.3; the other two gain 0.2
    ungated, weight, runs = gains({0.15: -0.3, 0.45: 0.2, 0.85: 0.2})
    learned = threshold.learn_threshold(ungated, weight, runs, budget=0.02)
    assert learned.scores[0.1] == pytest.approx([0.1 / 3, 0.1])   # over the budget: not a pick
    assert learned.scores[0.9] == [0.0, 0.0]                       # no gain: not a pick either
    assert learned.best == 0.2            # the first of 0.2-0.4, which all send both gainers
    assert learned.cautious == 0.4        # no spread over runs: 1/2 is clearly worse
    # runs that differ a lot: 1/2 is within one standard error of the best, and kept
    ungated, weight, runs = gains({0.15: -0.3, 0.45: 0.2, 0.85: 0.2}, spread=0.5)
    learned = threshold.learn_threshold(ungated, weight, runs, budget=0.5)
    assert learned.cautious == 0.5


def test_no_threshold_when_every_translation_loses():
    ungated, weight, runs = gains({0.15: -0.3, 0.45: -0.2, 0.85: -0.1})
    learned = threshold.learn_threshold(ungated, weight, runs, budget=0.02)
    assert learned.best is None and learned.cautious is None


def test_thresholds_zero_and_one_half_are_the_ungated_and_deciding_candidates(frontier_point):
    _, run = frontier_point
    cfg = kd_candidate.run_config(run)
    scored = threshold.score_point(cfg, draws=0)   # every draw: the uploads the choice scored
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    recorded = results["provider_choice"]["1"]["scores"]
    for method in threshold.METHODS:
        for tau, candidate in ((0.0, f"{method}_ungated"), (0.5, f"{method}_hard")):
            g = threshold.gains_at(scored["ungated"][method], scored["weight"], tau)
            assert [g.mean(), np.maximum(-g, 0).mean()] == pytest.approx(
                recorded[candidate][:2], abs=1e-6), (method, tau)
        assert scored["learned"][method].scores[0.5] == pytest.approx(
            recorded[f"{method}_hard"][:2], abs=1e-6)


def test_the_clients_behind_every_threshold_and_none_are_the_runs_own(frontier_point):
    """Threshold 0 sends each client its ungated translation: the map's is the run's
    ridge_ungated; a threshold above 1 sends none: the run's mean update. What the provider sent
    (gradtx), recomputed from the run's rows, is the run's summary."""
    _, run = frontier_point
    cfg = kd_candidate.run_config(run)
    provider = kd_candidate.provider_at(cfg)
    learned = {m: threshold.Learned(0.0, 1.01, {}) for m in threshold.METHODS}
    outcomes = threshold.client_outcomes(cfg, provider, learned)
    with open(os.path.join(run, "results.json")) as f:
        summary = json.load(f)["summary"]
    skewed = summary["by_kind"]["skewed"]["gain_of_means"]
    worst = summary["worst_vs_mean_shadow"]
    for label, method in (("gradtx", "gradtx"), ("ridge@best", "ridge_ungated"),
                          ("ridge@cautious", "mean_shadow"),
                          ("translator@cautious", "mean_shadow")):
        assert outcomes[label] == pytest.approx([skewed[method], worst[method]], abs=1e-9), label


def test_the_experiment_writes_its_table(frontier_point):
    out, run = frontier_point
    threshold.main([f"--out={out}"])
    with open(os.path.join(out, "threshold.json")) as f:
        row, = json.load(f)["rows"]
    assert set(row["thresholds"]) == set(threshold.METHODS)
    assert set(row["clients"]) == {"gradtx"} | {f"{m}@{w}" for m in threshold.METHODS
                                                for w in ("best", "cautious")}
    assert os.path.exists(os.path.join(out, "threshold.md"))
