"""
dp.py -- differential privacy for the client's update, written from scratch (no opacus).

The paper (Gradient Transformer, arXiv 2605.27591) lets a client upload only its TinyLM
update vector. Its official code protects that upload in two ways, both here:

  (a) DP-SGD on the client's LoRA fine-tuning (Abadi et al. 2016): Poisson-sample a batch,
      compute one gradient per example, clip each to L2 norm C, sum, add N(0, (sigma*C)^2),
      divide by the expected batch size.  An RDP accountant (Mironov, Talwar, Zhang 2019)
      turns (sample rate q, noise multiplier sigma, steps) into an (epsilon, delta)
      guarantee, and `noise_multiplier_for` inverts it.
  (b) output perturbation of the finished update vector (Gaussian mechanism): clip its
      L2 norm to C and add N(0, s^2) with s = C * sqrt(2 ln(1.25/delta)) / epsilon.

A model here is any nn.Module called as `model(x, y, mask) -> (logits, loss)` where x, y are
(B, T) token ids, mask (B, T) selects the answer tokens and loss is the masked mean
cross-entropy; its trainable parameters (requires_grad=True) are the LoRA matrices.

Test it:  python -m pytest tests/test_dp.py -q
Try it:   python -c "import dp; print(dp.compute_epsilon(0.04, 1.5, 2250, 1e-5))"  # 7.329...
Time it:  python dp.py     # one DP-SGD step vs one ordinary step, TinyLM preset, same batch
"""

import math

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

# -----------------------------------------------------------------------------
# (a) DP-SGD


def poisson_sample(n, sample_rate, generator=None):
    """Indices of a Poisson-sampled batch: each of the n examples joins with probability q.

    The batch size is random and may be 0; the accountant's analysis assumes exactly this.
    """
    _check_rate(sample_rate)
    device = generator.device if generator is not None else "cpu"
    keep = torch.rand(n, generator=generator, device=device) < sample_rate  # (n,) bool
    return keep.nonzero().squeeze(1)  # (B,) sorted indices


def per_sample_grads(model, x, y, mask):
    """One gradient per example: {name: (B, *param.shape)} over the trainable parameters.

    torch.func makes the model a pure function of its parameters, `grad` differentiates the
    loss of ONE example, and `vmap` maps that over the batch (instead of B backward passes).
    """
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def example_loss(params, x1, y1, m1):
        # inside vmap x1 is one example (T,); the model wants a batch: (T,) -> (1, T)
        _, loss = functional_call(model, (params, frozen, buffers), (x1[None], y1[None], m1[None]))
        return loss

    if len(x) == 0:  # vmap cannot map over an empty batch
        return {n: p.new_zeros((0, *p.shape)) for n, p in trainable.items()}
    # randomness="different": dropout, if any, draws its own mask for each example
    return vmap(grad(example_loss), in_dims=(None, 0, 0, 0), randomness="different")(trainable, x, y, mask)


def dp_sgd_step(model, optimizer, x, y, mask, clip, noise_multiplier, expected_batch_size, generator=None):
    """One DP-SGD step on an already Poisson-sampled batch (B may be 0: then the step is noise).

    g = ( sum_i g_i * min(1, C / (||g_i|| + 1e-6))  +  N(0, (sigma*C)^2 I) ) / (q*N)
    Writes g into p.grad of every trainable parameter and calls optimizer.step().
    Returns the mean per-example gradient norm before clipping (nan for an empty batch),
    which is what one looks at to choose C.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0 (may be inf when noise_multiplier is 0), got {clip}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and math.isinf(clip):
        raise ValueError("clip must be finite when noise_multiplier > 0 (the noise is sigma*C)")
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")

    grads = per_sample_grads(model, x, y, mask)
    # the norm of an example's gradient is taken over ALL trainable tensors together:
    # {(B, *shape)} -> (B, n_tensors) -> (B,)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # (B,); C = inf gives exactly 1

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = torch.einsum("b,b...->...", factor, grads[name])  # clipped sum, (*shape)
        if noise_multiplier > 0:
            g = g + _gaussian(p.shape, noise_multiplier * clip, p, generator)
        # divide by the EXPECTED batch size q*N, not the realised one: this is what the
        # accountant assumes (the realised size depends on who is in the batch, so it leaks)
        p.grad = (g / expected_batch_size).to(p.dtype)
    optimizer.step()
    return norms.mean().item()


def _gaussian(shape, std, like, generator):
    """N(0, std^2) noise shaped `shape`, drawn on the generator's device (so a CPU generator
    gives the same noise whatever device the model is on), returned on `like`'s device."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return (noise * std).to(like.device)


# -----------------------------------------------------------------------------
# (a') the RDP accountant for the sampled Gaussian mechanism
# One DP-SGD step with Poisson rate q and noise sigma is (alpha, rdp(alpha))-RDP for every
# order alpha > 1; RDP composes by adding over steps; at the end we convert to (eps, delta)
# and keep the best alpha. Everything is in log space: the terms reach exp(1000).

DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # as opacus


def _log_add(a, b):  # log(e^a + e^b)
    lo, hi = min(a, b), max(a, b)
    return hi if lo == -math.inf else math.log1p(math.exp(lo - hi)) + hi


def _log_sub(a, b):  # log(e^a - e^b), a >= b
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    try:
        return math.log(math.expm1(a - b)) + b
    except OverflowError:
        return a


def _log_erfc(x):
    if x < 25:  # math.erfc is accurate until it underflows (erfc(27) ~ 1e-319)
        return math.log(math.erfc(x))
    # Laurent series of the tail: erfc(x) ~ exp(-x^2 - .5/x^2 + .625/x^4 ...) / (x sqrt(pi))
    return -math.log(math.pi) / 2 - math.log(x) - x**2 - 0.5 * x**-2 + 0.625 * x**-4 - 37 / 24 * x**-6 + 353 / 64 * x**-8


def _log_a_int(q, sigma, alpha):
    """log A_alpha for integer alpha (Mironov et al. 2019, Sec. 3.3): a binomial sum."""
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = math.log(math.comb(alpha, i)) + i * math.log(q) + (alpha - i) * math.log(1 - q)
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q, sigma, alpha):
    """log A_alpha for fractional alpha: two infinite series split at z0, summed until the
    terms drop below e^-30. The binomial coefficient changes sign once i > alpha + 1."""
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_coef, sign = 0.0, 1.0  # binom(alpha, 0) = 1, then updated by the ratio (alpha - i) / (i + 1)
    i = 0
    while True:
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if sign > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)
        ratio = (alpha - i) / (i + 1)
        log_coef += math.log(abs(ratio))
        sign *= math.copysign(1.0, ratio)
        i += 1


def compute_rdp(sample_rate, noise_multiplier, steps, orders=None):
    """RDP of `steps` sampled Gaussian mechanisms at each order: (len(orders),) array."""
    _check_rate(sample_rate)
    _check_steps(steps)
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    orders = DEFAULT_ORDERS if orders is None else orders
    if any(not a > 1 for a in orders):
        raise ValueError(f"orders must all be > 1, got {orders}")
    q, sigma = sample_rate, noise_multiplier

    def one_step(alpha):
        if q == 1.0:  # no sampling: the plain Gaussian mechanism
            return alpha / (2 * sigma**2)
        if float(alpha).is_integer():
            return _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
        return _log_a_frac(q, sigma, alpha) / (alpha - 1)

    return np.array([one_step(a) for a in orders]) * steps  # RDP adds up over steps


def rdp_to_epsilon(orders, rdp, delta):
    """(alpha, rdp)-RDP -> (eps, delta)-DP with the improved conversion of Balle et al. 2020
    (Thm 21): eps = rdp - (log delta + log alpha)/(alpha - 1) + log((alpha - 1)/alpha),
    minimised over alpha. Returns (epsilon, best alpha)."""
    _check_delta(delta)
    a, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    eps = rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(a[best])


def compute_epsilon(sample_rate, noise_multiplier, steps, delta, orders=None):
    """The epsilon spent by `steps` DP-SGD steps at rate q and noise sigma, for this delta."""
    _check_delta(delta)
    _check_steps(steps)
    if steps == 0:  # nothing was released (the conversion alone would give eps > 0)
        return 0.0
    orders = DEFAULT_ORDERS if orders is None else orders
    rdp = compute_rdp(sample_rate, noise_multiplier, steps, orders)
    return rdp_to_epsilon(orders, rdp, delta)[0]


def noise_multiplier_for(target_epsilon, sample_rate, steps, delta, orders=None, tol=0.01):
    """The smallest sigma (to `tol`) whose epsilon is <= target. Epsilon falls as sigma grows,
    so bisect, keeping `hi` always on the safe side: the answer never overshoots the target."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    _check_rate(sample_rate)
    _check_steps(steps)
    _check_delta(delta)
    orders = DEFAULT_ORDERS if orders is None else orders
    # even infinite noise (rdp = 0) leaves the conversion's own term: ~0.103 at delta = 1e-5
    # with the default orders (largest 63); larger orders push this floor down
    floor, _ = rdp_to_epsilon(orders, np.zeros(len(orders)), delta)
    if target_epsilon <= floor:
        raise ValueError(f"target_epsilon={target_epsilon} is below {floor:.4f}, the smallest epsilon these "
                         f"orders can certify at delta={delta}; pass larger orders (e.g. up to 512)")
    eps = lambda sigma: compute_epsilon(sample_rate, sigma, steps, delta, orders)  # noqa: E731
    lo, hi = 0.0, 1.0  # invariant: eps(lo) > target >= eps(hi) (sigma -> 0 gives eps -> inf)
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ValueError(f"target_epsilon={target_epsilon} is out of reach for {steps} steps at rate {sample_rate}")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


def _check_rate(sample_rate):
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")


def _check_delta(delta):
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


# -----------------------------------------------------------------------------
# (b) output perturbation of the uploaded update vector (the Gaussian mechanism)


def gaussian_sigma(epsilon, delta, clip):
    """Noise std for an L2-sensitivity-C release: C * sqrt(2 ln(1.25/delta)) / epsilon.
    (Dwork & Roth, Thm A.1; the proof covers epsilon < 1, the paper's code uses 0.1.)"""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    _check_delta(delta)
    if not 0 < clip < math.inf:
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    return clip * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def perturb_update(update, epsilon, delta, clip, generator=None):
    """Clip the whole update's L2 norm to C (sensitivity C), then add Gaussian noise."""
    sigma = gaussian_sigma(epsilon, delta, clip)
    if not torch.isfinite(update).all():
        raise ValueError("update contains NaN or inf values; expected a finite update vector")
    norm = update.norm().item()
    clipped = update * (clip / max(norm, clip))  # scale 1 if ||u|| <= C, else norm exactly C
    return clipped + _gaussian(update.shape, sigma, update, generator)


# -----------------------------------------------------------------------------
# benchmark: what privacy costs in compute


if __name__ == "__main__":
    import time

    import data
    import tinylm

    torch.manual_seed(0)
    enc = data.get_tokenizer()
    model = tinylm.add_lora(tinylm.GPT(tinylm.GPTConfig(**{**tinylm.MODEL_PRESETS["tiny"].__dict__,
                                                         "vocab_size": enc.n_vocab})))
    lines = data.lines_from(data.all_pairs(), data.TASK_MIXTURE, 32, np.random.default_rng(0))
    x, y, mask = data.encode_lines(lines, enc)
    opt = torch.optim.Adam(tinylm.lora_parameters(model), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def plain_step():
        _, loss = model(x, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def private_step():
        dp_sgd_step(model, opt, x, y, mask, clip=1.0, noise_multiplier=1.0, expected_batch_size=32, generator=g)

    timings = {}
    for _ in range(2):  # the first round warms up; the second is measured, interleaved
        for name, step in (("plain", plain_step), ("dp-sgd", private_step)):
            t0 = time.perf_counter()
            for _ in range(50):
                step()
            timings[name] = (time.perf_counter() - t0) / 50
    print(f"TinyLM (tiny preset) with LoRA, batch of 32 lines: plain step {1e3 * timings['plain']:.1f} ms, "
          f"DP-SGD step {1e3 * timings['dp-sgd']:.1f} ms, ratio {timings['dp-sgd'] / timings['plain']:.2f}x")
