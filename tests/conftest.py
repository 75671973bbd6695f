"""Shared test fixtures: the repository on sys.path, one torch thread, a toy-sized run; and the
exercises' rule: a test that needs another exercise's blank code skips instead of failing."""
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradtx  # noqa: E402  (the repository, just put on the path)
import train  # noqa: E402

# every stage of the protocol at a toy size: seconds, not minutes (the numbers mean nothing); on the
# CPU even where there is a GPU (tests/test_cuda.py runs it there)
TINY_RUN = ["--preset=smoke", "--device=cpu", "--tiny_model=micro", "--llm_model=micro", "--pretrain_steps_tiny=20",
            "--pretrain_steps_llm=20", "--ft_steps=6", "--n_train=48", "--n_shadow=6",
            "--n_snapshots=2", "--snapshot_gap=2", "--gt_steps=4", "--gt_eval_every=2",
            "--n_test=24", "--threads=1", "--workers=1", "--random_clients=2",
            "--answer_null_runs=8"]


@pytest.fixture(scope="session")
def frontier_point(tmp_path_factory):
    """A finished toy DP run of single uploads, in a frontier-like folder: (the folder, the run),
    for the experiments that score a finished frontier's points."""
    out = tmp_path_factory.mktemp("frontier")
    run = os.path.join(out, "n48_eps1_sgd")
    train.main(TINY_RUN + [f"--out={run}", "--dp_epsilon=1", "--shadow_dp_draws=2"])
    return str(out), run


def scored_as_the_run(experiment, stem, frontier_point):
    """Run a frontier experiment (experiments/kd_candidate.py, shrinkage.py) on the toy point with
    every DP draw scored, as the choice; check the oracle both share (every candidate's held-out
    scores and the choice are those the run's own choice stage recorded: the same uploads,
    held-out records and mean update) and that it wrote <stem>.md. (its row, the run's
    results.json)."""
    out, run = frontier_point
    experiment.main([f"--out={out}"])
    with open(os.path.join(out, f"{stem}.json")) as f:
        row, = json.load(f)["rows"]
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    recorded = results["provider_choice"]["1"]
    assert row["chosen"] == recorded["candidate"]
    for c in gradtx.CANDIDATES:
        assert row["scores"][c] == pytest.approx(recorded["scores"][c][:2], abs=1e-6)
    assert os.path.exists(os.path.join(out, f"{stem}.md"))
    return row, results


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # these models are tiny: on a busy 2-core machine, intra-op threads only fight each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# exercises (EXERCISES.md): in a student copy an exercise's code raises
# NotImplementedError("exercise <name>: ..."). A test marked with that exercise fails on it, as it
# should; any other test that runs into it is skipped with "needs exercise <name>", so the
# exercises can be done in any order and the rest of the suite stays green meanwhile.


def blank_exercise(exc):
    """The exercise whose blank code raised `exc` (or an exception behind it), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:   # (a chain can loop back on itself)
        seen.add(id(exc))
        found = re.match(r"exercise (\w+):", str(exc)) if isinstance(exc, NotImplementedError) else None
        if found:
            return found.group(1)
        exc = exc.__cause__ or exc.__context__
    return None


def skip_if_another_exercise_is_blank(item):
    try:
        return (yield)
    except Exception as e:
        name = blank_exercise(e)
        if name is None or item.get_closest_marker(name):
            raise
        pytest.skip(f"needs exercise {name}")


# fixtures run in the setup phase, the test itself in the call phase: both may reach blank code
pytest_runtest_setup = pytest.hookimpl(wrapper=True)(skip_if_another_exercise_is_blank)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(skip_if_another_exercise_is_blank)
