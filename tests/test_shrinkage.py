"""experiments/shrinkage.py: each public direction shrunk by its signal-to-noise, scored on held-out
shadow runs as the provider's choice scores its candidates. Oracles: the Wiener estimate's limits
and its action off its directions; its statistics on the gate's directions are the gate's own;
with every DP draw scored, the six candidates' gains are the ones the run's choice stage
recorded, and the clients' summary recomputed from the run's rows is the run's."""
import numpy as np
import pytest
import torch

import gradtx
from conftest import scored_as_the_run
from experiments import kd_candidate, shrinkage


def statistics(k=3, D=10, signal=1.0, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, k, generator=g)).Q                   # orthonormal (D, k)
    return {"mean": torch.randn(D, generator=g), "U": U, "center": torch.randn(k, generator=g),
            "signal_var": torch.full((k,), signal), "noise_var": torch.full((k,), noise)}


def coordinates(stats, X):
    return (X.flatten(1) - stats["mean"]) @ stats["U"]


def test_shrink_keeps_each_direction_in_the_share_the_noise_leaves_of_it():
    stats = statistics(signal=3.0, noise=1.0)
    stats["noise_var"] = torch.tensor([1.0, 3.0, 1e-12])   # kept: 3/4, 1/2, all
    X = torch.randn(5, 2, 5, generator=torch.Generator().manual_seed(1))
    shrunk = shrinkage.shrink(stats, X)
    before = coordinates(stats, X) - stats["center"]
    after = coordinates(stats, shrunk) - stats["center"]
    torch.testing.assert_close(after, before * torch.tensor([0.75, 0.5, 1.0]), atol=1e-5, rtol=0)
    off = torch.eye(10) - stats["U"] @ stats["U"].T   # what lies off the directions: unchanged
    torch.testing.assert_close(shrunk.flatten(1) @ off, X.flatten(1) @ off, atol=1e-5, rtol=0)


def test_shrink_is_the_upload_without_noise_and_the_centre_without_signal():
    X = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    clean = statistics(signal=1.0, noise=1e-12)
    torch.testing.assert_close(shrinkage.shrink(clean, X), X, atol=1e-5, rtol=0)
    pure_noise = statistics(signal=1e-12, noise=1.0)
    centred = coordinates(pure_noise, shrinkage.shrink(pure_noise, X))
    torch.testing.assert_close(centred, pure_noise["center"].expand(4, -1), atol=1e-5, rtol=0)


def test_the_statistics_on_the_gates_directions_are_the_gates(frontier_point):
    """The same train runs' noisy inputs and noise draws as the fit's gate: on the gate's own
    directions, the shrinkage's statistics are the gate's buffers."""
    _, run = frontier_point
    cfg = kd_candidate.run_config(run)
    provider = kd_candidate.provider_at(cfg)
    provider.log["basis"] = None   # the map reads the raw upload: the gate's directions
    stats = shrinkage.shrinkage_statistics(cfg, provider)
    for name in ("center", "signal_var", "noise_var"):
        torch.testing.assert_close(stats[name], provider.model.gate[name], rtol=1e-5, atol=1e-7)


def test_shrinkage_scores_the_choice_as_the_run_did(frontier_point):
    row, results = scored_as_the_run(shrinkage, "shrinkage", frontier_point)
    assert set(row["scores"]) == set(gradtx.CANDIDATES) | set(shrinkage.SHRUNK)
    assert all(0 < k <= 1 for k in row["kept"])
    summary = results["summary"]
    skewed, worst = row["clients"]["gradtx"]   # recomputed from the run's rows: the run's summary
    assert skewed == pytest.approx(summary["by_kind"]["skewed"]["gain_of_means"]["gradtx"])
    assert worst == pytest.approx(summary["worst_vs_mean_shadow"]["gradtx"])
    assert set(row["clients"]) == {"gradtx"} | set(shrinkage.SHRUNK)


def test_the_hard_shrunk_candidates_are_the_shrunk_ones_where_the_gate_reads_the_upload(
        frontier_point):
    _, run = frontier_point
    cfg = kd_candidate.run_config(run)
    scored = shrinkage.score_point(cfg, draws=2)
    gains, weight = scored["gains"], scored["weight"]
    for method in ("ridge", "translator"):
        expected = np.where(weight >= 0.5, gains[f"{method}_shrunk"], 0.0)   # the mean gains 0
        np.testing.assert_allclose(gains[f"{method}_shrunk_hard"], expected, atol=1e-9)
