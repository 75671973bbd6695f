"""End to end: the whole protocol at a tiny size, the results contract, resuming, the CLI, PGR."""
import json
import math
import os

import pytest
import torch

import eval as evaluation
import train

TINY_RUN = ["--preset=smoke", "--tiny_model=micro", "--llm_model=micro", "--pretrain_steps_tiny=20",
            "--pretrain_steps_llm=20", "--ft_steps=6", "--n_train=48", "--n_shadow=6",
            "--n_snapshots=2", "--snapshot_gap=2", "--gt_steps=4", "--gt_eval_every=2",
            "--n_test=24", "--threads=1", "--workers=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    results = train.main(TINY_RUN + [f"--out={out}"])
    return out, results


def test_results_contract(finished_run):
    out, results = finished_run
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    for key in ("task", "metric", "higher_is_better", "config", "clients", "summary", "privacy", "timing_s"):
        assert key in saved
    assert saved["task"] == "arith" and saved["metric"] == "accuracy" and saved["higher_is_better"] is True
    assert saved["config"]["n_shadow"] == 6
    assert [c["kind"] for c in saved["clients"]] == ["skewed"] * 4 + ["iid"]
    for c in saved["clients"]:
        assert set(evaluation.METHODS) <= set(c["scores"])
        for m, v in c["scores"].items():
            assert 0.0 <= v <= 1.0 and math.isfinite(v), (c["name"], m, v)
        assert set(c["pgr"]) == set(c["scores"]) == set(c["gain_recovered"])
        floor, ceiling = c["scores"]["tinylm_ft"], c["scores"]["llm_ft"]
        assert c["pgr"]["gradtx"] == evaluation.pgr(c["scores"]["gradtx"], floor, ceiling)
    assert set(saved["summary"]["pgr"]) == set(saved["clients"][0]["pgr"])
    assert saved["privacy"]["epsilon"] is None and saved["privacy"]["delta"] == 1e-5
    for stage in ("pretrain", "shadow", "fit", "clients", "eval", "total"):
        assert saved["timing_s"][stage] >= 0


def test_rerun_reuses_every_finished_stage(finished_run, monkeypatch):
    out, first = finished_run
    fail = lambda *a, **k: pytest.fail("a finished stage was recomputed")
    monkeypatch.setattr(train, "pretrain", fail)
    monkeypatch.setattr(train.gradtx, "fit", fail)
    monkeypatch.setattr(train.data, "client_mixtures", fail)
    calls = []
    real_finetune = train.finetune
    monkeypatch.setattr(train, "finetune", lambda *a, **k: calls.append(1) or real_finetune(*a, **k))
    again = evaluation.rescore(out)   # python eval.py --out=DIR: the saved config, every stage cached
    # eval's baselines fine-tune the LLM (public_llm + 4 per client); the shadow stage would add 12
    assert len(calls) == 1 + 4 * len(again["clients"])
    assert again["clients"] == first["clients"]   # same cached stages -> the very same scores


def test_interrupted_shadow_curation_resumes_to_the_same_pairs(tmp_path, monkeypatch):
    cfg = train.parse_args(TINY_RUN + [f"--out={tmp_path}", "--n_shadow=9"])
    tiny, llm = train.base_models(cfg, "cpu")
    full = train.shadow_stage(train.parse_args(TINY_RUN + [f"--out={tmp_path}/full", "--n_shadow=9"]),
                              tiny, llm, "cpu")
    real_finetune, calls = train.finetune, []

    def dies_after_8_runs(*a, **k):
        if len(calls) == 2 * 8 + 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real_finetune(*a, **k)

    monkeypatch.setattr(train, "finetune", dies_after_8_runs)
    with pytest.raises(KeyboardInterrupt):
        train.shadow_stage(cfg, tiny, llm, "cpu")
    monkeypatch.setattr(train, "finetune", real_finetune)
    partial = train.stage_path(cfg, "shadow").replace(".pt", ".partial.pt")
    assert len(torch.load(partial, weights_only=True)["X"]) == 8      # 8 runs were saved
    resumed = train.shadow_stage(cfg, tiny, llm, "cpu")
    assert torch.equal(resumed["X"], full["X"]) and torch.equal(resumed["Y"], full["Y"])
    assert not os.path.exists(partial)


def test_worker_processes_give_the_same_pairs_as_one_process(tmp_path):
    one = train.parse_args(TINY_RUN + [f"--out={tmp_path}", "--n_shadow=3"])
    two = train.parse_args(TINY_RUN + [f"--out={tmp_path}", "--n_shadow=3", "--workers=2"])
    tiny, llm = train.base_models(one, "cpu")
    runs = [list(train.worker_map(cfg, train.shadow_run, range(3), "cpu", tiny, llm)) for cfg in (one, two)]
    for (x1, y1), (x2, y2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit, match="unknown option --nope"):
        train.parse_args(["--nope=1"])
    with pytest.raises(SystemExit, match="unknown preset"):
        train.parse_args(["--preset=huge"])
    with pytest.raises(SystemExit, match="expected a int"):
        train.parse_args(["--n_shadow=many"])
    with pytest.raises(SystemExit, match="expected --key=value"):
        train.parse_args(["n_shadow=3"])
    cfg = train.parse_args(["--preset", "smoke", "--seed=3", "--gt_normalize=false"])
    assert (cfg.preset, cfg.seed, cfg.gt_normalize, cfg.n_shadow) == ("smoke", 3, False, 8)


def test_pgr_and_gain_on_hand_made_numbers():
    assert evaluation.pgr(0.5, 0.4, 0.6) == pytest.approx(0.5)
    assert evaluation.pgr(0.7, 0.4, 0.6) == pytest.approx(1.5)      # not clipped above 1
    assert evaluation.pgr(0.3, 0.4, 0.6) == pytest.approx(-0.5)     # nor below 0
    assert evaluation.pgr(0.6, 0.4, 0.6) == pytest.approx(1.0)
    assert evaluation.pgr(0.5, 0.4, 0.4) is None                    # zero gap: undefined
    assert evaluation.pgr(0.5, 0.6, 0.4) == pytest.approx(0.5)      # a negative gap is still a ratio
    assert evaluation.mean_defined([0.5, None, 1.0]) == pytest.approx(0.75)
    assert evaluation.mean_defined([None]) is None
