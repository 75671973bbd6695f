"""Tests for dp.py: each one checks against an independent oracle (a loop of single-example
backward passes, plain SGD, published accountant values, closed forms, numerical integration).

Run:  python -m pytest tests/test_dp.py -q
"""

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dp  # noqa: E402
import tinylm  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matrices: on a busy 2-core machine intra-op threads only fight each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# two models: a small TinyLM with LoRA (what DP-SGD trains) and a stand-in with the same calling
# convention but no LoRA layers (dp.per_sample_grads refuses it)

VOCAB = 257  # data.py's byte tokenizer


def lora_lm(seed=0, n_embd=16, rank=2):
    """A 2-layer TinyLM with LoRA on q and v, its LoRA set to a random non-zero update
    (with B = 0 the gradient of dA would be zero and prove nothing)."""
    torch.manual_seed(seed)
    cfg = tinylm.GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=n_embd)
    model = tinylm.add_lora(tinylm.GPT(cfg), rank=rank, alpha=2.0 * rank)
    g = torch.Generator().manual_seed(seed)
    tinylm.set_update(model, 0.3 * torch.randn(tinylm.update_shape(cfg, rank), generator=g))
    return model


class StandIn(nn.Module):
    def __init__(self, vocab=11, d=8, r=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        for p in self.parameters():
            p.requires_grad_(False)  # the frozen "base model"
        self.A = nn.Parameter(torch.randn(d, r) * 0.5)
        self.B = nn.Parameter(torch.randn(r, d) * 0.5)
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, x, y, mask):
        h = self.emb(x)  # (B, T, d)
        h = torch.tanh(self.proj(h) + self.scale * (h @ self.A @ self.B))
        logits = self.head(h)  # (B, T, vocab)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        m = mask.to(ce.dtype)
        return logits, (ce * m).sum() / m.sum().clamp(min=1)


def batch(B=6, T=12, vocab=VOCAB, seed=1, same_count=False):
    """x, y (B, T) and a mask with a different number of answer tokens per example, one of
    them none at all (its loss is 0: 0 / max(0, 1), as the model itself defines it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (B, T), generator=g)
    y = torch.randint(vocab, (B, T), generator=g)
    mask = torch.zeros(B, T)
    if same_count:
        mask[:, -2:] = 1  # every example has 2 answer tokens
    else:
        for i in range(B):
            mask[i, T - i:] = 1  # example i has i answer tokens, example 0 none
    return x, y, mask


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in trainable(model).items()}


def loop_of_backward_passes(model, x, y, mask):
    """The oracle: one backward pass per example, {name: (B, *shape)}."""
    per_example = [grads_of(model, model(x[i:i + 1], y[i:i + 1], mask[i:i + 1])[1]) for i in range(len(x))]
    return {n: torch.stack([g[n] for g in per_example]) for n in per_example[0]}


# -----------------------------------------------------------------------------
# per-sample gradients


def test_per_sample_grads_match_a_loop_of_backward_passes():
    model = lora_lm().double()
    x, y, mask = batch()
    loop = loop_of_backward_passes(model, x, y, mask)
    grads = dp.per_sample_grads(model, x, y, mask)
    assert list(grads) == list(trainable(model))  # every LoRA tensor, in order
    for n, ref in loop.items():
        assert ref.shape == grads[n].shape == (len(x), *trainable(model)[n].shape)
        assert ref[1:].flatten(1).norm(dim=1).min() > 1e-4, n  # a real gradient to compare
        assert (grads[n] - ref).abs().max() <= 1e-10, n
        assert torch.all(grads[n][0] == 0)  # the example with no answer tokens


def test_per_example_losses_are_the_models_loss_of_each_example():
    model = lora_lm().double()
    x, y, mask = batch()
    losses = dp.per_example_losses(model(x)[0], y, mask)
    ref = torch.stack([model(x[i:i + 1], y[i:i + 1], mask[i:i + 1])[1] for i in range(len(x))])
    assert (losses - ref).abs().max() <= 1e-12 and losses[0] == 0


def test_mean_of_per_sample_grads_is_the_batch_gradient():
    # with equal answer-token counts the batch loss is the mean of the per-example losses
    model = lora_lm().double()
    x, y, mask = batch(same_count=True)
    psg = dp.per_sample_grads(model, x, y, mask)
    ref = grads_of(model, model(x, y, mask)[1])
    for n in ref:
        assert torch.allclose(psg[n].mean(0), ref[n], atol=1e-10)


def test_per_sample_grads_refuses_a_trainable_tensor_outside_every_lora_layer():
    model = StandIn().double()
    x, y, mask = batch(vocab=11)
    with pytest.raises(ValueError, match=r"\['A', 'B'\].*per_example_grads"):
        dp.per_sample_grads(model, x, y, mask)
    lm = lora_lm()
    lm.blocks[0].ln_1.weight.requires_grad_(True)  # a trainable tensor outside every LoRA layer
    with pytest.raises(ValueError, match=r"blocks\.0\.ln_1\.weight"):
        dp.per_sample_grads(lm, *batch())


def test_empty_batch_gives_empty_gradients():
    model = lora_lm()
    x, y, mask = batch(B=0)
    psg = dp.per_sample_grads(model, x, y, mask)
    assert {n: g.shape for n, g in psg.items()} == {n: (0, *p.shape) for n, p in trainable(model).items()}


# -----------------------------------------------------------------------------
# the DP-SGD step (with dp.per_sample_grads unless said otherwise)


def sgd(model, lr=1.0):
    return torch.optim.SGD(trainable(model).values(), lr=lr)


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in trainable(model).values()])


def test_dp_step_equals_the_step_on_the_loop_oracles_gradients():
    x, y, mask = batch()
    updates = []
    for per_sample in (dp.per_sample_grads, loop_of_backward_passes):
        model = lora_lm().double()
        before = flat_params(model)
        norm = dp.dp_sgd_step(model, sgd(model), x, y, mask, clip=0.05, noise_multiplier=0.7,
                              expected_batch_size=8.0, generator=torch.Generator().manual_seed(0),
                              per_sample=per_sample)
        updates.append((flat_params(model) - before, norm.item()))   # a 0-dim tensor: no sync per step
    (u1, norm1), (u2, norm2) = updates
    assert norm1 > 0.05  # some examples were clipped
    assert (u1 - u2).abs().max() <= 1e-12 and norm1 == pytest.approx(norm2, abs=1e-12)


def test_dp_step_without_clipping_or_noise_is_plain_sgd():
    x, y, mask = batch()
    expected = 8.0  # q*N, deliberately not the realised B = 6
    dp_model, ref_model = lora_lm().double(), lora_lm().double()
    dp.dp_sgd_step(dp_model, sgd(dp_model, 0.3), x, y, mask,
                   clip=float("inf"), noise_multiplier=0.0, expected_batch_size=expected)
    loss_sum = sum(ref_model(x[i : i + 1], y[i : i + 1], mask[i : i + 1])[1] for i in range(len(x)))
    (loss_sum / expected).backward()
    sgd(ref_model, 0.3).step()
    for n, p in trainable(ref_model).items():
        assert (trainable(dp_model)[n] - p).abs().max() <= 1e-12


def test_clipping_brings_a_huge_gradient_to_norm_C():
    model = lora_lm().double()
    with torch.no_grad():
        model.ln_f.weight *= 1000  # huge logits, a huge raw gradient
    x, y, mask = batch(B=1, same_count=True)
    raw = grads_of(model, model(x, y, mask)[1])
    raw_flat = torch.cat([g.flatten() for g in raw.values()])
    assert raw_flat.norm() > 100
    before = flat_params(model)
    dp.dp_sgd_step(model, sgd(model), x, y, mask, clip=0.5, noise_multiplier=0.0, expected_batch_size=1)
    change = before - flat_params(model)
    assert change.norm().item() == pytest.approx(0.5, rel=1e-6)
    assert F.cosine_similarity(change, raw_flat, dim=0) > 1 - 1e-9  # same direction, only shorter


@pytest.mark.parametrize("kind", ["empty batch", "no answer tokens"])
def test_noise_has_std_sigma_C_over_expected_batch_size(kind):
    sigma, clip, q, N = 1.3, 0.7, 0.05, 400
    x, y, mask = batch(B=0) if kind == "empty batch" else batch(B=3)
    if kind == "no answer tokens":
        mask = torch.zeros_like(mask)  # zero loss -> zero gradients: the update is pure noise

    def noisy_update(seed):
        model = lora_lm(n_embd=64, rank=32)  # 16k trainable numbers to estimate the std from
        before = flat_params(model)
        dp.dp_sgd_step(model, sgd(model), x, y, mask, clip=clip, noise_multiplier=sigma,
                       expected_batch_size=q * N, generator=torch.Generator().manual_seed(seed))
        return before - flat_params(model)

    u = noisy_update(0)
    target = sigma * clip / (q * N)
    assert u.numel() == 16384
    assert u.std().item() == pytest.approx(target, rel=0.03)
    assert abs(u.mean().item()) < 4 * target / math.sqrt(u.numel())
    assert torch.equal(u, noisy_update(0))  # same seed, same noise
    assert not torch.equal(u, noisy_update(1))


class OneVector(nn.Module):
    """A "model" that is one trainable vector; its per-example gradients come from the test."""

    def __init__(self, D):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D))


def step_with_given_grads(grads, clip, sigma, expected, seed=0):
    """One dp_sgd_step whose per-example gradients are `grads` (B, D): -> (update, mean norm)."""
    model = OneVector(grads.shape[1])
    x = torch.zeros(len(grads), 1, dtype=torch.long)  # only len(x) matters
    norm = dp.dp_sgd_step(model, sgd(model), x, x, x, clip=clip, noise_multiplier=sigma, expected_batch_size=expected,
                          generator=torch.Generator().manual_seed(seed), per_sample=lambda *_: {"w": grads})
    return -model.w.detach(), norm.item()  # SGD at lr 1 from 0: minus the privatised gradient


@pytest.mark.clip_and_noise
def test_clipping_and_division_by_hand():
    # C = 1: (3, 4) has norm 5 -> (0.6, 0.8); (0.3, 0.4) is inside the ball; (0, 0) adds nothing.
    # Sum (0.9, 1.2), divided by the EXPECTED batch size 4 (not the 3 examples): (0.225, 0.3)
    grads = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    update, norm = step_with_given_grads(grads, clip=1.0, sigma=0.0, expected=4.0)
    assert update.tolist() == pytest.approx([0.225, 0.3], rel=1e-5)
    assert norm == pytest.approx((5 + 0.5 + 0) / 3)  # the mean norm BEFORE clipping
    update, _ = step_with_given_grads(grads, clip=float("inf"), sigma=0.0, expected=4.0)
    assert update.tolist() == pytest.approx([3.3 / 4, 4.4 / 4])  # C = inf: no clipping


@pytest.mark.clip_and_noise
@pytest.mark.parametrize("B", [0, 4])
def test_noise_is_added_once_to_the_sum(B):
    # zero gradients: the update is the noise alone, std sigma*C / (q*N) whatever the batch size
    sigma, clip, expected, D = 1.3, 0.7, 20.0, 20_000
    update, _ = step_with_given_grads(torch.zeros(B, D), clip, sigma, expected)
    target = sigma * clip / expected
    assert update.std().item() == pytest.approx(target, rel=0.03)
    assert abs(update.mean().item()) < 4 * target / math.sqrt(D)
    assert torch.equal(update, step_with_given_grads(torch.zeros(B, D), clip, sigma, expected)[0])  # seeded
    assert not torch.equal(update, step_with_given_grads(torch.zeros(B, D), clip, sigma, expected, seed=1)[0])


def test_dp_step_rejects_bad_arguments():
    model = lora_lm()
    opt = sgd(model, 0.1)
    x, y, mask = batch()
    with pytest.raises(ValueError, match="clip"):
        dp.dp_sgd_step(model, opt, x, y, mask, clip=0.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="clip"):
        dp.dp_sgd_step(model, opt, x, y, mask, clip=float("inf"), noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.dp_sgd_step(model, opt, x, y, mask, clip=1.0, noise_multiplier=-1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dp.dp_sgd_step(model, opt, x, y, mask, clip=1.0, noise_multiplier=1.0, expected_batch_size=0)


# -----------------------------------------------------------------------------
# Poisson sampling


def test_poisson_batches_vary_average_qN_and_repeat_under_a_seed():
    n, q = 1000, 0.1
    g = torch.Generator().manual_seed(0)
    batches = [dp.poisson_sample(n, q, g) for _ in range(300)]
    sizes = [len(b) for b in batches]
    assert len(set(sizes)) > 10  # the batch size is random
    assert abs(np.mean(sizes) - q * n) < 2.0  # std of the mean is ~0.55
    for b in batches[:20]:
        assert b.dtype == torch.long and torch.all(b[1:] > b[:-1]) and 0 <= b.min() and b.max() < n
    g2 = torch.Generator().manual_seed(0)
    assert all(torch.equal(b, dp.poisson_sample(n, q, g2)) for b in batches)
    tiny = [len(dp.poisson_sample(10, 0.01, g)) for _ in range(100)]
    assert 0 in tiny  # empty batches happen and are allowed
    with pytest.raises(ValueError, match="sample_rate"):
        dp.poisson_sample(10, 0.0, g)


# -----------------------------------------------------------------------------
# the RDP accountant

TF_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] + list(range(5, 64)) + [128, 256, 512]


def test_opacus_golden_value():
    # opacus/tests/accountants_test.py::test_rdp_accountant, default orders
    assert dp.compute_epsilon(0.04, 1.5, 2250, 1e-5) == pytest.approx(7.32911117143, abs=1e-6)


@pytest.mark.parametrize("orders", [TF_ORDERS, None])
def test_tensorflow_privacy_golden_value(orders):
    # tensorflow_privacy compute_dp_sgd_privacy_test Test0: MNIST, N=60000, batch 150,
    # sigma 1.3, 15 epochs = 6000 steps -> eps 0.7242234026109595 at alpha 19. Its own orders
    # and ours both contain 19, so both give the value.
    eps, alpha = dp.rdp_to_epsilon(orders or dp.DEFAULT_ORDERS,
                                   dp.compute_rdp(150 / 60000, 1.3, 6000, orders), 1e-5)
    assert eps == pytest.approx(0.7242234026109595, abs=1e-6)
    assert alpha == 19


@pytest.mark.rdp_to_epsilon
def test_rdp_to_epsilon_of_the_tensorflow_privacy_example():
    # the same MNIST example, its RDP at alpha = 19 (the best order) from numerical integration:
    # the conversion alone must give the published 0.7242234026109595, and pick 19 among others
    rdp = {a: 6000 * rdp_by_integration(150 / 60000, 1.3, a) for a in (2.0, 19.0, 40.0)}
    eps, alpha = dp.rdp_to_epsilon(list(rdp), list(rdp.values()), 1e-5)
    assert eps == pytest.approx(0.7242234026109595, abs=1e-6) and alpha == 19


@pytest.mark.rdp_to_epsilon
def test_rdp_to_epsilon_by_hand():
    # alpha = 2, rdp = 1, delta = e^-3: eps = 1 - (-3 + log 2) / 1 + log(1/2) = 4 - 2 log 2
    assert dp.rdp_to_epsilon([2.0], [1.0], math.exp(-3)) == pytest.approx((4 - 2 * math.log(2), 2.0))
    # the smallest eps over the orders wins: order 3 here, whatever order the orders come in
    rdp = [1.0, 0.5, 5.0]
    by_hand = [r - (math.log(1e-5) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a, r in zip((2, 3, 4), rdp)]
    assert by_hand[1] == min(by_hand)
    assert dp.rdp_to_epsilon([4, 2, 3], [5.0, 1.0, 0.5], 1e-5) == pytest.approx((by_hand[1], 3.0))


def test_spec_small_orders_value():
    orders = [2, 5, 10, 20, 100]
    eps, alpha = dp.rdp_to_epsilon(orders, dp.compute_rdp(0.01, 1.0, 300, orders), 1e-5)
    assert eps == pytest.approx(2.39, abs=0.005) and alpha == 5


def test_no_sampling_is_the_gaussian_mechanism_closed_form():
    rdp = dp.compute_rdp(1.0, 2.0, 7, dp.DEFAULT_ORDERS)
    expected = [a / (2 * 2.0**2) * 7 for a in dp.DEFAULT_ORDERS]
    assert np.allclose(rdp, expected, rtol=1e-12)


def rdp_by_integration(q, s, alpha):
    """Mironov et al. 2019: A_alpha = E_{z ~ N(0, s^2)} [((1-q) + q * exp((2z - 1) / (2 s^2)))^alpha]
    and rdp = log(A_alpha) / (alpha - 1); integrate it on a fine grid, in log space."""
    z = np.linspace(-40, 80, 400_001)
    log_f = -z**2 / (2 * s**2) - math.log(s * math.sqrt(2 * math.pi)) \
        + alpha * np.logaddexp(math.log(1 - q), math.log(q) + (2 * z - 1) / (2 * s**2))
    m = log_f.max()
    return (m + math.log(np.sum(np.exp(log_f - m)) * (z[1] - z[0]))) / (alpha - 1)


# integer orders take the binomial sum (the rdp_step exercise); 63: exp(1356) overflows a float
@pytest.mark.parametrize("alpha", [1.5, 2.7, 20.5] + [pytest.param(a, marks=pytest.mark.rdp_step)
                                                       for a in (4.0, 12.0, 63.0)])
def test_rdp_matches_numerical_integration(alpha):
    q, s = 0.1, 1.2
    assert dp.compute_rdp(q, s, 1, [alpha])[0] == pytest.approx(rdp_by_integration(q, s, alpha), rel=1e-7)


@pytest.mark.rdp_step
@pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (0.3, 0.8), (0.5, 5.0)])
def test_rdp_of_order_two_is_the_closed_form(q, sigma):
    # by hand: A_2 = (1-q)^2 + 2q(1-q) + q^2 e^(1/sigma^2) = 1 + q^2 (e^(1/sigma^2) - 1), and 7 steps add up
    expected = 7 * math.log(1 + q**2 * math.expm1(1 / sigma**2))
    assert dp.compute_rdp(q, sigma, 7, [2])[0] == pytest.approx(expected, rel=1e-10)


def test_epsilon_grows_with_rate_and_steps_and_falls_with_noise():
    eps = lambda q, s, t: dp.compute_epsilon(q, s, t, 1e-5)  # noqa: E731
    assert eps(0.01, 1.0, 500) < eps(0.02, 1.0, 500) < eps(0.05, 1.0, 500)
    assert eps(0.01, 1.0, 100) < eps(0.01, 1.0, 500) < eps(0.01, 1.0, 2000)
    assert eps(0.01, 0.8, 500) > eps(0.01, 1.0, 500) > eps(0.01, 2.0, 500)
    assert dp.compute_epsilon(0.01, 1.0, 0, 1e-5) == 0.0  # no steps, nothing spent


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.04, 2250), (1.0, 0.01, 1000), (0.5, 0.2, 50)])
def test_noise_multiplier_for_never_overshoots_and_is_tight(target, q, steps):
    sigma = dp.noise_multiplier_for(target, q, steps, 1e-5)
    assert dp.compute_epsilon(q, sigma, steps, 1e-5) <= target
    assert dp.compute_epsilon(q, sigma - 0.01, steps, 1e-5) > target


def test_noise_multiplier_for_an_epsilon_the_orders_cannot_reach():
    # with orders up to 63 even infinite noise certifies only eps ~ 0.103 at delta = 1e-5
    with pytest.raises(ValueError, match="target_epsilon"):
        dp.noise_multiplier_for(0.1, 0.05, 100, 1e-5)
    orders = dp.DEFAULT_ORDERS + [128, 256, 512]
    sigma = dp.noise_multiplier_for(0.1, 0.05, 100, 1e-5, orders=orders)
    assert dp.compute_epsilon(0.05, sigma, 100, 1e-5, orders) <= 0.1


@pytest.mark.parametrize("call,name", [
    (lambda: dp.compute_epsilon(0.0, 1.0, 10, 1e-5), "sample_rate"),
    (lambda: dp.compute_epsilon(1.5, 1.0, 10, 1e-5), "sample_rate"),
    (lambda: dp.compute_epsilon(0.1, 0.0, 10, 1e-5), "noise_multiplier"),
    (lambda: dp.compute_epsilon(0.1, -1.0, 10, 1e-5), "noise_multiplier"),
    (lambda: dp.compute_epsilon(0.1, 1.0, -1, 1e-5), "steps"),
    (lambda: dp.compute_epsilon(0.1, 1.0, 2.5, 1e-5), "steps"),
    (lambda: dp.compute_epsilon(0.1, 1.0, 10, 0.0), "delta"),
    (lambda: dp.compute_epsilon(0.1, 1.0, 10, 1.0), "delta"),
    (lambda: dp.compute_rdp(0.1, 1.0, 10, [1.0, 2.0]), "orders"),
    (lambda: dp.noise_multiplier_for(0.0, 0.1, 10, 1e-5), "target_epsilon"),
    (lambda: dp.noise_multiplier_for(-1.0, 0.1, 10, 1e-5), "target_epsilon"),
    (lambda: dp.noise_multiplier_for(1.0, 0.0, 10, 1e-5), "sample_rate"),
    (lambda: dp.noise_multiplier_for(1.0, 0.1, -3, 1e-5), "steps"),
    (lambda: dp.noise_multiplier_for(1.0, 0.1, 10, 2.0), "delta"),
])
def test_accountant_rejects_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# -----------------------------------------------------------------------------
# output perturbation


def test_gaussian_sigma_formula():   # sensitivity 2C: two clipped updates in the C-ball are up to 2C apart
    assert dp.gaussian_sigma(0.1, 1e-5, 2.0) == pytest.approx(2 * 2.0 * math.sqrt(2 * math.log(1.25e5)) / 0.1)


def test_perturb_update_clips_to_C_and_adds_noise_of_the_right_std():
    clip, eps, delta = 1.0, 1.0, 1e-5
    u = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 0.1  # norm ~ 45
    out = dp.perturb_update(u, eps, delta, clip, torch.Generator().manual_seed(3))
    noise = dp.perturb_update(torch.zeros_like(u), eps, delta, clip, torch.Generator().manual_seed(3))
    clipped = out - noise  # same seed, same noise: what is left is the clipped update
    assert clipped.norm().item() == pytest.approx(clip, rel=1e-4)
    assert F.cosine_similarity(clipped, u, dim=0) > 1 - 1e-6
    assert noise.std().item() == pytest.approx(dp.gaussian_sigma(eps, delta, clip), rel=0.01)
    small = u / u.norm() * 0.5  # already inside the ball: left as it is
    diff = dp.perturb_update(small, eps, delta, clip, torch.Generator().manual_seed(3)) - noise
    assert torch.allclose(diff, small, atol=1e-4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(epsilon=0.0), "epsilon"), (dict(epsilon=-1.0), "epsilon"),
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"),
    (dict(clip=0.0), "clip"), (dict(clip=-1.0), "clip"), (dict(clip=float("inf")), "clip"),
])
def test_perturb_update_rejects_bad_arguments(kwargs, name):
    args = dict(epsilon=1.0, delta=1e-5, clip=1.0) | kwargs
    with pytest.raises(ValueError, match=name):
        dp.perturb_update(torch.ones(4), **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_perturb_update_rejects_non_finite_updates(bad):
    u = torch.ones(4)
    u[2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        dp.perturb_update(u, 1.0, 1e-5, 1.0)


def test_calibrate_reaches_epsilon_point_one_and_never_overshoots():
    """The clients' recipe at eps = 0.1 (100 steps, q = 1/16): WIDE_ORDERS certify it, tightly."""
    sigma = dp.calibrate("sgd", 0.1, 1e-5, 1.0, 0.0625, 100)
    assert dp.compute_epsilon(0.0625, sigma, 100, 1e-5, dp.WIDE_ORDERS) <= 0.1
    assert dp.compute_epsilon(0.0625, sigma - 0.01, 100, 1e-5, dp.WIDE_ORDERS) > 0.1
    with pytest.raises(ValueError, match="orders"):   # the default orders cannot certify it at all
        dp.noise_multiplier_for(0.1, 0.0625, 100, 1e-5)
    assert dp.calibrate("output", 0.5, 1e-5, 2.0, 0.0625, 100) == dp.gaussian_sigma(0.5, 1e-5, 2.0)


def test_clipping_stays_float32_under_bfloat16_autocast():
    # --dtype=bfloat16 autocasts forwards; privacy's arithmetic must not follow it: the per-example
    # gradients, their norms, the clipping and the update stay float32, and the clipped update has
    # norm C to float32's precision (the oracle above, run inside autocast)
    model = lora_lm()   # float32: autocast leaves a double model alone
    with torch.no_grad():
        model.ln_f.weight *= 1000  # huge logits, a huge raw gradient
    x, y, mask = batch(B=1, same_count=True)
    raw = grads_of(model, model(x, y, mask)[1])
    raw_flat = torch.cat([g.flatten() for g in raw.values()])
    before = flat_params(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = dp.per_sample_grads(model, x, y, mask)
        norm = dp.dp_sgd_step(model, sgd(model), x, y, mask, clip=0.5, noise_multiplier=0.0,
                              expected_batch_size=1)
    assert all(g.dtype == torch.float32 for g in grads.values()) and norm.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in trainable(model).values())
    change = before - flat_params(model)
    assert change.norm().item() == pytest.approx(0.5, rel=1e-5)
    assert F.cosine_similarity(change, raw_flat, dim=0) > 0.99  # bf16 forward: close, not exact
