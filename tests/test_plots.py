"""Tests for tools/plots.py: it draws a PNG from each kind of JSON a finished run leaves (hand-made,
tiny ones here), and without matplotlib it stops with one clear line and exit code 2."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import plots  # noqa: E402


def results(eps=None, mechanism=None, gain=1.0, pooling=False):
    """The parts of a results.json the figures read (eval.evaluate writes the whole thing)."""
    gains = {m: gain * f for m, f in zip(plots.METHODS, (1.0, 1.0, 0.0, 0.5, 0.6, 0.6))}
    skewed = {"gain_of_means": gains}
    if pooling:
        skewed["pooling_gain_of_means"] = {"1": {"gradtx": 0.1, "ridge": 0.1},
                                           "2": {"gradtx": 0.3, "ridge": 0.2, "gradtx_single_map": 0.0}}
    history = [{"step": s, "train_mse": 0.1, "val_mse": 0.2, "val_rel_err": 0.3, "criterion": c}
               for s, c in ((0, 0.50), (100, 0.45), (200, 0.47))]
    translator = {"k": 8, "ridge_lambda": 1.0, "ridge_loss": 0.50, "best_step": 100, "val_loss": 0.45,
                  "mean_shadow_loss": 0.9, "true_update_loss": 0.3, "upload_signal": None, "history": history}
    return {"privacy": {"epsilon": eps, "mechanism": mechanism}, "translators": {"1": translator},
            "summary": {"gain_of_means": gains, "by_kind": {"skewed": skewed}}}


def needs_matplotlib():
    """matplotlib is an optional extra: without it there is nothing to draw, and the skip says so
    (tools/exercises.py --check counts a skip for an optional extra as no problem)."""
    pytest.importorskip("matplotlib", reason="optional extra: matplotlib is not installed")


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_draws_a_png_for_every_kind_of_json(tmp_path):
    needs_matplotlib()
    write(tmp_path / "run" / "results.json", results())
    write(tmp_path / "run" / "frontier.json", {"rows": [
        {"n_train": n, "epsilon": e, "m": m, "nem": n * e * m ** 0.5,
         "gain": {"gradtx": g, "ridge": g, "tinylm_dp": g / 2, "w2s": g / 2, "kd": g / 3, "mean_shadow": 0.0},
         "worst_vs_mean_shadow": {"gradtx": 0.0},
         "vs_mean_shadow": {c: {"gradtx": g - 0.5, "ridge": -g} for c in ("skewed_+", "iid_0", "random_0")},
         "clients": {c: {"group": c, "kind": k, "provider_choice": "translator"} for c, k in (("skewed_+", "skewed"), ("iid_0", "iid"),
                                                             ("random_0", "random"))}}
        for n, e, m, g in ((512, 0.3, 1, 0.1), (512, 1.0, 1, 0.9), (128, 1.0, 8, 0.4))]})
    write(tmp_path / "run" / "shadow_count.json", {"rows": [
        {"K": K, "epsilon": e, "method": m, "skewed_gain": K / 100, "seconds": 1.0}
        for K in (16, 48) for e in (None, 1.0) for m in ("gradtx", "ridge")]})
    write(tmp_path / "dp" / "dp.md", "a table\n")
    for name, eps, mech in (("no_dp", None, None), ("eps8_sgd", 8.0, "sgd"), ("eps1_sgd", 1.0, "sgd"),
                            ("eps1_output", 1.0, "output")):
        write(tmp_path / "dp" / name / "results.json", results(eps, mech, gain=1.0 if eps is None else 0.1 * eps))
    write(tmp_path / "collab" / "collab.md", "a table\n")
    for name, eps in (("no_dp", None), ("eps1_sgd", 1.0)):
        write(tmp_path / "collab" / name / "results.json", results(eps, eps and "sgd", pooling=True))

    assert plots.main([f"--out={tmp_path / 'run'}"]) == ["fit.png", "frontier.png", "frontier_by_size.png",
                                                         "frontier_harm.png", "shadow_count.png"]
    figures = tmp_path / "figures"
    assert set(plots.main([f"--out={tmp_path / 'dp'}", f"--figures={figures}"])) == {
        "dp.png", "fit_no_dp.png", "fit_eps8_sgd.png", "fit_eps1_sgd.png", "fit_eps1_output.png"}
    assert "pooling.png" in plots.main([f"--out={tmp_path / 'collab'}", f"--figures={figures}"])
    for png in [tmp_path / "run" / "figures" / "fit.png", tmp_path / "run" / "figures" / "frontier.png",
                figures / "dp.png", figures / "pooling.png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_the_frontier_marks_the_providers_choice_at_each_point():
    row = {"clients": {"a": {"provider_choice": "translator"}, "b": {"provider_choice": "mean_shadow"},
                       "c": {"provider_choice": "translator"}}}
    assert plots.choice_letter(row) == "T"
    row["clients"]["b"]["provider_choice"] = row["clients"]["c"]["provider_choice"] = "ridge_ungated"
    assert plots.choice_letter(row) == "R*"
    for c in "abc":   # the check: what it picked for most clients, marked c
        row["clients"][c]["provider_choice"] = "checked:mean_shadow" if c == "a" else "checked:translator_ungated"
    assert plots.choice_letter(row) == "cT*"
    for c in "bc":   # the answer test: what it sent instead, marked s
        row["clients"][c]["provider_choice"] = "shift:ridge_ungated"
    assert plots.choice_letter(row) == "sR*"
    for c in "abc":   # the answer test's corner
        row["clients"][c]["provider_choice"] = "shift:corner"
    assert plots.choice_letter(row) == "sC"
    assert plots.choice_letter({"clients": {"a": {"group": "a"}}}) == ""   # a run before the choice


def test_a_results_json_without_fit_history_is_skipped_not_fatal(tmp_path, capsys):
    needs_matplotlib()
    old = results()
    del old["translators"]["1"]["history"]      # results.json files written before it was kept
    write(tmp_path / "results.json", old)
    assert plots.main([f"--out={tmp_path}"]) == []
    assert "fit.png: skipped" in capsys.readouterr().out


def test_without_matplotlib_one_clear_line_and_exit_code_2(tmp_path):
    fake = tmp_path / "site" / "matplotlib"    # a matplotlib that cannot be imported, first on the path
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    write(tmp_path / "results.json", results())
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plots.py"), f"--out={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tools/plots.py needs matplotlib, an optional extra of gradtx: pip install matplotlib"]
    assert not (tmp_path / "figures").exists()
