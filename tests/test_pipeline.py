"""End to end: the protocol at a toy size (plain, DP, groups), the results contract, the stage
cache (resuming, keys that cannot go stale), worker processes, the CLI, PGR on hand-made numbers."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN

import data
import dp
import eval as evaluation
import gradtx
import tinylm
import train
from config import pool, stages
from config.presets import MODEL_PRESETS
from experiments import sweep


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    return out, train.main(TINY_RUN + [f"--out={out}"])


@pytest.fixture(scope="module")
def dp_group_run(tmp_path_factory):
    """DP-SGD clients in convention groups of 2, at toy size."""
    out = str(tmp_path_factory.mktemp("dp"))
    return out, train.main(TINY_RUN + [f"--out={out}", "--dp_epsilon=1", "--group_size=2", "--shadow_dp_draws=2"])


def test_results_contract(finished_run):
    out, results = finished_run
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    for key in ("task", "metric", "higher_is_better", "config", "clients", "summary", "privacy", "timing_s",
                "provenance"):
        assert key in saved
    assert saved["task"] == "arith" and saved["metric"] == "accuracy" and saved["higher_is_better"] is True
    assert saved["config"]["n_shadow"] == 6
    assert {t["select_rule"] for t in saved["translators"].values()} == {"one_se"}   # no DP
    assert {t["select_draws"] for t in saved["translators"].values()} == {1}          # its last snapshot
    assert saved["provenance"]["torch"] == torch.__version__
    assert [c["kind"] for c in saved["clients"]] == ["skewed"] * 4 + ["iid"] + ["random"] * 2
    for c in saved["clients"]:
        weak = {"w2s", "w2s_conf", "vissup", "kd"} if c["kind"] != "random" else set()   # random: do no harm only
        assert {"llm_base", "tinylm_ft", "llm_ft", "gradtx", "mean_shadow", "ridge", "public_llm"} | weak == set(c["scores"])
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
    fail = lambda *a, **k: pytest.fail("a finished stage was recomputed")  # noqa: E731
    monkeypatch.setattr(tinylm, "pretrain", fail)
    monkeypatch.setattr(gradtx, "fit", fail)
    calls, real_finetune = [], tinylm.finetune
    monkeypatch.setattr(tinylm, "finetune", lambda *a, **k: calls.append(1) or real_finetune(*a, **k))
    again = train.main(TINY_RUN + [f"--out={out}"])
    # only eval's own LLM fine-tune runs again (public_llm); the clients' references are cached
    assert len(calls) == 1
    assert again["clients"] == first["clients"]   # same cached stages -> the very same scores


def test_dp_run_with_groups(dp_group_run):
    out, results = dp_group_run
    p = results["privacy"]
    q = 32 / 48   # by default q = B / N: the recipe's batch over the client's records (TINY_RUN: 48)
    sigma = dp.noise_multiplier_for(1.0, q, 6, 1e-5, dp.WIDE_ORDERS)
    assert (p["epsilon"], p["mechanism"], p["noise_multiplier"], p["steps"], p["sample_rate"]) == (1.0, "sgd", sigma, 6, q)
    assert set(p["subspace_k"]) == {1, 2}                       # one map per noise level
    # with DP the linear map is the argmin ("auto"): the gate already shrinks noisy uploads
    assert {t["select_rule"] for t in results["translators"].values()} == {"best"}
    # ... each held-out run scored on its last input (--gt_select_draws: on every one)
    assert {m: t["select_draws"] for m, t in results["translators"].items()} == {1: 1, 2: 1}
    for translator in results["translators"].values():          # the diagnostic: one value per direction
        assert len(translator["upload_signal"]) == train.SIGNAL_DIRECTIONS
        assert all(-1 <= c <= 1 for c in translator["upload_signal"])
    dp_table = sweep.experiment_table("dp", [results])
    assert "| signal |" in dp_table and "| translator gain (PGR) |" in dp_table
    sent = [c["provider_choice"] for c in results["clients"]]   # the choice column counts them
    assert f"| {evaluation.count_names(sent)} |" in dp_table and evaluation.count_names(sent)
    assert len(results["clients"]) == 5 * 2 + 2
    for c in results["clients"]:   # with DP the linear map is scored with and without the gate
        assert {"tinylm_dp", "ridge", "ridge_ungated"} <= set(c["scores"])
        if c["kind"] == "random":   # a client alone: nothing to pool
            assert c["pooling"] == {} and "gradtx_group" not in c["scores"]
            continue
        assert {"gradtx_group", "ridge_group"} <= set(c["scores"])
        assert set(c["pooling"]) == {1, 2} and "gradtx_single_map" in c["pooling"][2]
    for group in ("skewed_+", "iid_0"):
        first, second = (c for c in results["clients"] if c["group"] == group)
        # the curve at m = 1 translates the first member's upload alone: its own gradtx score
        assert first["pooling"][1]["gradtx"] == first["scores"]["gradtx"]
        # at m = M it is the group's translation, the same update for every member
        assert first["pooling"][2]["gradtx"] == first["scores"]["gradtx_group"]
        assert second["pooling"][2]["gradtx"] == second["scores"]["gradtx_group"]
    assert "pooling_gain_of_means" in results["summary"]["by_kind"]["skewed"]
    for c in results["clients"]:   # the do-no-harm gate says how far each upload was trusted
        assert 0 < c["gate_weight"] < 1
    # what the provider sent each client (gradtx), by name; the translation itself is `translator`
    assert set(results["provider_choice"]) == {1, 2}
    for c in results["clients"]:
        sent = c["provider_choice"]   # under the check: what it picked for this client's upload
        assert sent in {"mean_shadow", *gradtx.CANDIDATES, *(f"checked:{p}" for p in gradtx.CHECKED)}
        sent = sent.removeprefix("checked:")
        if sent in c["scores"]:
            assert c["scores"]["gradtx"] == c["scores"][sent]
        if c["pooling"]:
            assert set(c["pooling_choice"]) == {1, 2}
            assert c["pooling"][1]["gradtx"] == c["scores"]["gradtx"]
    worst = results["summary"]["worst_vs_mean_shadow"]
    for method in ("gradtx", "ridge", "ridge_ungated"):
        assert worst[method] == min(c["scores"][method] - c["scores"]["mean_shadow"] for c in results["clients"])
    assert worst["mean_shadow"] == 0


def test_frontier_points_and_table(dp_group_run):
    _, results = dp_group_run
    points = sweep.frontier_points([results])   # a run with groups of 2: one point per pooled size
    assert [p["m"] for p in points] == [1, 2] and all(p["n_train"] == 48 and p["epsilon"] == 1.0 for p in points)
    assert points[1]["nem"] == pytest.approx(48 * 1.0 * math.sqrt(2))
    skewed = results["summary"]["by_kind"]["skewed"]
    assert points[1]["gain"]["gradtx"] == skewed["pooling_gain_of_means"][2]["gradtx"]
    assert points[0]["gain"]["mean_shadow"] == skewed["gain_of_means"]["mean_shadow"]
    table = sweep.experiment_table("frontier", [results])
    assert table.count("\n| 48 (groups of 2) | 1 |") == 2
    # the worst client per method; a group's points come from its pooling curve: no ungated map
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| 48 ")]
    H = len(sweep.HARM_METHODS)   # the columns from the end: margin, trade-off, choice, H harm, harmed
    assert [c[-1 - H:-1] for c in cells] == [[sweep.signed(p["worst_vs_mean_shadow"].get(k)) for k in sweep.HARM_METHODS]
                                         for p in points]
    assert [c[-2] for c in cells] == ["n/a", "n/a"] and "n/a" not in cells[0][-1 - H]
    # the provider's choice, counted over the group members (their pooled upload's at m = 2)
    for p, c in zip(points, cells):
        assert c[-2 - H] == sweep.choice_counts(p)
        assert sum(int(n.split()[-1]) for n in c[-2 - H].split(", ")) == len(p["clients"])
    chosen = {c["provider_choice"] for c in points[1]["clients"].values()}
    assert chosen <= {"mean_shadow", *gradtx.CANDIDATES}
    # gradtx against the best baseline the row has (a pooled row: none of them)
    assert [c[-4 - H] for c in cells] == ["n/a", "n/a"]
    single = {"gain": {"gradtx": 0.5, "ridge_ungated": 0.9, "w2s": 0.6, "kd": None}}
    assert sweep.knee_margin(single) == pytest.approx(-0.4)
    # the trade-off: the best gain of a method that harms nobody (the mean update harms nobody)
    assert [c[-3 - H] for c in cells] == [sweep.best_unharmed(p) for p in points]
    single["worst_vs_mean_shadow"] = {"gradtx": -0.01, "ridge_ungated": -0.3, "w2s": -0.05}
    assert sweep.best_unharmed(single) == "0.60 w2s"
    single["worst_vs_mean_shadow"]["w2s"] = -0.051
    assert sweep.best_unharmed(single) == "0.50 gradtx"
    assert sweep.best_unharmed({"gain": {"gradtx": None}, "worst_vs_mean_shadow": {}}) == "n/a"
    # the harm column is the points' own scores: a member below -0.05 is named under its group
    scores = {"iid_0/0": -0.06, "iid_0/1": 0.0, "random_3": -0.051, "skewed_+": -0.05}
    point = {"vs_mean_shadow": {name: {"gradtx": v} for name, v in scores.items()},
             "clients": {name: {"group": name.split("/")[0]} for name in scores}}
    assert sweep.harmed(point) == "iid_0: 1 of 2, random_3"
    assert all(set(p["clients"]) == set(p["vs_mean_shadow"]) for p in points)
    for p, line in zip(points, [l for l in table.splitlines() if l.startswith("| 48 ")]):
        assert line.split(" | ")[-1].rstrip(" |") == sweep.harmed(p)
    assert all(p["group_size"] == 2 for p in points)
    cfg = train.parse_args(TINY_RUN + ["--dp_epsilon=0.3", "--group_size=2"])
    assert sweep.run_name(cfg, "frontier") == "n48_eps0.3_sgd_m2" and sweep.run_name(cfg, "dp") == "eps0.3_sgd"


def test_shadow_dp_runs_use_exactly_the_clients_recipe(tmp_path, monkeypatch):
    cfg = train.parse_args(TINY_RUN + [f"--out={tmp_path}", "--dp_epsilon=2", "--n_shadow=2", "--shadow_dp_draws=2",
                                       "--shadow_dp_fresh=true"])
    task = data.make_task("arith", cfg.seed)
    paths = stages.stage_paths(cfg, task)
    tiny, llm = train.base_models(cfg, task, paths, "cpu")
    seen, sets, real = [], [], train.fine_tunes
    monkeypatch.setattr(train, "fine_tunes", lambda cfg, model, datasets, recipe, *a, **k:
                        seen.append(recipe) or sets.append(datasets) or real(cfg, model, datasets, recipe, *a, **k))
    worker = train.Worker(cfg, task, tiny, llm)
    train.shadow_dp_runs(worker, [(1, 0), (1, 1)])
    train.client_runs(worker, task.clients(cfg.n_train, cfg.n_test)[:1])     # the floor, then the upload
    shadow_recipe, client_floor, client_recipe = seen
    assert shadow_recipe == client_recipe == train.recipe(cfg, private=True)
    assert shadow_recipe.dp_sigma == dp.calibrate("sgd", 2.0, 1e-5, cfg.dp_clip, train.sample_rate(cfg), cfg.ft_steps)
    assert client_floor.dp_sigma == 0.0                          # the PGR floor is the non-private TinyLM
    # each draw on fresh records of subset 1's mixture, as each client holds its own records
    drawn = [task.encode(task.shadow_subset(1, cfg.n_train, cfg.shadow_alpha, draw=r).examples) for r in (0, 1)]
    assert all(torch.equal(a, b) for got, want in zip(sets[0], drawn) for a, b in zip(got, want))
    assert not torch.equal(sets[0][0][0], sets[0][1][0])
    worker.cfg = replace(cfg, shadow_dp_fresh=False)       # the default: the subset's own records
    train.shadow_dp_runs(worker, [(1, 0)])
    own = task.encode(task.shadow_subset(1, cfg.n_train, cfg.shadow_alpha).examples)
    assert all(torch.equal(a, b) for a, b in zip(sets[-1][0], own))
    # the answer test's noise-only uploads: the same recipe, on public records of the task mixture
    train.null_runs(worker, [0, 1])
    assert seen[-1] == client_recipe
    null = [task.encode(data.null_examples(cfg, task, i)) for i in (0, 1)]
    assert all(torch.equal(a, b) for got, want in zip(sets[-1], null) for a, b in zip(got, want))


def test_pooled_upload_is_the_elementwise_mean():
    uploads = [torch.full((2, 3), float(i)) for i in range(5)]
    members = [{"upload": u} for u in uploads]
    seen = []

    class Provider:   # a stand-in that records which map translates what
        translators = {1: None, 2: None, 4: None, 5: None}
        choices = {}   # no DP: the translation itself
        translate = staticmethod(lambda u, m=1: seen.append((m, u)) or u)
        linear = staticmethod(lambda u, m=1: u)

    curve = evaluation.pooling_updates(members, Provider())
    assert list(curve.updates) == [1, 2, 4, 5] and curve.chosen == {}
    for m in curve.updates:
        torch.testing.assert_close(curve.updates[m]["gradtx"], torch.stack(uploads[:m]).mean(0))
    assert [m for m, _ in seen] == [1, 2, 1, 4, 1, 5, 1]       # each level's own map, then the single map


def test_fit_stage_does_not_depend_on_what_ran_before_in_the_process(tmp_path):
    """torch seeds its global generator differently in every process, and a run from a cache skips
    the pretraining that used to seed it: the fit stage must seed the translator's init itself, or
    a cached run and a fresh one fit different translators (found: the DP sweep did not reproduce)."""
    cfg = train.parse_args(TINY_RUN + [f"--out={tmp_path}"])
    task = data.make_task("arith", cfg.seed)
    paths = stages.stage_paths(cfg, task)
    tiny, llm = train.base_models(cfg, task, paths, "cpu")
    shadow = train.shadow_stages(cfg, task, tiny, llm, paths, "cpu")
    states = []
    for history in (1, 2):
        torch.manual_seed(history)   # two different histories of the global generator
        model, _ = train.fit_stage(cfg, task, tiny, llm, shadow, str(tmp_path / f"fit{history}.pt"), 1)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_interrupted_stage_resumes_to_the_same_pairs(tmp_path, monkeypatch):
    cfg = train.parse_args(TINY_RUN + [f"--out={tmp_path}", "--n_shadow=9", "--batch_runs=1"])  # one run per item
    task = data.make_task("arith", cfg.seed)
    paths = stages.stage_paths(cfg, task)
    tiny, llm = train.base_models(cfg, task, paths, "cpu")
    full = train.shadow_stages(cfg, task, tiny, llm, {**paths, "shadow": str(tmp_path / "full.pt")}, "cpu")
    real_finetune, calls = tinylm.finetune, []

    def dies_after_8_runs(*a, **k):
        if len(calls) == 2 * 8 + 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real_finetune(*a, **k)

    monkeypatch.setattr(tinylm, "finetune", dies_after_8_runs)
    with pytest.raises(KeyboardInterrupt):
        train.shadow_stages(cfg, task, tiny, llm, paths, "cpu")
    monkeypatch.setattr(tinylm, "finetune", real_finetune)
    partial = paths["shadow"].replace(".pt", ".partial.pt")
    assert len(torch.load(partial, weights_only=True)["results"]) == 8      # 8 runs were saved
    resumed = train.shadow_stages(cfg, task, tiny, llm, paths, "cpu")
    assert torch.equal(resumed["X"], full["X"]) and torch.equal(resumed["Y"], full["Y"])
    assert not os.path.exists(partial)


def test_a_cut_short_stage_file_is_recomputed(finished_run, tmp_path, capsys):
    """A cached file cut short (a full disk, an interrupted copy) is named in one line, moved aside and
    made again: the run ends with the same scores instead of torch's error about a zip archive."""
    out, first = finished_run
    cache = tmp_path / "cache"
    cache.mkdir()
    cut = {"shadow-": 0.5, "pretrain_llm-": 0.01}   # a copy of the finished run's cache, two files cut short
    for name in os.listdir(out):
        blob = open(os.path.join(out, name), "rb").read()
        keep = next((share for stage, share in cut.items() if name.startswith(stage) and name.endswith(".pt")), 1)
        (cache / name).write_bytes(blob[:int(keep * len(blob))])
    capsys.readouterr()
    again = train.main(TINY_RUN + [f"--out={tmp_path / 'out'}", f"--cache={cache}"])
    printed = capsys.readouterr().out
    for stage in cut:
        [line] = [text for text in printed.splitlines() if text.startswith("cache: ") and f"/{stage}" in text]
        bad = re.fullmatch(r"cache: (\S+) is unreadable \(.+\): recomputing it", line).group(1)
        assert os.path.exists(bad + ".unreadable")      # moved aside, not lost
    assert again["clients"] == first["clients"] and again["summary"] == first["summary"]


def test_cache_keys_follow_the_data_and_settings(monkeypatch):
    cfg = train.parse_args(TINY_RUN + ["--dp_epsilon=1"])
    task = data.make_task("arith", cfg.seed)
    before = stages.stage_paths(cfg, task)
    # the same settings in another cache directory: the same file names (a cache can be moved)
    moved = stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=1", "--cache=elsewhere/cache"]), task)
    assert {s: os.path.basename(p) for s, p in moved.items()} == {s: os.path.basename(p) for s, p in before.items()}
    # the device type counts, except "cpu": a CPU stage keeps the key it had before the device counted
    # (the smoke preset's TinyLM, as every cache made so far names it), a GPU-made stage gets its own
    assert stages.stage_paths(cfg, task, device="cpu") == before
    smoke = stages.stage_paths(train.parse_args(["--preset=smoke"]), task)
    assert os.path.basename(smoke["pretrain_tiny"]) == "pretrain_tiny-cf292e8bb6.pt"
    on_gpu = stages.stage_paths(cfg, task, device="cuda:0")
    assert all(on_gpu[s] != before[s] for s in before) and on_gpu == stages.stage_paths(cfg, task, device="cuda")
    # other client data: only the stages that read it (the clients and their references) change
    real_clients = data.ArithTask.clients
    monkeypatch.setattr(data.ArithTask, "clients", lambda self, *a, **k:
                        [dict(c, train=c["train"][1:]) for c in real_clients(self, *a, **k)])
    after = stages.stage_paths(cfg, task)
    assert {s for s in before if before[s] != after[s]} == {"clients", "references"}
    monkeypatch.setattr(data.ArithTask, "clients", real_clients)
    # another pretraining corpus (e.g. a change of the task's format): every stage changes
    monkeypatch.setattr(data.ArithTask, "fingerprint", lambda self: "another corpus")
    after = stages.stage_paths(cfg, task)
    assert all(before[s] != after[s] for s in before)
    monkeypatch.undo()
    eps2 = stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=2"]), task)
    # other shadow subsets: every stage that reads them; a translator setting: its fit and the
    # choice made from it; the choice's own setting: the choice only
    # the answer test's noise-only uploads read public records and the clients' recipe only
    assert {s for s in before if before[s] != eps2[s]} >= {"shadow_dp", "shadow_null", "clients"}
    other_null = stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=1", "--answer_null_runs=9"]), task)
    assert {s for s in before if before[s] != other_null[s]} == {"shadow_null"}
    for off in ("--gt_answer_test=false", "--gt_choose=false", "--dp_epsilon=0"):
        assert "shadow_null" not in stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=1", off]), task)
    other_shadow = stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=1", "--shadow_alpha=3"]), task)
    assert {s for s in before if before[s] != other_shadow[s]} == {"shadow", "shadow_dp", "fit_1", "choice_1"}
    other_fit = stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=1", "--gt_lr=1e-3"]), task)
    assert {s for s in before if before[s] != other_fit[s]} == {"fit_1", "choice_1"}
    other_choice = stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=1", "--choice_budget=0.05"]), task)
    assert {s for s in before if before[s] != other_choice[s]} == {"choice_1"}
    assert "choice_1" not in stages.stage_paths(train.parse_args(TINY_RUN + ["--dp_epsilon=1", "--gt_choose=false"]), task)
    # what the check reads (its prompts) and chooses among: the choice only
    for name, value in (("CHECK_PROMPTS", 32), ("CHECKED", ("mean_shadow", "ridge_ungated"))):
        with monkeypatch.context() as m:
            m.setattr(stages if name == "CHECK_PROMPTS" else gradtx, name, value)
            other_check = stages.stage_paths(cfg, task)
        assert {s for s in before if before[s] != other_check[s]} == {"choice_1"}
    # another privacy level: llm_ft reads no upload, so without weak baselines its fine-tunes are reused
    strong = [f"--weak_baselines={w}" for w in ("false", "true")]
    for flag, reused in zip(strong, (True, False)):
        eps1, eps8 = (stages.stage_paths(train.parse_args(TINY_RUN + [flag, f"--dp_epsilon={e}"]), task) for e in (1, 8))
        assert eps1["clients"] != eps8["clients"] and (eps1["references"] == eps8["references"]) == reused


def test_worker_processes_give_the_same_pairs_as_one_process(tmp_path):
    one = train.parse_args(TINY_RUN + [f"--out={tmp_path}", "--n_shadow=3"])
    two = train.parse_args(TINY_RUN + [f"--out={tmp_path}", "--n_shadow=3", "--workers=2"])
    task = data.make_task("arith", one.seed)
    paths = stages.stage_paths(one, task)
    tiny, llm = train.base_models(one, task, paths, "cpu")
    runs = [[pair for chunk in pool.worker_map(cfg, train.shadow_runs, [[0], [1, 2]], device="cpu",
                                               state=train.Worker(cfg, task, tiny, llm),
                                               rebuild=(train.worker_from_cache, (cfg, paths, "cpu", task)))
             for pair in chunk] for cfg in (one, two)]
    for (x1, y1), (x2, y2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_gpu_preset_shapes_run_on_cpu(tmp_path):
    """The gpu preset's model sizes, end to end with toy step counts: the code path, not the quality."""
    results = train.main(["--preset=gpu", "--device=cpu", f"--out={tmp_path}", "--pretrain_steps_tiny=2",
                          "--pretrain_steps_llm=2", "--pretrain_batch=8", "--ft_steps=3", "--n_train=16",
                          "--n_shadow=4", "--n_snapshots=1", "--gt_steps=1", "--gt_eval_every=1", "--n_test=8",
                          "--workers=1", "--threads=1", "--weak_baselines=false",
                          "--random_clients=0", "--compile=false"])   # compiling takes minutes on a CPU: test_compile.py
    llm_cfg = MODEL_PRESETS["llm_gpu"]
    assert results["config"]["llm_model"] == "llm_gpu"
    fit = torch.load(next(p for p in (tmp_path / f for f in os.listdir(tmp_path)) if p.name.startswith("fit-")
                          and p.suffix == ".pt"), weights_only=True)
    assert fit["config"]["n_tgt"] == llm_cfg.n_layer and fit["config"]["d_tgt"] == 4 * 4 * llm_cfg.n_embd


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit, match="unknown option --nope"):
        train.parse_args(["--nope=1"])
    with pytest.raises(SystemExit, match="unknown preset"):
        train.parse_args(["--preset=huge"])
    with pytest.raises(SystemExit, match="expected a int"):
        train.parse_args(["--n_shadow=many"])
    with pytest.raises(SystemExit, match="expected --key=value"):
        train.parse_args(["n_shadow=3"])
    with pytest.raises(SystemExit, match="unknown experiment"):
        train.parse_args(["--experiment=everything"])
    with pytest.raises(SystemExit, match="dp_mechanism"):
        train.parse_args(["--dp_mechanism=laplace"])
    with pytest.raises(SystemExit, match="DP settings out of range"):
        train.parse_args(["--dp_epsilon=-1"])
    with pytest.raises(SystemExit, match="shadow_dp_fresh with --dp_mechanism=output"):
        train.parse_args(["--dp_epsilon=1", "--dp_mechanism=output", "--shadow_dp_fresh=true"])
    with pytest.raises(SystemExit, match="shadow_dp_draws"):
        train.parse_args(["--dp_epsilon=1", "--group_size=8", "--shadow_dp_draws=4"])
    for bad in (["--fit_shadow=60"], ["--fit_shadow=2"], ["--fit_shadow=-1"]):   # default n_shadow: 48
        with pytest.raises(SystemExit, match="fit_shadow"):
            train.parse_args(bad)
    assert train.parse_args(["--n_shadow=192", "--fit_shadow=12"]).fit_shadow == 12
    for bad in (["--gt_select=accuracy"], ["--preset=text", "--gt_select=exact_match"]):
        with pytest.raises(SystemExit, match="gt_select"):
            train.parse_args(bad)
    cfg = train.parse_args(["--preset", "smoke", "--seed=3", "--gt_normalize=false"])
    assert (cfg.preset, cfg.seed, cfg.gt_normalize, cfg.n_shadow) == ("smoke", 3, False, 8)


def test_pgr_and_gain_on_hand_made_numbers():
    assert evaluation.pgr(0.5, 0.4, 0.6) == pytest.approx(0.5)
    assert evaluation.pgr(0.7, 0.4, 0.6) == pytest.approx(1.5)      # not clipped above 1
    assert evaluation.pgr(0.3, 0.4, 0.6) == pytest.approx(-0.5)     # nor below 0
    assert evaluation.pgr(0.6, 0.4, 0.6) == pytest.approx(1.0)
    assert evaluation.pgr(0.5, 0.4, 0.4) is None                    # zero gap: undefined
    assert evaluation.pgr(0.5, 0.6, 0.4) == pytest.approx(0.5)      # a negative gap is still a ratio
    # lower is better (bits per byte): floor 2.5, ceiling 2.2; 2.3 closes two thirds of the gap
    assert evaluation.pgr(2.3, 2.5, 2.2) == pytest.approx(2 / 3)
    assert evaluation.pgr(2.6, 2.5, 2.2) == pytest.approx(-1 / 3)   # worse than the floor: negative
    assert evaluation.mean_defined([0.5, None, 1.0]) == pytest.approx(0.75)
    assert evaluation.mean_defined([None]) is None


def test_output_perturbation_run(tmp_path):
    """The other DP mechanism end to end: clients upload clean updates clipped to C plus Gaussian
    noise, and the translator is trained on shadow updates perturbed the same way."""
    results = train.main(TINY_RUN + [f"--out={tmp_path}", "--dp_epsilon=0.5", "--dp_mechanism=output"])
    p = results["privacy"]
    assert (p["epsilon"], p["mechanism"]) == (0.5, "output")
    assert p["noise_multiplier"] == dp.gaussian_sigma(0.5, 1e-5, 1.0)
    assert all("tinylm_dp" in c["scores"] for c in results["clients"])


def test_every_entry_point_takes_both_spellings_of_an_option(finished_run, tmp_path, monkeypatch, capsys):
    """--key=value and --key value are one option to every command: train.py and the experiments
    (config.presets.parse_args), eval.py and experiments/audit.py (parse_options, as the
    benchmarks), and the argparse tools."""
    import importlib.util
    from experiments import audit
    from experiments import text as text_experiment
    assert train.parse_args(["--preset", "smoke", "--seed", "3", "--gt_gate", "false"]) == \
        train.parse_args(["--preset=smoke", "--seed=3", "--gt_gate=false"]) != train.parse_args(["--preset=smoke"])
    assert audit.parse_args(["--canaries", "40", "--ks", "5,10"]) == \
        audit.parse_args(["--canaries=40", "--ks=5,10"]) != audit.parse_args([])
    monkeypatch.setattr(text_experiment, "make_text_task", lambda seed, text_path: None)
    monkeypatch.setattr(train, "run", lambda cfg, task=None: cfg)
    assert text_experiment.main(["--seed", "2", "--n_shadow", "12"]) == text_experiment.main(["--seed=2", "--n_shadow=12"])
    for spelling in (["--out", str(tmp_path)], [f"--out={tmp_path}"]):
        with pytest.raises(SystemExit, match=f"no experiment's table in {tmp_path}"):
            sweep.main(["--tables"] + spelling)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("exercises", os.path.join(root, "tools", "exercises.py"))
    exercises = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exercises)
    for spelling in (["--only", "no_such_exercise"], ["--only=no_such_exercise"]):
        with pytest.raises(SystemExit):
            exercises.main(["--mistakes", "--list"] + spelling)
        assert "unknown exercise(s) no_such_exercise" in capsys.readouterr().err


def test_eval_prints_a_finished_runs_tables_again(finished_run, tmp_path):
    """python eval.py --out DIR (or --out=DIR): the tables of the run in DIR, from its results.json,
    as the run printed them; a folder without one is refused with what was expected."""
    out, _ = finished_run
    with open(os.path.join(out, "results.json")) as f:   # as on disk now: other tests resume this run
        results = json.load(f)
    assert evaluation.main(["--out", out]) == evaluation.main([f"--out={out}"]) == evaluation.report(results)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = subprocess.run([sys.executable, "eval.py", "--out", out], capture_output=True, text=True, cwd=root,
                           check=True)
    assert shown.stdout.strip() == evaluation.report(results).strip()
    with pytest.raises(SystemExit, match="results.json not found"):
        evaluation.main(["--out", str(tmp_path)])

def test_the_providers_choice_reads_shadow_runs_only(dp_group_run, tmp_path):
    """The provider's choice and the answer test's calibration (its corners too) are fixed before
    any client uploads: other clients (other data, other mixtures) leave the choice's cache key
    alone, and made again from the same shadow runs both are the same."""
    out, results = dp_group_run
    task = data.make_task("arith", 0)
    cfg = train.parse_args(TINY_RUN + [f"--out={out}", "--dp_epsilon=1", "--group_size=2", "--shadow_dp_draws=2"])
    other = train.parse_args(TINY_RUN + [f"--out={tmp_path}", f"--cache={out}", "--dp_epsilon=1", "--group_size=2",
                                         "--shadow_dp_draws=2", "--skew=0.6", "--random_clients=3"])
    paths = stages.stage_paths(cfg, task, (1, 2))
    moved = stages.stage_paths(other, task, (1, 2))
    assert moved["clients"] != paths["clients"]
    assert all(moved[f"choice_{m}"] == paths[f"choice_{m}"] for m in (1, 2))
    assert moved["shadow_null"] == paths["shadow_null"]
    for m in (1, 2):   # made anew, now beside other clients
        os.replace(paths[f"choice_{m}"], str(tmp_path / f"choice_{m}.pt"))
    again = train.run(other)
    assert again["provider_choice"] == results["provider_choice"]
    assert sorted(map(int, results["answer_test"])) == [1, 2]   # a calibration per level
    assert again["answer_test"] == results["answer_test"]
    assert len(again["clients"]) != len(results["clients"])


def test_library_modules_import_one_way():
    """dp -> data -> tinylm -> config.presets (the settings and the recipe they publish) -> gradtx ->
    eval -> config.stages (the stage cache) -> config.pool (worker processes) -> train: each module
    imports only modules before it, and only at its top (an import inside a function is how a cycle hides). Experiments and tools
    import the method; the method never imports them."""
    import ast
    order = ["dp", "data", "tinylm", "config.presets", "gradtx", "eval", "config.stages", "config.pool", "train"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for i, name in enumerate(order):
        tree = ast.parse(open(os.path.join(root, *name.split(".")) + ".py").read())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:   # "from config import stages" imports config.stages
                    targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not any(t.split(".")[0] in ("experiments", "tools") for t in targets), \
                    f"{name}.py imports an experiment or a tool: {targets}"
                ours = [t for t in targets if t in order]
                assert not ours or id(node) in top, f"{name}.py imports {ours} inside a block (line {node.lineno})"
                for t in ours:
                    assert order.index(t) < i, f"{name}.py imports {t}.py, which comes after it"


def test_eval_rebuilds_an_experiments_table_and_points_from_its_runs(dp_group_run, tmp_path):
    out, results = dp_group_run
    os.makedirs(tmp_path / "n48_eps1_sgd_m2")
    shutil.copy(os.path.join(out, "results.json"), tmp_path / "n48_eps1_sgd_m2" / "results.json")
    table = sweep.write_experiment("frontier", [results], str(tmp_path))
    points = json.load(open(tmp_path / "frontier.json"))["rows"]
    os.remove(tmp_path / "frontier.json")
    shown = subprocess.run([sys.executable, "experiments/sweep.py", "--tables", f"--out={tmp_path}"], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert shown.stdout.strip() == table.strip()
    assert json.load(open(tmp_path / "frontier.json"))["rows"] == points


def test_shadow_count_curates_once_and_fits_on_prefixes(tmp_path, monkeypatch):
    """The experiment curates the largest K once per data size and fits on its prefixes: a fit on
    the first 4 of 6 curated subsets is the very fit a provider with only those 4 would make."""
    from config.presets import shadow_count_runs
    monkeypatch.setitem(sweep.EXPERIMENTS, "shadow_count",
                        shadow_count_runs((4, 6), ((dict(), 1), (dict(dp_epsilon=1.0), 2))))
    curated, real_runs = [], train.shadow_runs
    monkeypatch.setattr(train, "shadow_runs", lambda worker, ks: curated.extend(ks) or real_runs(worker, ks))
    out = tmp_path / "sc"
    runs = sweep.main(TINY_RUN + [f"--out={out}", "--experiment=shadow_count", "--shadow_dp_draws=2"])
    assert curated == list(range(6))              # one curation of the largest K, for both levels
    assert len(runs) == 2 * 2 + 2 * 3
    rows = json.load(open(out / "shadow_count.json"))["rows"]
    assert {(r["K"], r["epsilon"]) for r in rows} == {(K, e) for K in (4, 6) for e in (None, 1.0)}
    no_dp = {r["method"] for r in rows if r["epsilon"] is None}
    assert no_dp == {"gradtx_paper", "gradtx", "ridge", "mean_shadow"}
    for K in (4, 6):   # at the DP level two inits, and the one the held-out criterion picks
        inits = [r for r in rows if (r["K"], r["epsilon"], r["method"]) == (K, 1.0, "gradtx")]
        best = next(r for r in rows if (r["K"], r["epsilon"], r["method"]) == (K, 1.0, "gradtx_best_init"))
        assert sorted(r["init"] for r in inits) == [0, 1]
        assert best["val_loss"] == min(r["val_loss"] for r in inits)
        assert best["seconds"] == pytest.approx(best["curation_seconds"] + sum(r["fit_seconds"] for r in inits))
        assert best["shadow_finetunes"] == K * (2 + 2)
    assert "gradtx over inits" in (out / "shadow_count.md").read_text()
    # the oracle: curating only the first 4 subsets gives the same translations
    alone = train.main(TINY_RUN + [f"--out={tmp_path / 'four'}", "--n_shadow=4", "--weak_baselines=false"])
    prefix = next(r for r in runs if r["config"]["fit_shadow"] == 4 and r["config"]["gt_skip"]
                  and r["privacy"]["epsilon"] is None)
    for a, b in zip(alone["clients"], prefix["clients"]):
        assert {m: a["scores"][m] for m in ("gradtx", "ridge", "mean_shadow")} == {
            m: b["scores"][m] for m in ("gradtx", "ridge", "mean_shadow")}


def test_the_harm_column_is_the_worst_client_of_the_table_scores(finished_run):
    """Do no harm, reported: per method the worst client's score minus its mean shadow update's
    score, from the very scores the table shows, the random clients included."""
    _, results = finished_run
    worst = results["summary"]["worst_vs_mean_shadow"]
    for m in ("gradtx", "ridge", "w2s"):
        having = [c for c in results["clients"] if m in c["scores"]]
        assert worst[m] == min(c["scores"][m] - c["scores"]["mean_shadow"] for c in having)
    assert worst["mean_shadow"] == 0.0
    table = evaluation.results_table(results).splitlines()
    assert table[0].endswith("| worst client vs mean_shadow |") and "| random (mean of 2) |" in table[0]
    gradtx_row = next(line for line in table if line.startswith("| gradtx |"))
    assert gradtx_row.endswith(f"| {worst['gradtx']:+.2f} |")


def two_uploads_and_options(frontier_point):
    """The toy frontier point's provider (experiments.kd_candidate.provider_at), the uploads of its
    first two clients (2, n_src, d_src) and two options for each (2, 2, n_tgt, d_tgt): the mean
    update and a random one. (cfg, provider, uploads, options)."""
    from experiments.kd_candidate import provider_at, run_config
    _, run = frontier_point
    cfg = run_config(run)
    p = provider_at(cfg)
    clients = train.clients_stage(cfg, p.task, p.tiny, p.llm, p.paths, "cpu")
    uploads = torch.stack([c["upload"] for c in clients[:2]])
    options = torch.stack([p.fallback.expand(2, -1, -1),
                           0.5 * torch.randn(2, *p.fallback.shape, generator=torch.Generator().manual_seed(0))])
    return cfg, p, uploads, options


def test_the_check_scores_the_llm_on_the_answers_of_each_uploads_own_tinylm(frontier_point):
    """eval.tinylm_check against a loop: for each upload, the TinyLM rebuilt from it answers the
    check's public prompts, and each option is scored by the LLM's loss on each answer alone; both
    models are left as they were."""
    cfg, p, uploads, options = two_uploads_and_options(frontier_point)
    before = tinylm.get_update(p.tiny).clone(), tinylm.get_update(p.llm).clone()
    losses = evaluation.tinylm_check(p.task, p.tiny, p.llm, 12, cfg.seed)(uploads, options)
    assert torch.equal(tinylm.get_update(p.tiny), before[0]) and torch.equal(tinylm.get_update(p.llm), before[1])
    prompts = p.task.public_examples(12, data.stream(cfg.seed, "check prompts"))
    for i, upload in enumerate(uploads):
        answers = evaluation.relabel(p.task, tinylm.set_update(p.tiny, upload), prompts,
                                     torch.Generator().manual_seed(cfg.seed))
        assert answers and losses[i].shape == (2, len(answers))
        for c in range(2):
            llm = tinylm.set_update(p.llm, options[c, i])
            want = [tinylm.loss_of(llm, *p.task.encode([a])) for a in answers]
            assert losses[i][c].tolist() == pytest.approx(want, rel=1e-5)


def test_the_answer_tests_null_at_level_m_has_the_noise_of_a_mean_of_m_uploads(monkeypatch):
    """answer_test_stage on the provider's noise-only uploads: with shifts that are linear in the
    upload (faked), the calibration for inputs that average m uploads keeps the centre, divides
    the spread by sqrt(m) (the mean of m independent uploads), and keeps the threshold (a
    quantile of z's, which the scale leaves alone)."""
    g = torch.Generator().manual_seed(0)
    null = torch.randn(64, 3, 5, generator=g) + torch.arange(15.).view(3, 5)        # (N, n, d)
    weights = torch.randn(15, 4, generator=g)
    answers = SimpleNamespace(tiny=lambda uploads: uploads.flatten(1) @ weights,   # (B, A)
                              llm=lambda options: options.flatten(2)[..., :4])     # (C, B, A)
    monkeypatch.setattr(evaluation, "answer_shifts", lambda *a, **k: answers)
    cfg = train.parse_args(TINY_RUN + ["--dp_epsilon=1"])
    Y = torch.randn(cfg.n_shadow, cfg.n_snapshots, 2, 3, generator=g)   # the LLM's shadow updates
    shadow = {"X_null": null, "Y": Y}
    one, four = (train.answer_test_stage(cfg, None, None, None, shadow, None, m) for m in (1, 4))
    torch.testing.assert_close(four.centre, one.centre)
    torch.testing.assert_close(four.scale, one.scale / 2)
    assert four.threshold == pytest.approx(one.threshold, rel=1e-5)
    torch.testing.assert_close(one.centre, answers.tiny(null).mean(0))
    # the corners: the same at every level, final updates of the runs the maps fit on
    train_runs = train.fit_runs(cfg)[0]
    assert one.corners.runs == four.corners.runs
    for a, run in enumerate(one.corners.runs):
        if run >= 0:
            assert run in train_runs
            torch.testing.assert_close(one.corners.updates[a], Y[run, -1])
            moves = Y[train_runs, -1].flatten(1)[:, :4]                    # what the fake LLM reads
            assert moves[:, a].max() == Y[run, -1].flatten()[a]          # the most towards a


def test_the_answer_shifts_read_each_model_one_prompt_at_a_time(frontier_point):
    """eval.answer_shifts against a loop over single prompts: the rebuilt TinyLM's mean
    log-probability of each operator after '37@52=' minus the public TinyLM's, the LLM's mean
    probability of each under each option, the default what it answers under the mean update;
    both models left as they were, and a task without conventions has no answer test."""
    cfg, p, uploads, options = two_uploads_and_options(frontier_point)
    before = tinylm.get_update(p.tiny).clone(), tinylm.get_update(p.llm).clone()
    answers = evaluation.answer_shifts(p.task, p.tiny, p.llm, p.fallback, 12, cfg.seed)
    tiny_shifts, llm_probabilities = answers.tiny(uploads), answers.llm(options)
    assert torch.equal(tinylm.get_update(p.tiny), before[0]) and torch.equal(tinylm.get_update(p.llm), before[1])
    prompts = [p.task.convention_prompt(e) for e in p.task.public_examples(12, data.stream(cfg.seed, "check prompts"))]
    assert all(prompt[2] == "@" and prompt.endswith("=") for prompt in prompts)
    ops = [p.task.enc.encode_ordinary(op)[0] for op in data.OPS]

    def mean_over_prompts(model, update, log):
        model = tinylm.set_update(model, update)
        out = []
        for prompt in prompts:
            logits = model(torch.tensor([p.task.enc.encode_ordinary(prompt)]))[0][0, -1]
            out.append((torch.log_softmax if log else torch.softmax)(logits, -1)[ops])
        return torch.stack(out).mean(0)
    public = mean_over_prompts(p.tiny, torch.zeros_like(uploads[0]), log=True)
    for i, upload in enumerate(uploads):
        torch.testing.assert_close(tiny_shifts[i], mean_over_prompts(p.tiny, upload, log=True) - public)
    for c in range(2):
        for i in range(2):
            torch.testing.assert_close(llm_probabilities[c, i], mean_over_prompts(p.llm, options[c, i], log=False))
    mean = mean_over_prompts(p.llm, p.fallback, log=False)
    assert answers.default == mean.argmax().item()   # what the LLM answers under the mean update
    assert evaluation.answer_shifts(SimpleNamespace(name="text"), p.tiny, p.llm, p.fallback, 12, 0) is None


def test_the_answer_test_is_an_option_on_top_of_the_choice(frontier_point, tmp_path):
    """--gt_answer_test=false: the provider's choice alone, from the same cached stages: no
    calibration in results.json, nothing named shift:, and every client the test left alone sent
    the very same update."""
    _, run = frontier_point
    with open(os.path.join(run, "results.json")) as f:
        on = json.load(f)
    off = train.main(TINY_RUN + [f"--out={tmp_path}", f"--cache={run}", "--dp_epsilon=1", "--shadow_dp_draws=2",
                                 "--gt_answer_test=false"])
    assert "answer_test" in on and "answer_test" not in off
    assert not any(c["provider_choice"].startswith("shift:") for c in off["clients"])
    for a, b in zip(on["clients"], off["clients"]):
        if not a["provider_choice"].startswith("shift:"):
            assert (a["provider_choice"], a["scores"]["gradtx"]) == (b["provider_choice"], b["scores"]["gradtx"])
