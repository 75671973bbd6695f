"""
tools/bench_batched.py -- K LoRA fine-tunes of one frozen base, one by one (tinylm.finetune) or as
one computation (tinylm.finetune_many): wall time and ATen operator calls, for the default
preset's TinyLM and LLM, without and with DP-SGD. The shadow stage is this work; on a GPU it is
launch-bound, and every operator call but a view (metadata only) launches a kernel: fewer calls
is the point.

    python tools/bench_batched.py                            # K = 16 runs of 100 steps, 2 threads
    python tools/bench_batched.py --steps=20 --threads=1     # quicker
    python tools/bench_batched.py --device=cuda --K=48       # on a GPU

The data are random tokens shaped like the default task's (N = 512 examples of T = 10 tokens, the
last 5 the answer), the recipe the default one (batch 32 or Poisson rate 32/512, lr 3e-3, LoRA rank
4, snapshots every 10 steps along the tail). Operators are counted in a second pass of each path,
under a TorchDispatchMode (counting slows them down); "max rel diff" is the largest relative
difference between a run's batched and one-by-one snapshots.
"""
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tinylm
from config.presets import MODEL_PRESETS, parse_options

N = 512
T = 10
ANSWER = 5


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operator calls that run below autograd and vmap, what a device executes:
    all of them, and the kernels -- all but views (view, transpose, expand, ...: metadata only)."""

    def __init__(self):
        super().__init__()
        self.calls = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.calls += 1
            self.kernels += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
        return func(*args, **(kwargs or {}))


def clock(device):
    """Seconds now -- on a GPU once the work queued so far is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def random_datasets(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T) >= T - ANSWER).float().expand(N, T)
    return [(torch.randint(257, (N, T), generator=g), torch.randint(257, (N, T), generator=g), mask)
            for _ in range(K)]


def measure(model, datasets, recipe, snapshots, device):
    """{path: (seconds, OperatorCount, snapshots)} for K runs one by one and batched, each after an
    untimed warm-up of 2 steps."""
    seeds = list(range(len(datasets)))
    paths = {"one by one": lambda r: [tinylm.finetune(model, *d, r, s, snapshot_steps=snapshots)
                                      for d, s in zip(datasets, seeds)],
             "batched": lambda r: tinylm.finetune_many(model, datasets, r, seeds,
                                                       snapshot_steps=snapshots)}
    out = {}
    for name, path in paths.items():
        path(replace(recipe, steps=2))
        t0 = clock(device)
        updates = path(recipe)
        seconds = clock(device) - t0
        with OperatorCount() as count:
            path(recipe)
        out[name] = (seconds, count, updates)
    return out


@dataclass
class BenchOptions:
    K: int = 16           # fine-tunes side by side
    steps: int = 100
    device: str = "cpu"
    threads: int = 2


def main(argv):
    o = parse_options(BenchOptions(), argv, __doc__)
    K = o.K
    steps = o.steps
    device = o.device
    threads = o.threads
    torch.set_num_threads(threads)
    snapshots = tuple(s for s in range(steps, 0, -10)[:4][::-1])   # the default: 4, 10 apart
    datasets = random_datasets(K)
    recipes = {"no": tinylm.Recipe(steps=steps), "yes": tinylm.Recipe(
        steps=steps, dp_sigma=1.0, dp_clip=1.0, dp_sample_rate=32 / N)}
    print(f"K = {K} fine-tunes of {steps} steps, N = {N}, T = {T}, device {device}, "
          f"torch.set_num_threads({threads}), load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':>5} {'DP':>3} | {'one by one':>10} {'batched':>8} {'speedup':>7} | "
          f"{'ATen calls: one by one':>22} {'batched':>9} {'fewer':>6} | "
          f"{'kernels: one by one':>19} {'batched':>9} {'fewer':>6} | max rel diff")
    for preset in ("tiny", "llm"):
        torch.manual_seed(0)
        model = tinylm.add_lora(tinylm.GPT(MODEL_PRESETS[preset]).to(device), rank=4)
        for dp_on, recipe in recipes.items():
            r = measure(model, datasets, recipe, snapshots, device)
            t1, n1, u1 = r["one by one"]
            tK, nK, uK = r["batched"]
            diff = max(((a - b).norm() / b.norm()).item() for ra, rb in zip(uK, u1)
                       for a, b in zip(ra, rb))
            print(f"{preset:>5} {dp_on:>3} | {t1:>9.1f}s {tK:>7.1f}s {t1 / tK:>6.2f}x | "
                  f"{n1.calls:>22,} {nK.calls:>9,} {n1.calls / nK.calls:>5.1f}x | "
                  f"{n1.kernels:>19,} {nK.kernels:>9,} {n1.kernels / nK.kernels:>5.1f}x | "
                  f"{diff:.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
