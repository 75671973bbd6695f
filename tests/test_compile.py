"""Tests for nanoGPT's one-GPU switches, on a CPU: --dtype and --compile against the plain float32
step (tinylm.pretrain, gradtx.fit), steps that compile as one graph and read nothing back to the
host, batches drawn up front as a draw per step draws them, and what each switch says on a device
that cannot run it. The compile checks use torch.compile's "eager" / "aot_eager" backends (the
graph capture and the compiled backward, no C++): seconds, not the minute Inductor takes on a CPU;
GRADTX_INDUCTOR=1 adds Inductor itself (it needs a C++ compiler)."""
import functools
import os
import sys
from unittest import mock

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import gradtx
import tinylm
from config import presets, stages

STEPS = 50
TORCH_COMPILE = torch.compile


@pytest.fixture(scope="module")
def task():
    return data.make_task("arith", 0)


def gpt_config(task):
    return tinylm.GPTConfig(vocab_size=task.enc.n_vocab, block_size=task.block_size, n_layer=1,
                            n_head=2, n_embd=16)


def pretrained_loss(task, steps=STEPS, **switches):
    """The held-out loss (float32, eager) of a tiny GPT after `steps` pretraining steps."""
    indices = task.pretrain_draws(16, steps, np.random.default_rng(0))
    model = tinylm.pretrain(gpt_config(task), task.pretrain_rows, indices, lr=3e-3, seed=0,
                            **switches)
    with torch.no_grad():
        return model(*task.pretrain_rows(torch.arange(512)))[1].item()


def with_backend(backend):
    """torch.compile as tinylm.compiled calls it, on another backend."""
    return mock.patch.object(torch, "compile", functools.partial(TORCH_COMPILE, backend=backend))


def translator_pairs(n=96, seed=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, 12, generator=g)
    Y = (X.flatten(1) @ torch.randn(24, 48, generator=g) / 5).view(n, 3, 16)
    return X, Y


def fitted_translator(steps=20, **switches):
    """A small Grad-Transformer after `steps` fit steps (no dropout: compiled dropout draws
    other numbers), its weights and history."""
    torch.manual_seed(0)
    cfg = gradtx.GTConfig(n_src=2, d_src=12, n_tgt=3, d_tgt=16, d_model=16, n_head=4, dropout=0.0)
    model = gradtx.GradTransformer(cfg)
    X, Y = translator_pairs()
    fitted = gradtx.fit(model, X[:64], Y[:64], X[64:], Y[64:], steps=steps, lr=3e-3,
                        batch_size=16, eval_every=steps, **switches)
    return model, fitted


# -----------------------------------------------------------------------------
# precision and compilation against the plain step


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_pretraining_is_within_2_percent_of_float32(task, dtype):
    plain = pretrained_loss(task)
    assert plain < 4.5   # it learned something: the comparison means something
    assert pretrained_loss(task, dtype=dtype) == pytest.approx(plain, rel=0.02)


def test_compiled_pretraining_is_within_1e_4_of_eager(task):
    plain = pretrained_loss(task)
    with with_backend("aot_eager"):   # the forward and its backward traced and compiled
        assert pretrained_loss(task, compile=True) == pytest.approx(plain, abs=1e-4)


def test_compiled_and_bfloat16_translator_fit_follows_the_plain_one():
    plain, fitted = fitted_translator()
    with with_backend("aot_eager"):
        compiled, _ = fitted_translator(compile=True)
    _, half = fitted_translator(dtype="bfloat16")
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dict(compiled.named_parameters())[name], p, atol=1e-4, rtol=0)
    # the held-out error after the steps: lower than at the start, and bfloat16's within 2%
    assert fitted["history"][-1]["val_mse"] < fitted["history"][0]["val_mse"] - 0.02
    assert half["history"][-1]["val_mse"] == pytest.approx(fitted["history"][-1]["val_mse"],
                                                           rel=0.02)


@pytest.mark.skipif(os.environ.get("GRADTX_INDUCTOR") != "1",
                    reason="optional extra: Inductor compiles for ~1 minute on a CPU; "
                           "GRADTX_INDUCTOR=1 runs it")
@pytest.mark.skipif(presets.cpp_compiler() is None,
                    reason="optional extra: torch.compile's Inductor needs a C++ compiler and "
                           "none was found")
def test_inductor_pretraining_is_within_1e_4_of_eager(task):
    assert pretrained_loss(task, steps=20, compile=True) == pytest.approx(
        pretrained_loss(task, steps=20), abs=1e-4)


# -----------------------------------------------------------------------------
# steps that can be captured: one graph each, no host read a step, batches drawn up front


def test_each_step_compiles_as_one_graph():
    # fullgraph=True (tinylm.compiled): a graph break would raise, not fall back. A fresh task:
    # its corpus is encoded (tokenizer calls, no graph) when the draws are made, not in a step
    pretrained_loss(data.make_task("arith", 0), steps=1)   # a blank exercise raises here, eagerly
    fitted_translator(steps=1)
    with with_backend("eager"):
        pretrained_loss(data.make_task("arith", 0), steps=3, compile=True)
        fitted_translator(steps=3, compile=True)


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def host_reads(run):
    """How many times run() reads a tensor back to the host (each way a GPU would wait)."""
    calls = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return read
    patches = [mock.patch.object(torch.Tensor, n, counted(n)) for n in HOST_READS]
    for p in patches:
        p.start()
    try:
        run()
    finally:
        for p in patches:
            p.stop()
    return len(calls)


class CudaAdamW(torch.optim.AdamW):
    """AdamW as the steps make it on CUDA: fused, its step count on the device (the CPU's
    single-tensor AdamW reads its step count, a CPU tensor there, on the host)."""

    def __init__(self, params, *args, fused=None, **kwargs):
        super().__init__(params, *args, fused=True, **kwargs)


def test_no_step_reads_the_host_only_the_logging_does(task):
    # the loss is read every log_every (pretraining) / eval_every (fit) steps: twice the steps
    # between reads, the same reads; any read inside a step would add one a step
    def pretraining(steps):
        indices = task.pretrain_draws(8, steps, np.random.default_rng(0))
        return host_reads(lambda: tinylm.pretrain(gpt_config(task), task.pretrain_rows, indices,
                                                  lr=3e-3, seed=0, log_every=steps))
    with mock.patch.object(torch.optim, "AdamW", CudaAdamW):
        assert pretraining(5) == pretraining(10) == 1
        assert host_reads(lambda: fitted_translator(steps=5)) == host_reads(
            lambda: fitted_translator(steps=10))


def test_pretraining_batches_drawn_up_front_are_the_per_step_draws(task):
    up_front = task.pretrain_draws(8, 5, data.stream(0, "pretrain batches"))
    rng = data.stream(0, "pretrain batches")
    for step in range(5):
        one = task.pretrain_batch(8, rng)
        for t, u in zip(one, task.pretrain_rows(up_front[step])):
            assert torch.equal(t, u)


def test_translator_batches_drawn_up_front_are_the_per_step_draws():
    g = torch.Generator().manual_seed(3)
    per_step = torch.stack([torch.randint(100, (16,), generator=g) for _ in range(7)])
    assert torch.equal(torch.randint(100, (7, 16), generator=torch.Generator().manual_seed(3)),
                       per_step)


# -----------------------------------------------------------------------------
# devices, options and cache keys


def test_each_switch_works_or_says_why_not_on_mps():
    presets.check_switches("mps", compile=False, dtype="bfloat16")
    presets.check_switches("cuda", compile=True, dtype="float16")
    with pytest.raises(SystemExit, match="torch.compile is not supported on MPS"):
        presets.check_switches("mps", compile=True, dtype="float32")
    with pytest.raises(SystemExit, match="float16 with --device=mps.*expected --dtype=bfloat16"):
        presets.check_switches("mps", compile=False, dtype="float16")


def test_compiling_on_a_cpu_without_a_cpp_compiler_says_so(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(SystemExit, match="needs a C\\+\\+ compiler"):
        presets.check_switches("cpu", compile=True, dtype="float32")
    presets.check_switches("cpu", compile=False, dtype="float16")


def test_dtype_is_checked_and_switches_join_the_cache_key(task):
    with pytest.raises(SystemExit, match="--dtype=half: expected one of float32, bfloat16"):
        presets.parse_args(["--dtype=half"])
    cfg = presets.parse_args(["--preset=smoke"])
    assert stages.numerics(cfg, "cpu") == []   # float32 eager on a CPU: the keys as before
    assert stages.numerics(cfg, "cuda") == ["tf32"]
    plain = stages.stage_paths(cfg, task)
    for switch in (["--dtype=bfloat16"], ["--compile=True"]):
        other = stages.stage_paths(presets.parse_args(["--preset=smoke", *switch]), task)
        assert all(other[s] != plain[s] for s in plain)
    assert presets.PRESETS["gpu"].compile and not presets.PRESETS["cpu"].compile
