"""The oracles of three exercises in gradtx.py (EXERCISES.md), each needing no other exercise:

  one_se_rule      simplest_within_one_se on scores made up by hand, each case worked out in its
                   comment: paired differences, their standard error, the simplest that is within;
  teacher_forcing  teacher_forcing_loss equals the mean squared error of a decoder run step by step,
                   fed the TRUE previous tokens behind a zero start token (what teacher forcing
                   means), in value and in gradient;
  ridge_dual       the dual solve (ridge_factors, then ridge_at per lambda) predicts what the
                   textbook primal solve (X^T X + lam I)^-1 X^T Y on z-scored data predicts, at
                   several lambdas from one factorisation, also for inputs of low rank with a
                   constant coordinate.

Run:  python -m pytest tests/test_translator_exercises.py -q      (or -m teacher_forcing, ...)
"""
import pytest
import torch
import torch.nn as nn

import gradtx

N_SRC, D_SRC, N_TGT, D_TGT = 2, 12, 3, 16


# -----------------------------------------------------------------------------
# one_se_rule: candidates simplest first, per-run scores, lower is better


@pytest.mark.one_se_rule
def test_a_clearly_worse_simpler_candidate_loses():
    # b beats a by 0.1 on every run: the paired differences a - b are all 0.1, standard error 0
    assert gradtx.simplest_within_one_se({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.9, 1.9, 2.9, 3.9]}) == "b"
    # a - b = 0.3 +- 0.35: mean 0.3, std 0.404, standard error 0.202 < 0.3: a is clearly worse
    # (though within one standard DEVIATION of b)
    assert gradtx.simplest_within_one_se({"a": [1.65, 0.95, 1.65, 0.95], "b": [1.0] * 4}) == "b"


@pytest.mark.one_se_rule
def test_a_simpler_candidate_within_one_standard_error_wins():
    # b's mean is lower, but a - b = (0.2, -0.2, 0.3, -0.2): mean 0.025, standard error 0.13
    assert gradtx.simplest_within_one_se({"a": [1.0] * 4, "b": [0.8, 1.2, 0.7, 1.2]}) == "a"
    # two runs, a - b = (-0.05, 0.5): mean 0.225, std 0.389 (ddof=1), standard error 0.275: a
    # (numpy's default ddof=0 would give 0.194 and pick b)
    assert gradtx.simplest_within_one_se({"a": [0.95, 1.5], "b": [1.0, 1.0]}) == "a"
    # the best is within one standard error of itself: with c simplest but clearly worse, b wins
    assert gradtx.simplest_within_one_se({"c": [5.0, 5.1], "b": [1.0, 1.2], "a": [3.0, 3.5]}) == "b"


@pytest.mark.one_se_rule
def test_scalar_scores_have_no_spread_so_the_best_wins():
    assert gradtx.simplest_within_one_se({"a": 2.0, "b": 1.0, "c": 3.0}) == "b"
    assert gradtx.simplest_within_one_se({"only": [0.7, 0.9]}) == "only"


# -----------------------------------------------------------------------------
# teacher_forcing


def random_translator(seed=0):
    """A small Grad-Transformer without dropout, its zero head re-drawn at random so that every
    output depends on what the decoder reads."""
    torch.manual_seed(seed)
    cfg = gradtx.GTConfig(n_src=N_SRC, d_src=D_SRC, n_tgt=N_TGT, d_tgt=D_TGT, d_model=16, n_head=4,
                          dropout=0.0)
    model = gradtx.GradTransformer(cfg)
    nn.init.normal_(model.head.weight, std=0.5)
    nn.init.normal_(model.head.bias, std=0.5)
    return model.eval()


@pytest.fixture
def shift_written_out(monkeypatch):
    """gradtx.shift_right is another exercise (autoregressive_decoding): in its place, the shift
    written out here, so that teacher_forcing can be done first."""
    monkeypatch.setattr(gradtx, "shift_right", lambda y: torch.cat(
        [torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1))


def decoded_step_by_step(model, src, tgt, base):
    """(B, n_tgt, d_tgt): output t of the decoder run on the start token and the TRUE tokens 0..t-1
    only -- t + 1 tokens in, the last output kept, one run per position."""
    start = torch.zeros(len(tgt), 1, D_TGT)
    return torch.stack([model(src, torch.cat([start, tgt[:, :t]], dim=1), base)[:, -1]
                        for t in range(N_TGT)], dim=1)


@pytest.mark.teacher_forcing
def test_teacher_forcing_is_decoding_step_by_step_fed_the_true_tokens(shift_written_out):
    model = random_translator()
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(4, N_SRC, D_SRC, generator=g), torch.randn(4, N_TGT, D_TGT, generator=g)
    base = torch.randn(4, N_TGT, D_TGT, generator=g)          # a skip path's prediction
    loss = gradtx.teacher_forcing_loss(model, src, tgt, base)
    pred = decoded_step_by_step(model, src, tgt, base)
    # the mean over every entry: batch, token and coordinate alike
    expected = ((pred - tgt) ** 2).sum() / (4 * N_TGT * D_TGT)
    assert loss.shape == () and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # and the same gradient: what fit() steps on
    grads = torch.autograd.grad(loss, [model.head.weight, model.tgt_in.weight])
    oracle = torch.autograd.grad(expected, [model.head.weight, model.tgt_in.weight])
    for got, want in zip(grads, oracle):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.teacher_forcing
def test_teacher_forcing_loss_is_zero_for_a_decoder_that_predicts_its_targets(shift_written_out):
    # targets made by the decoder itself, token by token from the zero start token: teacher
    # forcing feeds back exactly what it produced, so it predicts every target without error
    model = random_translator(seed=2)
    src = torch.randn(3, N_SRC, D_SRC, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tgt = torch.zeros(3, 0, D_TGT)
        for t in range(N_TGT):
            nxt = model(src, torch.cat([torch.zeros(3, 1, D_TGT), tgt], dim=1))[:, -1:]
            tgt = torch.cat([tgt, nxt], dim=1)
        assert gradtx.teacher_forcing_loss(model, src, tgt).item() < 1e-10
        # one target token changed: the loss is the squared change over every entry, because
        # the tokens before it predict it as before (the decoder cannot see ahead)
        changed = tgt.clone()
        changed[:, -1] += 1.0
        loss = gradtx.teacher_forcing_loss(model, src, changed).item()
        assert loss == pytest.approx(3 * D_TGT / (3 * N_TGT * D_TGT), rel=1e-4)


# -----------------------------------------------------------------------------
# ridge_dual


def primal_prediction(X, Y, lam, X_new):
    """The textbook ridge solution W = (Z^T Z + lam I)^-1 Z^T z(Y) on z-scored flat data (the
    unbiased std, + 1e-8), in float64, applied to X_new and mapped back to raw units."""
    Xf, Yf = X.flatten(1).double(), Y.flatten(1).double()
    x_mean, x_std, y_mean, y_std = Xf.mean(0), Xf.std(0) + 1e-8, Yf.mean(0), Yf.std(0) + 1e-8
    Z, Zy = (Xf - x_mean) / x_std, (Yf - y_mean) / y_std
    W = torch.linalg.solve(Z.T @ Z + lam * torch.eye(Z.shape[1], dtype=torch.float64), Z.T @ Zy)
    return ((X_new.flatten(1).double() - x_mean) / x_std) @ W * y_std + y_mean, y_mean


def relative_error(got, expected, y_mean):
    return ((got.double() - expected).norm() / (expected - y_mean).norm()).item()


def pairs(n, g):
    """(X, Y): coordinates with their own means and scales, as updates have."""
    X = 3.0 + torch.randn(n, N_SRC, D_SRC, generator=g) * torch.linspace(0.1, 2.0, D_SRC)
    Y = -1.5 + torch.randn(n, N_TGT, D_TGT, generator=g) * torch.linspace(0.05, 3.0, D_TGT)
    return X, Y


@pytest.mark.ridge_dual
def test_one_factorisation_gives_the_primal_solution_at_every_lambda():
    g = torch.Generator().manual_seed(0)
    (X, Y), X_new = pairs(12, g), pairs(5, g)[0]       # N = 12 pairs, D = 24 input coordinates
    factors = gradtx.ridge_factors(X, Y)
    for lam in (1e-2, 1.0, 100.0):
        expected, y_mean = primal_prediction(X, Y, lam, X_new)
        got = gradtx.ridge_predict(gradtx.ridge_at(factors, lam), X_new)
        assert relative_error(got, expected, y_mean) < 1e-5, lam


@pytest.mark.ridge_dual
def test_inputs_of_low_rank_with_a_constant_coordinate():
    # inputs in a 3-dim affine subspace (as projected uploads are), one coordinate constant: K has
    # rank 3 and a coordinate has std 0. The prediction must still be the primal one, also at a
    # small lambda, where K's null space would amplify float round-off by 1 / lambda
    g = torch.Generator().manual_seed(1)
    directions = 5.0 * torch.randn(3, N_SRC * D_SRC, generator=g, dtype=torch.float64)

    def inputs(n):
        X = 2.0 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ directions
        X[:, 5] = 7.0
        return X.float().view(n, N_SRC, D_SRC)

    X, X_new = inputs(30), inputs(5)
    Y = 1.0 + 2.0 * torch.randn(30, N_TGT, D_TGT, generator=g)
    factors = gradtx.ridge_factors(X, Y)
    for lam in (1e-3, 1.0):
        expected, y_mean = primal_prediction(X, Y, lam, X_new)
        got = gradtx.ridge_predict(gradtx.ridge_at(factors, lam), X_new)
        assert torch.isfinite(got).all() and relative_error(got, expected, y_mean) < 1e-5, lam
