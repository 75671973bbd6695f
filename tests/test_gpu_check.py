"""tools/gpu_check.sh's logic on the CPU, with the CUDA steps skipped (GPU_CHECK_FAKE=1): a step that
cannot fit in what is left of the budget is skipped and says so, the run still ends with its table,
the output folder stays small and free of progress bars and caches; and the table's arithmetic
(steps/s, peak memory, the extrapolated full run) against numbers worked by hand."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def gpu_check(args, **env):
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          env=environment)


def table_rows(text):
    """{stage: [status, seconds, tiny steps/s, llm steps/s, peak memory]} of the table's rows."""
    lines = text[text.index("stage "):].splitlines()
    cells = [[c.strip() for c in line.split("|")] for line in lines if "|" in line]
    return {c[0]: c[1:] for c in cells[1:]}


def test_a_budget_too_short_skips_every_step_and_still_prints_the_table(tmp_path):
    out = tmp_path / "out"
    done = gpu_check([str(out)], GPU_CHECK_FAKE="1", BUDGET_S="1",
                     GPU_CHECK_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "cuda_tests: skipped: GPU_CHECK_FAKE=1, no GPU" in done.stdout
    for name in ("default_on_cuda", "gpu_preset"):
        assert f"{name}: skipped: needs at least 30 s" in done.stdout
    rows = table_rows(done.stdout)
    assert list(rows) == ["cuda_tests", "default_on_cuda", "gpu_preset"]
    assert all(r == ["skipped", "0", "-", "-", "-"] for r in rows.values())
    assert (out / "table.txt").read_text() == done.stdout[done.stdout.index("stage "):]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not any("it/s" in p.read_text() or "\r" in p.read_text() for p in files)


def test_a_cache_inside_the_output_folder_is_refused(tmp_path):
    done = gpu_check([str(tmp_path / "out")], GPU_CHECK_FAKE="1", BUDGET_S="1",
                     GPU_CHECK_CACHE=str(tmp_path / "out" / "cache"))
    assert done.returncode == 2 and "must lie outside OUT" in done.stderr


def test_the_table_reads_steps_per_second_peak_memory_and_extrapolates_the_full_run(tmp_path):
    (tmp_path / "steps.tsv").write_text("cuda_tests\tok\t40\t-\n"
                                        "gpu_preset\ttimed out at 300 s\t300\t6000,12000\n")
    # by hand: tiny 1500 steps in 50 s = 30.0 steps/s, its full 6000 take 200 s; llm 3000 steps in
    # 120 s = 25.0 steps/s, its full 12000 take 480 s; so at full length the run would take
    # 300 + 200 - 50 + 480 - 120 = 810 s (at least: this one timed out)
    (tmp_path / "gpu_preset.log").write_text(
        "pretrain  : tiny (small), 1,000 params, 1500 steps, 50.0s -> x\n"
        "pretrain  : llm (medium), 2,000,000 params, 3000 steps, 120.0s -> y\n")
    (tmp_path / "gpu_preset").mkdir()
    (tmp_path / "gpu_preset" / "results.json").write_text(
        json.dumps({"provenance": {"peak_memory_bytes": 3 * 2**30}}))
    done = gpu_check(["--table", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert rows["cuda_tests"] == ["ok", "40", "-", "-", "-"]
    assert rows["gpu_preset"] == ["timed out at 300 s", "300", "30.0", "25.0", "3072 MiB"]
    assert ("gpu_preset: pretraining ran tiny 1500 of 6000 steps at 30.0 steps/s, llm 3000 of "
            "12000 steps at 25.0 steps/s; at full length the run extrapolates to 300 + 6000 / 30.0 "
            "- 50 + 12000 / 25.0 - 120 = 810 s (timed out at 300 s)") in done.stdout
