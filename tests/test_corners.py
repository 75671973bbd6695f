"""experiments/corners.py: the provider's choice scored on held-out runs that cover every
convention. Oracles: an extra run's DP draws for a curated subset are the shadow stage's own; with
no extra run the choice and the clients under it are the run's recorded ones; the extra runs are
fresh subsets that fill exactly the conventions short of runs."""
import json
import os

import pytest
import torch

from experiments import corners, kd_candidate


@pytest.fixture(scope="module")
def point(frontier_point):
    _, run = frontier_point
    cfg = kd_candidate.run_config(run)
    return cfg, kd_candidate.provider_at(cfg)


def test_extra_runs_are_fresh_subsets_that_fill_the_short_conventions(point):
    cfg, provider = point
    held_out = [0, 1]
    before = corners.runs_per_convention(cfg, provider.task, held_out)
    extra = corners.extra_runs(cfg, provider.task, held_out, per_convention=2)
    assert all(k >= cfg.n_shadow for k in extra)               # no map or translator saw them
    after = corners.runs_per_convention(cfg, provider.task, held_out + extra)
    assert (after >= 2).all()
    assert (after == before.clip(min=2)).all()                  # nothing past what was short
    assert corners.extra_runs(cfg, provider.task, held_out, per_convention=0) == []


def test_an_extra_runs_draws_are_made_as_the_shadow_stage_makes_them(point):
    cfg, provider = point
    again = corners.extra_uploads(cfg, provider, [0, 2])      # curated subsets, made again
    torch.testing.assert_close(again, provider.shadow["X_private"][[0, 2]].to(again.dtype),
                               rtol=1e-5, atol=1e-7)


def test_without_extra_runs_the_choice_and_its_clients_are_the_runs(point, frontier_point):
    cfg, provider = point
    _, run = frontier_point
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    recorded = results["provider_choice"]["1"]
    own = corners.choice_on(cfg, provider, corners.held_out_with(cfg, provider, [], None))
    assert own.candidate == recorded["candidate"]
    for c, score in own.scores.items():
        assert score[:2] == pytest.approx(recorded["scores"][c][:2], abs=1e-6)
    summary = results["summary"]
    for candidate in (own.candidate, "ridge_ungated"):
        method = "gradtx" if candidate == own.candidate else candidate
        assert corners.client_outcome(cfg, provider, candidate) == pytest.approx(
            [summary["by_kind"]["skewed"]["gain_of_means"][method],
             summary["worst_vs_mean_shadow"][method]], abs=1e-9)


def test_the_experiment_writes_its_table(frontier_point):
    out, _ = frontier_point
    corners.main([f"--out={out}", "--per_convention=2"])
    with open(os.path.join(out, "corners.json")) as f:
        row, = json.load(f)["rows"]
    assert min(row["after"]) >= 2 and set(row["clients"]) == {"own", "wider"}
    assert os.path.exists(os.path.join(out, "corners.md"))
