"""The GPU path: the toy-sized protocol on CUDA (arith with DP-SGD, groups and the weak baselines; the
text task), each run twice to check that a GPU run is deterministic, and the random draws that must not
depend on the device (batches, DP noise, sampling: all made on CPU generators). Skipped without CUDA.

A GPU's float kernels differ from a CPU's: a CUDA run is not compared with a CPU run number for number.

Run:  python -m pytest tests/test_cuda.py -q     (on a machine with a CUDA GPU)
"""
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

import data
import dp
import tinylm
import train
from config import stages

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def restore_determinism_flags():
    # train.run switches on deterministic algorithms for CUDA, process-wide: leave the process as it was
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def twice_on_the_gpu(tmp_path, options):
    """Two runs from empty caches (nothing shared): the results.json of each."""
    results = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        train.main(TINY_RUN + ["--device=cuda", f"--out={out}"] + options)
        with open(out / "results.json") as f:
            results.append(json.load(f))
    return results


def test_arith_with_dp_groups_and_weak_baselines_is_deterministic_on_the_gpu(tmp_path):
    options = ["--dp_epsilon=1", "--group_size=2", "--shadow_dp_draws=2", "--weak_baselines=true"]
    first, second = twice_on_the_gpu(tmp_path, options)
    assert first["provenance"]["device"].startswith("cuda") and first["provenance"]["device_name"]
    assert {"tinylm_dp", "gradtx_group", "w2s", "w2s_conf", "kd"} <= set(first["clients"][0]["scores"])
    assert first["clients"] == second["clients"] and first["summary"] == second["summary"]
    # the stages went to files of their own: a CUDA-made stage never stands in for a CPU one
    cfg = train.parse_args(TINY_RUN + [f"--out={tmp_path / 'run0'}"] + options)
    task = data.make_task("arith", cfg.seed)
    on_cuda, on_cpu = (stages.stage_paths(cfg, task, train.pool_levels(cfg), d) for d in ("cuda", "cpu"))
    assert all(os.path.exists(on_cuda[s]) and not os.path.exists(on_cpu[s]) for s in on_cuda)


def test_text_task_is_deterministic_on_the_gpu(tmp_path):
    first, second = twice_on_the_gpu(tmp_path, ["--task=text", "--shadow_alpha=3"])
    assert first["metric"] == "bits_per_byte"
    assert first["clients"] == second["clients"] and first["summary"] == second["summary"]


def test_dp_finetune_draws_the_same_batches_and_noise_on_cpu_and_gpu(monkeypatch):
    """The Poisson batches and the DP noise come from the recipe's CPU generator: a GPU fine-tune
    draws exactly what a CPU fine-tune draws (the updates themselves differ by float round-off)."""
    draws = []   # every batch and every noise vector, in order, as CPU tensors

    def record(t):
        draws.append(t.cpu())
        return t

    real_sample, real_gaussian = dp.poisson_sample, dp.gaussian_noise
    monkeypatch.setattr(dp, "poisson_sample", lambda *a: record(real_sample(*a)))
    monkeypatch.setattr(dp, "gaussian_noise", lambda *a: record(real_gaussian(*a)))
    task = data.make_task("arith", 0)
    x, y, mask = task.encode(task.public_examples(64, np.random.default_rng(0)))
    recipe = tinylm.Recipe(steps=5, lr=1e-3, dp_sigma=1.0, dp_clip=1.0, dp_sample_rate=0.25)
    seen = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        cfg = tinylm.GPTConfig(vocab_size=task.enc.n_vocab, block_size=task.block_size)
        model = tinylm.add_lora(tinylm.GPT(cfg).to(device))
        update = tinylm.finetune(model, x, y, mask, recipe, seed=7)[-1]
        seen[device] = list(draws), update
        draws.clear()
    (cpu_draws, cpu_update), (gpu_draws, gpu_update) = seen["cpu"], seen["cuda"]
    assert len(cpu_draws) == len(gpu_draws) == 2 * recipe.steps     # a batch and a noise vector per step
    assert all(torch.equal(a, b) for a, b in zip(cpu_draws, gpu_draws))
    assert ((gpu_update - cpu_update).norm() / cpu_update.norm()).item() < 1e-3


def test_sampling_on_the_gpu_draws_from_the_cpu_generator():
    torch.manual_seed(0)
    model = tinylm.GPT(tinylm.GPTConfig()).eval()
    prompt = torch.tensor([[1, 2, 3]])
    tokens = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        tokens[device] = model.generate(prompt.to(device), 8, temperature=1.0,
                                        generator=torch.Generator().manual_seed(3)).cpu()
    # an untrained model's probabilities are near uniform: float round-off moving a draw across a
    # boundary between two tokens would take a uniform number within ~1e-7 of it
    assert torch.equal(tokens["cpu"], tokens["cuda"])
