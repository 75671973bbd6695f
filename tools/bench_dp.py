"""
tools/bench_dp.py -- how much does privacy cost per step? A plain LoRA step vs a DP-SGD step
(clip, noise, Adam) for the TinyLM and LLM presets: with dp.py's per-example gradients (one pass),
and, for comparison, with the torch.func way of getting them.

    python tools/bench_dp.py                  # on the CPU, one thread
    python tools/bench_dp.py --device=cuda    # on a GPU

It lives here, above both, because it needs dp.py (the DP-SGD step) and tinylm.py (the models)
and tinylm.py already imports dp.py: the library modules import one way only.
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import tinylm
from config.presets import MODEL_PRESETS, parse_options
from torch.func import functional_call, grad, vmap

from dp import dp_sgd_step, per_sample_grads

ROUNDS = 120   # timed rounds of each kind of step ...
WARMUP = 10    # ... after this many untimed warm-up rounds


def clock(device):
    """Seconds now -- on a GPU once the work queued so far is done: its kernels run
    asynchronously."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def torch_func_grads(model, x, y, mask):
    """dp.per_sample_grads' {name: (B, *param.shape)} the torch.func way, for comparison only:
    `grad` differentiates the loss of ONE example, and `vmap` maps that over the batch. It works
    for any model (dp.per_sample_grads needs each trainable tensor in a layer with
    per_example_grads), at ~1.6-1.8x the time of a plain step."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def example_loss(params, x1, y1, m1):
        # inside vmap x1 is one example (T,); the model wants a batch: (T,) -> (1, T)
        _, loss = functional_call(model, (params, frozen, buffers), (x1[None], y1[None], m1[None]))
        return loss

    return vmap(grad(example_loss), in_dims=(None, 0, 0, 0))(trainable, x, y, mask)


def median_step_times(preset, x, y, mask, n_vocab, device="cpu", rounds=ROUNDS, warmup=WARMUP):
    """Median seconds of a plain step and of a DP-SGD step on each path. Interleaved: each
    round times one step of each kind, in a rotating order, so machine load hits all alike."""
    torch.manual_seed(0)
    cfg = tinylm.GPTConfig(**{**MODEL_PRESETS[preset].__dict__, "vocab_size": n_vocab})
    model = tinylm.add_lora(tinylm.GPT(cfg).to(device))
    x = x.to(device)
    y = y.to(device)
    mask = mask.to(device)
    opt = torch.optim.Adam(tinylm.lora_parameters(model), lr=1e-3)
    g = torch.Generator().manual_seed(0)   # on the CPU, as in training: the noise is drawn there

    def plain():
        _, loss = model(x, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def private(per_sample):
        return lambda: dp_sgd_step(model, opt, x, y, mask, clip=1.0, noise_multiplier=1.0,
                                   expected_batch_size=32, generator=g, per_sample=per_sample)

    steps = [("plain", plain), ("one pass", private(per_sample_grads)),
             ("torch.func", private(torch_func_grads))]
    times = {name: [] for name, _ in steps}
    for r in tqdm(range(warmup + rounds), desc=preset, leave=False):
        for name, step in steps[r % 3:] + steps[:r % 3]:
            t0 = clock(device)
            step()
            if r >= warmup:
                times[name].append(clock(device) - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


@dataclass
class BenchOptions:
    device: str = "cpu"


def main(argv):
    device = parse_options(BenchOptions(), argv, __doc__).device
    torch.set_num_threads(1)  # as train.py's fine-tuning workers; steadier on a busy 2-core machine
    enc = data.get_tokenizer()
    lines = data.lines_from(data.PAIRS, data.TASK_MIXTURE, 32, np.random.default_rng(0))
    x, y, mask = data.encode_lines(lines, enc)  # (32, T) each
    print(f"plain step vs DP-SGD step (clip, noise, Adam), LoRA, batch of {len(x)} lines, "
          f"torch.set_num_threads(1), device {device}, median of {ROUNDS} interleaved steps each")
    for preset in ("tiny", "llm"):
        t = median_step_times(preset, x, y, mask, enc.n_vocab, device)
        print(f"{preset:>4} preset: plain {1e3 * t['plain']:5.1f} ms | "
              f"DP-SGD one pass {1e3 * t['one pass']:5.1f} ms = {t['one pass'] / t['plain']:.2f}x "
              f"| DP-SGD torch.func {1e3 * t['torch.func']:5.1f} ms = "
              f"{t['torch.func'] / t['plain']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
