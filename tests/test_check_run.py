"""tools/check_run.py, "did my run work?": the shipped reference run passes against itself, a copy
moved within the bands passes, one moved beyond them or one that harms a client fails."""
import copy
import json

from tools import check_run   # the repository is on sys.path (conftest.py)


def reference():
    with open(check_run.REFERENCE, encoding="utf-8") as f:
        return json.load(f)


def run_with(change):
    run = copy.deepcopy(reference())
    change(run["summary"])
    return run


def failed(run):
    return [(m, what) for m, what, _, _, ok, _ in check_run.check(run, reference()) if ok is False]


def test_the_reference_run_passes_against_itself(tmp_path, capsys):
    assert failed(reference()) == []
    assert check_run.main([check_run.REFERENCE]) == 0
    assert "0 of 33 checks outside their bands" in capsys.readouterr().out


def test_a_run_within_the_bands_passes():
    def nudge(summary):
        summary["by_kind"]["skewed"]["gain_of_means"]["gradtx"] -= 0.09
        summary["gain_of_means"]["w2s"] += 0.14
        summary["worst_vs_mean_shadow"]["kd"] -= 0.09
    assert failed(run_with(nudge)) == []


def test_a_run_beyond_the_bands_fails(tmp_path):
    def move(summary):
        summary["by_kind"]["skewed"]["gain_of_means"]["gradtx"] -= 0.2
        summary["gain_of_means"]["w2s"] += 0.2
    run = run_with(move)
    assert failed(run) == [("gradtx", "skewed gain"), ("w2s", "gain of means")]
    (tmp_path / "results.json").write_text(json.dumps(run))
    assert check_run.main([str(tmp_path / "results.json")]) == 1


def test_a_translation_that_harms_a_client_fails_whatever_the_reference():
    def harm(summary):
        summary["worst_vs_mean_shadow"]["gradtx"] = -0.06   # within 0.10, below do no harm
    assert failed(run_with(harm)) == [("gradtx", "worst client")]


def test_a_method_one_run_lacks_is_skipped_not_failed():
    def drop(summary):
        for table in (summary, summary["by_kind"]["skewed"]):
            for values in table.values():
                if isinstance(values, dict):
                    values.pop("vissup", None)
    rows = check_run.check(run_with(drop), reference())
    assert [r for r in rows if r[0] == "vissup"] == [
        ("vissup", "-", None, None, None, "not in this run: skipped")]
    assert failed(run_with(drop)) == []
