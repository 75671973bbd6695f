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

A model here is any nn.Module called as `model(x, y, mask) -> (logits, loss)` (and `model(x)`
for the logits alone) where x, y are (B, T) token ids, mask (B, T) selects the answer tokens and
loss is the masked mean cross-entropy; its trainable parameters (requires_grad=True) are the LoRA
matrices, each in a layer that can give its per-example gradients (tinylm.LoRA).

DP-SGD needs one gradient per example. `per_sample_grads` gets them all from one forward and
one backward pass over the batch, then per-example sums inside each LoRA layer
(tinylm.LoRA.per_example_grads): about the cost of a plain step. The oracle it is tested against,
a loop of single-example backward passes, lives in tests/test_dp.py.

Test it:  python -m pytest tests/test_dp.py -q
Try it:   python -c "import dp; print(dp.compute_epsilon(0.04, 1.5, 2250, 1e-5))"  # 7.329...
Time it:  python tools/bench_dp.py   # a plain step vs a DP-SGD step
Audit it: python experiments/audit.py   # an empirical lower bound on epsilon from one fine-tune
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# (a) DP-SGD


def poisson_sample(n, sample_rate, generator=None):
    """Indices of a Poisson-sampled batch: each of the n examples joins with probability q. The
    batch size is random and may be 0; the accountant's analysis assumes exactly this."""
    _check_rate(sample_rate)
    device = generator.device if generator is not None else "cpu"
    keep = torch.rand(n, generator=generator, device=device) < sample_rate  # (n,) bool
    return keep.nonzero().squeeze(1)  # (B,) sorted indices


def gaussian_noise(shape, std, like, generator=None):
    """N(0, std^2) noise shaped `shape`, with `like`'s dtype, returned on `like`'s device.

    Drawn on the generator's device, so a CPU generator gives the same noise whatever device the
    model is on. Every draw of DP noise goes through here: `dp_sgd_step`, `perturb_update`, and
    data.draw_run, which draws a whole run's DP-SGD noise up front (std 1: `clip_and_noise`
    scales it by sigma * C)."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return (noise * std).to(like.device, non_blocking=True)


def per_example_losses(logits, y, mask):
    """(B, T, vocab) logits -> (B,): each example's mean cross-entropy over its own masked tokens,
    the loss `model(x[i:i+1], y[i:i+1], mask[i:i+1])` gives. No masked tokens: loss 0 (0 / 1)."""
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # (B, T)
    m = mask.to(nll.dtype)
    return (nll * m).sum(1) / m.sum(1).clamp(min=1)


def per_sample_grads(model, x, y, mask):
    """One gradient per example, {name: (B, *param.shape)} over the trainable parameters, from ONE
    forward and ONE backward pass over the batch (~1.1x the time of a plain step).

    For a linear map, example i's weight gradient is sum_t g_t a_t^T over its tokens (input
    activations a_t, output gradients g_t): Opacus computes it from saved activations and
    backprops, and fastDP's book-keeping (Bu et al. 2023) reuses one backward pass this way
    (~1.2x non-private time). Here:
      1. forward hooks record the input and output of each layer with a trainable parameter and
         a `per_example_grads(x, grad_out)` method (tinylm.LoRA); the model runs as `model(x)`;
      2. the per-example losses L_i come from the logits (`per_example_losses`), (B,);
      3. one autograd.grad of sum_i L_i w.r.t. the recorded outputs gives every layer's g_t;
         examples do not mix (no batch norm), so row i holds dL_i/d(out) alone;
      4. each layer turns (input, g) into its per-example parameter gradients.
    Ghost norms (never forming per-example gradients) pay off only when 2T^2 < d*p: with
    T ~ 10-15 and a LoRA matrix's d*p = n_embd * rank = 256 (TinyLM) to 512 (LLM) it is a wash.
    tests/test_dp.py checks it against the oracle, a loop of single-example backward passes.
    (tinylm.finetune_many, many runs under vmap, gets its per-example gradients another way and
    says why.)
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layers = _layers_with_per_example_grads(model, trainable)
    if len(x) == 0:
        return {n: p.new_zeros((0, *p.shape)) for n, p in trainable.items()}
    logits, seen = _forward_recording(model, layers, x)
    losses = per_example_losses(logits, y, mask)                            # (B,)
    names = list(seen)
    outputs = torch.autograd.grad(losses.sum(), [seen[n][1] for n in names])  # each (B, T, n_out)
    grads = {}
    # float32 whatever the forward's autocast: privacy's arithmetic never drops to bfloat16
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        for name, g in zip(names, outputs):
            dtype = next(layers[name].parameters()).dtype   # the layer's own: float32 or 64
            inputs = seen[name][0].to(dtype)
            for p, per_example in layers[name].per_example_grads(inputs, g.to(dtype)).items():
                grads[f"{name}.{p}"] = per_example                            # (B, *shape)
    return {n: grads[n] for n in trainable}


def _layers_with_per_example_grads(model, trainable):
    """{name: layer} of the layers that hold a trainable parameter and have a
    `per_example_grads` method. Raises ValueError (no silent fallback) if a trainable parameter
    is in no such layer."""
    layers = {name: m for name, m in model.named_modules()
              if hasattr(m, "per_example_grads") and any(p.requires_grad for p in m.parameters())}
    covered = {f"{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters()}
    missing = sorted(set(trainable) - covered)
    if missing:
        raise ValueError(f"trainable parameters {missing} are in no layer with "
                         "per_example_grads(x, grad_out): give their layer one (as tinylm.LoRA "
                         "has), or pass dp_sgd_step a per_sample function of your own")
    return layers


def _forward_recording(model, layers, x):
    """logits = model(x)[0], and {layer name: (its input (B, T, n_in) detached, its output
    (B, T, n_out))} recorded by forward hooks on `layers`, which are removed again."""
    seen = {}

    def record(name):
        def hook(layer, inputs, output):
            if name in seen:  # a second call would overwrite the first one's activations
                raise ValueError(f"layer {name} ran twice in one forward pass")
            seen[name] = (inputs[0].detach(), output)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    try:
        logits, _ = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def dp_sgd_step(model, optimizer, x, y, mask, *, clip, noise_multiplier, expected_batch_size,
                generator=None, per_sample=per_sample_grads, noise=None):
    """One DP-SGD step on an already Poisson-sampled batch (B may be 0: then the step is noise).

    `clip_and_noise` of the per-example gradients into p.grad, then optimizer.step(). The
    gradients come from `per_sample(model, x, y, mask)`: `per_sample_grads`, or a function of the
    caller's (experiments/audit.py adds its canaries' gradients). Noise: `noise` (D,) N(0, 1), or
    drawn from `generator`. Returns the mean norm before clipping (nan for B = 0; it guides C),
    a 0-dim tensor on the model's device: reading it every step would make a GPU wait."""
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = per_sample(model, x, y, mask)
    # an example's gradient is ALL its trainable tensors together, laid side by side: (B, D),
    # float32 whatever the forward's autocast (the norms, the clipping and the noise too)
    flat = torch.cat([grads[n].flatten(1) for n in params], dim=1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    if noise is None and noise_multiplier > 0:
        noise = gaussian_noise(flat.shape[1:], 1.0, flat, generator)
    with torch.autocast(flat.device.type, enabled=False):
        g, norms = clip_and_noise(flat, clip, noise_multiplier, expected_batch_size, noise)
    for p, g_p in zip(params.values(), g.split([p.numel() for p in params.values()])):
        p.grad = g_p.view_as(p).to(p.dtype)
    optimizer.step()
    return norms.mean()


def clip_and_noise(flat, clip, noise_multiplier, expected_batch_size, noise):
    """The private gradient from per-example gradients flat (B, D) and N(0, 1) draws noise (D,):
        g = ( sum_i g_i * min(1, C / (||g_i|| + 1e-6))  +  sigma*C * noise ) / (q*N)
    Returns (g (D,), the norms before clipping (B,)). A row of zeros adds exactly nothing."""
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not clip > 0 or (noise_multiplier > 0 and math.isinf(clip)):
        raise ValueError(f"clip must be > 0, and finite when noise_multiplier > 0, got {clip}")
    ### BEGIN SOLUTION clip_and_noise
    norms = flat.norm(dim=1)                          # (B,)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)   # (B,); C = inf gives exactly 1
    g = factor @ flat                                 # (D,): the sum of the clipped gradients
    if noise_multiplier > 0:
        g = g + noise * (noise_multiplier * clip)     # N(0, (sigma*C)^2 I), added once to the sum
    # divide by the EXPECTED batch size q*N, not the realised one: this is what the
    # accountant assumes (the realised size depends on who is in the batch, so it leaks)
    g = g / expected_batch_size
    ### END SOLUTION
    return g, norms


# -----------------------------------------------------------------------------
# (a') the RDP accountant for the sampled Gaussian mechanism
# One DP-SGD step with Poisson rate q and noise sigma is (alpha, rdp(alpha))-RDP for every
# order alpha > 1; RDP composes by adding over steps; at the end we convert to (eps, delta)
# and keep the best alpha. Everything is in log space: the terms reach exp(1000).

DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # as opacus


def _log_add(a, b):  # log(e^a + e^b)
    lo = min(a, b)
    hi = max(a, b)
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
    return (-math.log(math.pi) / 2 - math.log(x) - x**2 - 0.5 * x**-2 + 0.625 * x**-4
            - 37 / 24 * x**-6 + 353 / 64 * x**-8)


def _log_a_int(q, sigma, alpha):
    """log A_alpha for integer alpha (Mironov et al. 2019, Sec. 3.3): a binomial sum."""
    ### BEGIN SOLUTION rdp_step
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = math.log(math.comb(alpha, i)) + i * math.log(q) + (alpha - i) * math.log(1 - q)
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a
    ### END SOLUTION


def _log_a_frac(q, sigma, alpha):
    """log A_alpha for fractional alpha: two infinite series split at z0, summed until the
    terms drop below e^-30. The binomial coefficient changes sign once i > alpha + 1."""
    log_a0 = -math.inf   # the series below z0
    log_a1 = -math.inf   # the series above z0
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    # binom(alpha, 0) = 1, then updated by the ratio (alpha - i) / (i + 1)
    log_coef = 0.0
    sign = 1.0
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
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)
        ratio = (alpha - i) / (i + 1)
        log_coef += math.log(abs(ratio))
        sign *= math.copysign(1.0, ratio)
        i += 1


def _rdp_of_one_step(q, sigma, alpha):
    """RDP at order alpha of one sampled Gaussian mechanism: log(A_alpha) / (alpha - 1)."""
    if q == 1.0:  # no sampling: the plain Gaussian mechanism
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        return _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_frac(q, sigma, alpha) / (alpha - 1)


def compute_rdp(sample_rate, noise_multiplier, steps, orders=None):
    """RDP of `steps` sampled Gaussian mechanisms at each order: (len(orders),) array."""
    _check_rate(sample_rate)
    _check_steps(steps)
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    orders = DEFAULT_ORDERS if orders is None else orders
    if any(not a > 1 for a in orders):
        raise ValueError(f"orders must all be > 1, got {orders}")
    one_step = [_rdp_of_one_step(sample_rate, noise_multiplier, a) for a in orders]
    return np.array(one_step) * steps  # RDP adds up over steps


def rdp_to_epsilon(orders, rdp, delta):
    """(alpha, rdp)-RDP -> (eps, delta)-DP with the improved conversion of Balle et al. 2020
    (Thm 21): eps = rdp - (log delta + log alpha)/(alpha - 1) + log((alpha - 1)/alpha),
    minimised over alpha. Returns (epsilon, best alpha)."""
    _check_delta(delta)
    ### BEGIN SOLUTION rdp_to_epsilon
    a = np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp, dtype=float)
    eps = rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(a[best])
    ### END SOLUTION


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
        raise ValueError(f"target_epsilon={target_epsilon} is below {floor:.4f}, the smallest "
                         f"epsilon these orders can certify at delta={delta}; "
                         "pass larger orders (e.g. up to 512)")
    # invariant: epsilon(lo) > target >= epsilon(hi) (sigma -> 0 gives epsilon -> inf)
    lo = 0.0
    hi = 1.0
    while compute_epsilon(sample_rate, hi, steps, delta, orders) > target_epsilon:
        lo = hi
        hi = 2 * hi
        if hi > 1e6:
            raise ValueError(f"target_epsilon={target_epsilon} is out of reach for {steps} steps "
                             f"at rate {sample_rate}")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if compute_epsilon(sample_rate, mid, steps, delta, orders) > target_epsilon:
            lo = mid
        else:
            hi = mid
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
    """Noise std of the Gaussian mechanism for the clipped update: 2C * sqrt(2 ln(1.25/delta)) /
    epsilon. The L2 sensitivity is 2C, not C: every dataset's clipped update lies in the ball of
    radius C, so two neighbouring datasets' updates can point opposite ways, 2C apart. (The paper's
    code, and the formula it is usually quoted with, use C: at the noise that buys epsilon = 8 that
    way, the guarantee is ~19.) (Dwork & Roth, Thm A.1; the proof covers epsilon < 1, the paper's
    code uses 0.1.)"""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    _check_delta(delta)
    if not 0 < clip < math.inf:
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    return 2 * clip * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def perturb_update(update, epsilon, delta, clip, generator=None):
    """Clip the whole update's L2 norm to C (sensitivity 2C: `gaussian_sigma`), add the noise."""
    sigma = gaussian_sigma(epsilon, delta, clip)
    if not torch.isfinite(update).all():
        raise ValueError("update contains NaN or inf values; expected a finite update vector")
    norm = update.norm().item()
    clipped = update * (clip / max(norm, clip))  # scale 1 if ||u|| <= C, else norm exactly C
    return clipped + gaussian_noise(update.shape, sigma, update, generator)


# -----------------------------------------------------------------------------
# the noise a client's release needs, for either mechanism

WIDE_ORDERS = DEFAULT_ORDERS + [64, 80, 96, 128, 160, 192, 256, 384, 512]   # certify eps 0.1 too


def calibrate(mechanism, epsilon, delta, clip, sample_rate, steps):
    """The noise that buys (epsilon, delta): for "sgd", DP-SGD's noise multiplier sigma over `steps`
    steps at Poisson rate q (the RDP accountant); for "output", the Gaussian mechanism's std."""
    if mechanism == "output":
        return gaussian_sigma(epsilon, delta, clip)
    return noise_multiplier_for(epsilon, sample_rate, steps, delta, WIDE_ORDERS)
