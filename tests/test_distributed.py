"""torchrun on the CPU (Gloo, one thread per rank), at the tests' toy size: a two-node job simulated
on this machine gives one process's pretraining (data-parallel, up to float sums), shadow pairs and
table; two ranks on one machine pretrain on rank 0 alone, giving one process's base models exactly;
a rank that fails or hangs ends the job fast, with a message naming the rank and the stage, and the
finished stages stay on disk."""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_RUN

import data
import train
from config.presets import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port():
    """A localhost port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(launcher, script, args, out):
    """A torchrun launch of `script` with the toy run's options, out and cache in `out`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen(TORCHRUN + launcher + [script] + TINY_RUN + [f"--out={out}"] + args,
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(job, timeout):
    """A launched job's (returncode, stderr) once it ends; a blank exercise in its code (a student
    copy, EXERCISES.md) is raised here, so that the test skips as the in-process tests do."""
    try:
        _, stderr = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:   # torchrun ends its ranks on SIGTERM
            job.terminate()
            job.wait()
    if blank := re.search(r"NotImplementedError: (exercise \w+:.*)", stderr):
        raise NotImplementedError(blank.group(1))
    return job.returncode, stderr


def stage_file(out, stage):
    """The one file of `stage` in a run's folder."""
    (path,) = glob.glob(os.path.join(out, f"{stage}-*[0-9a-f].pt"))
    return path


def table(results):
    """{(client, method): score} of a results.json."""
    return {(c["name"], m): v for c in results["clients"] for m, v in c["scores"].items()}


def test_two_nodes_match_one_process(tmp_path):
    """Two torchrun launches of one rank each (--nnodes=2, c10d rendezvous on localhost) against one
    process: the same base models up to float sums; from those base models, the same shadow pairs
    and client updates to 1e-6 relative (the ranks' chunks are those of --workers=2, the process's
    of --workers=1), and the same table within 0.02."""
    out = str(tmp_path / "two_nodes")
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=localhost:{free_port()}", "--rdzv_id=gradtx_test"]
    nodes = [launch(launcher, "train.py", ["--dist_timeout=60"], out) for _ in range(2)]
    try:
        cfg = parse_args(TINY_RUN + [f"--out={tmp_path}"])
        task = data.make_task(cfg.task, cfg.seed)
        for who in ("tiny", "llm"):   # meanwhile, one process's base models
            train.pretrain_base(cfg, task, who, str(tmp_path / f"{who}.pt"), "cpu")
    finally:
        ends = [finished(node, timeout=300) for node in nodes]
    for returncode, stderr in ends:
        assert returncode == 0, stderr[-3000:]
    for who in ("tiny", "llm"):   # DDP: each rank half of every batch, the gradients averaged
        a = torch.load(tmp_path / f"{who}.pt", weights_only=True)["state_dict"]
        b = torch.load(stage_file(out, f"pretrain_{who}"), weights_only=True)["state_dict"]
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    single = str(tmp_path / "one")
    os.makedirs(single)
    for who in ("tiny", "llm"):   # the ranks' base models, so that only the fine-tunes differ
        shutil.copy(stage_file(out, f"pretrain_{who}"), single)
    expected = train.main(TINY_RUN + [f"--out={single}"])
    for stage in ("shadow", "clients"):
        a = [r for chunk in torch.load(stage_file(single, stage), weights_only=True)["results"] for r in chunk]
        b = [r for chunk in torch.load(stage_file(out, stage), weights_only=True)["results"] for r in chunk]
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    with open(os.path.join(out, "results.json")) as f:
        got = table(json.load(f))
    want = table(expected)
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) <= 0.02


def one_process_base_models(folder):
    """Both base models of the toy run pretrained in this process with two threads (torchrun's
    rank 0 on one CPU machine takes its own thread and the other rank's), saved in `folder`."""
    os.makedirs(folder)
    cfg = parse_args(TINY_RUN + [f"--out={folder}"])
    task = data.make_task(cfg.task, cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for who in ("tiny", "llm"):
            train.pretrain_base(cfg, task, who, str(folder / f"{who}.pt"), "cpu")
    finally:
        torch.set_num_threads(threads)


FAULT = """import os, sys, time
import torch
import tinylm, train
real = tinylm.finetune_many
def faulty(*args, **kwargs):   # rank 1's first fine-tunes {how}
    if os.environ["RANK"] == "1":
        {action}
    return real(*args, **kwargs)
tinylm.finetune_many = faulty
real_pretrain = tinylm.pretrain
def pretrain(*args, **kwargs):   # who pretrains, data-parallel or not, with how many threads
    print(f"PRETRAIN rank={{os.environ['RANK']}} data_parallel={{kwargs.get('ranks') is not None}} "
          f"threads={{torch.get_num_threads()}}", file=sys.stderr, flush=True)
    return real_pretrain(*args, **kwargs)
tinylm.pretrain = pretrain
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("how, action, message", [
    ("fail", "raise RuntimeError('a broken rank')",
     "rank 1 of 2 failed in stage 'shadow runs': RuntimeError: a broken rank"),
    ("hang", "time.sleep(600)",
     "rank 0 of 2 failed in stage 'shadow runs': no answer from the other ranks: one of them "
     "failed, or hangs past --dist_timeout=12s")])
def test_a_failed_or_hung_rank_ends_the_job(tmp_path, how, action, message):
    """A rank that raises, or never answers, in the shadow stage: the job ends within the timeout
    with the rank and stage named, and the finished pretraining stays cached -- one process's base
    models: rank 0 pretrained them alone with both ranks' threads (two threads may sum in another
    order from run to run, so the weights agree up to float sums, as in the two-node test)."""
    script = tmp_path / "faulty.py"
    script.write_text(FAULT.format(how=how, action=action))
    out = str(tmp_path / "run")
    t0 = time.time()   # the toy stages take a second or two: 12 s is ample, and what a hang costs
    job = launch(["--standalone", "--nproc_per_node=2"], str(script), ["--dist_timeout=12"], out)
    returncode, stderr = finished(job, timeout=150)
    assert returncode != 0
    assert message in stderr, stderr[-3000:]
    assert time.time() - t0 < 120
    pretrained = re.findall(r"PRETRAIN rank=(\d) data_parallel=(\w+) threads=(\d+)", stderr)
    assert pretrained == [("0", "False", "2")] * 2, pretrained   # tiny, then llm: rank 0 alone
    if how == "fail":   # one process's base models, with the threads of both ranks
        one_process_base_models(tmp_path / "one")
    for who in ("tiny", "llm"):   # one CPU machine: rank 0 pretrained alone, as one process does
        ranks_made = torch.load(stage_file(out, f"pretrain_{who}"), weights_only=True)
        if how == "fail":
            one = torch.load(tmp_path / "one" / f"{who}.pt", weights_only=True)
            for name, t in one["state_dict"].items():
                torch.testing.assert_close(ranks_made["state_dict"][name], t, rtol=1e-4, atol=1e-5,
                                           msg=name)
