"""experiments/kd_candidate.py: kd scored on held-out shadow runs as the provider's choice scores
its candidates. The oracle: with every DP draw scored, the six candidates' gains are the ones the
run's own choice stage recorded, so the choice without kd is the run's."""
import json

import numpy as np
import pytest

from conftest import scored_as_the_run
from experiments import kd_candidate
import gradtx


def test_kd_candidate_scores_the_choice_as_the_run_did(frontier_point):
    row, _ = scored_as_the_run(kd_candidate, "kd_candidate", frontier_point)
    assert set(row["scores"]) == set(gradtx.CANDIDATES) | {"kd", "kd_hard"}


def test_kd_hard_is_kd_where_the_gate_reads_the_upload_else_the_mean_update(frontier_point):
    _, run = frontier_point
    cfg = kd_candidate.run_config(run)
    scored = kd_candidate.score_point(cfg, draws=2)
    gains, weight = scored["gains"], scored["weight"]
    expected = np.where(weight >= 0.5, gains["kd"], 0.0)   # the mean update gains 0 on itself
    np.testing.assert_allclose(gains["kd_hard"], expected, atol=1e-9)


def test_a_run_with_groups_is_refused(tmp_path):
    folder = tmp_path / "n48_eps1_sgd_m2"
    folder.mkdir()
    config = {"dp_epsilon": 1.0, "group_size": 2}
    (folder / "results.json").write_text(json.dumps({"config": config}))
    with pytest.raises(SystemExit, match="single uploads"):
        kd_candidate.run_config(str(folder))


def test_a_point_whose_stages_are_not_cached_is_refused(frontier_point, tmp_path):
    _, run = frontier_point
    cfg = kd_candidate.run_config(run)
    elsewhere = kd_candidate.replace(cfg, out=str(tmp_path), cache=str(tmp_path))
    with pytest.raises(SystemExit, match="not in the cache"):
        kd_candidate.score_point(elsewhere, draws=1)
