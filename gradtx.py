"""
gradtx.py -- the Grad-Transformer: translate a TinyLM update into an LLM update.

The paper's method section, in code. An update vector is a sequence of layer-tokens
(tinylm.py: one token per transformer layer). The Grad-Transformer is an encoder-decoder:

    TinyLM update Δθ_S  (n_src, d_src) --linear--> encoder  -------+
                                                                   | cross-attention
    [start, Δθ_T[0], ..., Δθ_T[n-2]] --linear--> decoder (causal) <+ --linear--> Δθ_T (n_tgt, d_tgt)

The decoder emits the LLM update one layer-token at a time: trained with teacher forcing (the true
tokens shifted right behind an all-zero start token) and an MSE loss, it generates autoregressively,
feeding each produced token back in behind the SAME start token. Inputs and targets are z-scored per
coordinate with the shadow pairs' statistics (`normalize=False`: raw values, as in the paper); the
output head starts at zero, so the untrained model predicts the mean shadow update exactly.

The file reads in four parts:
  1. the paper's translator: the network, z-scores, teacher forcing, autoregressive decoding;
  2. this project's additions, each an option (off = the paper, GTConfig's defaults), each defined
     once:
       - the public subspace: the input projected on the top principal directions of clean public
         shadow TinyLM updates, which keeps DP noise out;
       - the linear map: ridge regression, the skip path the decoder learns the residual of;
       - the selection: the simplest candidate within one standard error of the best, on
         held-out shadow runs;
       - the do-no-harm gate: a noisy upload falls back towards the mean shadow update as far as
         the noise alone could explain it (or to it, where the noise more likely explains it);
       - with DP, the provider's choice: the translation or a simpler fallback, whichever
         held-out shadow runs at the clients' privacy level say serves best within a budget of
         harm; among its candidates the check (for each upload the gate passes, the mean update,
         the map's or the translator's, whichever makes the LLM answer as the client's own
         TinyLM, rebuilt from the upload, does);
       - with DP, the answer test on top of the choice: where the rebuilt TinyLM moves towards an
         operator further than noise alone moves it, an update under which the LLM answers so
         (a translation, else a shadow fine-tune of the LLM at that corner of the simplex), and
         the mean update where what was sent makes the LLM answer an operator it did not move to;
  3. the provider's prediction, composed in one place: `translate`, gate(map(x) + residual(x)),
     and `provide`, what the provider sends under its choice;
  4. training on shadow pairs, and checkpoints.
With every addition off, parts 3 and 4 run the paper's translator alone.

    python -m pytest tests/test_gradtx.py tests/test_translator_exercises.py
"""
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import tinylm


@dataclass
class GTConfig:
    n_src: int           # TinyLM layers = source tokens
    d_src: int           # TinyLM token_dim
    n_tgt: int           # LLM layers = target tokens
    d_tgt: int           # LLM token_dim
    d_model: int = 64
    n_layer: int = 1     # encoder layers, and as many decoder layers
    n_head: int = 4
    dropout: float = 0.3
    normalize: bool = True
    # this project's additions, each 0 (off) in the paper's translator:
    n_basis: int = 0     # k: input projected onto a k-dim public subspace (0: raw input)
    n_skip: int = 0      # training pairs behind the linear map's skip path (0: no skip path)
    n_gate: int = 0      # public directions of the do-no-harm gate for noisy uploads (0: no gate)


# -----------------------------------------------------------------------------
# 1. the paper's translator: attention, encoder and decoder layers, the model


class Attention(nn.Module):
    """Multi-head attention of queries x over a context (x itself, or the encoder's output).
    Not tinylm.SelfAttention: that one is causal self-attention only, with LoRA on q and v."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def split_heads(self, t):
        """(B, T, C) -> (B, n_head, T, C // n_head)"""
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x, context, causal=False):
        """x (B, T, C) attends over context (B, S, C) -> (B, T, C). causal: token t sees 0..t."""
        B, T, C = x.shape
        S = context.shape[1]
        q = self.split_heads(self.q(x))                                   # (B, n_head, T, hd)
        k = self.split_heads(self.k(context))                             # (B, n_head, S, hd)
        v = self.split_heads(self.v(context))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))          # (B, n_head, T, S)
        if causal:  # token t may look at target tokens 0..t only
            future = torch.ones(T, S, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(future, float("-inf"))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)    # heads side by side
        return self.o(y)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention over the source layer-tokens, then an MLP."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_head)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = tinylm.MLP(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.drop(self.attn(h, h))
        return x + self.drop(self.mlp(self.ln_2(x)))


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention over the target tokens so far, cross-attention over the
    encoder's output (memory), then an MLP."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = Attention(cfg.d_model, cfg.n_head)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg.d_model, cfg.n_head)
        self.ln_3 = nn.LayerNorm(cfg.d_model)
        self.mlp = tinylm.MLP(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y, memory):
        h = self.ln_1(y)
        y = y + self.drop(self.self_attn(h, h, causal=True))
        y = y + self.drop(self.cross_attn(self.ln_2(y), memory))
        return y + self.drop(self.mlp(self.ln_3(y)))


class GradTransformer(nn.Module):
    """The encoder-decoder over layer-tokens. It reads and writes normalised units (z-scores,
    below); its buffers hold the z-score statistics and, with additions on, what they need."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.src_in = nn.Linear(cfg.d_src, D)     # a layer-token -> the model's width
        self.tgt_in = nn.Linear(cfg.d_tgt, D)
        # learned positions: one per layer-token (drawn here, in this order, as always)
        self.src_pos = nn.Parameter(0.02 * torch.randn(cfg.n_src, D))
        self.tgt_pos = nn.Parameter(0.02 * torch.randn(cfg.n_tgt, D))
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.ln_enc = nn.LayerNorm(D)
        self.ln_dec = nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(D, cfg.d_tgt)
        self.init_weights()
        # per-coordinate statistics (set_stats): mean 0, std 1 is a no-op until they are set
        self.register_buffer("x_mean", torch.zeros(cfg.n_src, cfg.d_src))
        self.register_buffer("x_std", torch.ones(cfg.n_src, cfg.d_src))
        self.register_buffer("y_mean", torch.zeros(cfg.n_tgt, cfg.d_tgt))
        self.register_buffer("y_std", torch.ones(cfg.n_tgt, cfg.d_tgt))
        register_additions(self, cfg)   # this project's additions (part 2); the paper's: none

    def init_weights(self):
        """PyTorch's default init everywhere but the output head, which starts at zero: the
        untrained model predicts 0 in normalised units, i.e. the mean shadow update."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, src, tgt_in, base=None):
        """src (B, n_src, d_src), tgt_in (B, T, d_tgt) -> next tokens (B, T, d_tgt); normalised
        units. base (B, n_tgt, d_tgt): the skip path's prediction, to which the decoder adds its
        residual (None in the paper)."""
        memory = self.drop(self.src_in(src) + self.src_pos)                 # (B, n_src, D)
        for layer in self.encoder:
            memory = layer(memory)
        memory = self.ln_enc(memory)
        T = tgt_in.shape[1]
        y = self.drop(self.tgt_in(tgt_in) + self.tgt_pos[:T])              # (B, T, D)
        for layer in self.decoder:
            y = layer(y, memory)
        out = self.head(self.ln_dec(y))                                     # (B, T, d_tgt)
        if base is None:
            return out
        return out + base[:, :T]

    def buffers_named(self, prefix):
        """{rest of the name: live buffer} of the buffers named prefix*; None if there are none."""
        found = {name.removeprefix(prefix): t for name, t in self.named_buffers(recurse=False)
                 if name.startswith(prefix)}
        return found or None

    @property
    def basis(self):
        """The public subspace {"mean", "U"} (`public_basis`); None: raw input."""
        return self.buffers_named("basis_")

    @property
    def ridge(self):
        """The linear map of the skip path (`ridge_at`); None: no skip path."""
        return self.buffers_named("ridge_")

    @property
    def gate(self):
        """The do-no-harm gate's statistics (`fit_gate`); None: no gate."""
        return self.buffers_named("gate_")


# -----------------------------------------------------------------------------
# 1, continued: what the model reads and writes: z-scores, teacher forcing, autoregressive decoding


@torch.no_grad()
def set_stats(model, X, Y):
    """Per-coordinate mean/std over N pairs of TinyLM updates X (N, n_src, d_src) and LLM updates
    Y (N, n_tgt, d_tgt). With normalize=False they stay 0 and 1: raw values, as in the paper."""
    if not model.cfg.normalize:
        return
    model.x_mean.copy_(X.float().mean(0))
    model.x_std.copy_(X.float().std(0) + 1e-8)
    model.y_mean.copy_(Y.float().mean(0))
    model.y_std.copy_(Y.float().std(0) + 1e-8)


def normalize(model, T, name):
    """Raw updates -> z-scores with the model's statistics; name "x" (TinyLM) or "y" (LLM)."""
    return (T - getattr(model, f"{name}_mean")) / getattr(model, f"{name}_std")


def denormalize(model, T, name):
    """z-scores -> raw updates: the inverse of `normalize`."""
    return T * getattr(model, f"{name}_std") + getattr(model, f"{name}_mean")


def shift_right(y):
    """(B, T, d) -> (B, T, d): an all-zero start token, then y[:, :-1]. Used in training AND
    generation."""
    ### BEGIN SOLUTION autoregressive_decoding
    return torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)
    ### END SOLUTION


def teacher_forcing_loss(model, src, tgt, base=None):
    """The paper's training objective on a batch of pairs, in normalised units: the decoder reads
    the true LLM tokens tgt (B, n_tgt, d_tgt) shifted right behind the start token, predicts every
    next token at once, and pays their mean squared error. base: the skip path's prediction."""
    ### BEGIN SOLUTION teacher_forcing
    pred = model(src, shift_right(tgt), base)                       # (B, n_tgt, d_tgt)
    return F.mse_loss(pred, tgt)
    ### END SOLUTION


@torch.no_grad()
def decode(model, src, base=None):
    """Autoregressive generation in normalised units: src (B, n_src, d_src) -> (B, n_tgt, d_tgt).
    From the all-zero start token, each step appends the model's last output token, which the
    next step reads back in (with a skip path: base + the residual, the whole prediction)."""
    ### BEGIN SOLUTION autoregressive_decoding
    tgt = torch.zeros(len(src), 1, model.cfg.d_tgt, device=src.device)   # the start token
    for _ in range(model.cfg.n_tgt):
        nxt = model(src, tgt, base)[:, -1:]                              # (B, 1, d_tgt)
        tgt = torch.cat([tgt, nxt], dim=1)
    ### END SOLUTION
    return tgt[:, 1:]                                                    # the start token dropped


# -----------------------------------------------------------------------------
# 2. this project's additions (each an option; off = the paper): the public subspace, the linear
# map, the selection on held-out runs, the do-no-harm gate (their buffers travel with the model),
# and the provider's choice among fallbacks (kept beside the model: train.choice_stage).


def register_additions(model, cfg):
    """The buffers of this project's additions, saved with the model and filled by
    `set_linear_map`: the public basis (cfg.n_basis), the ridge skip path (cfg.n_skip training
    pairs) and the gate (cfg.n_gate directions). The paper's translator (all three 0) has none."""
    D_src = cfg.n_src * cfg.d_src
    D_tgt = cfg.n_tgt * cfg.d_tgt
    N = cfg.n_skip
    shapes = {}
    if cfg.n_basis:
        shapes.update(basis_mean=D_src, basis_U=(D_src, cfg.n_basis))
    if N:
        shapes.update(ridge_keys=(N, D_src), ridge_values=(N, D_tgt), ridge_x_mean=D_src,
                      ridge_x_std=D_src, ridge_y_mean=D_tgt, ridge_y_std=D_tgt)
    if cfg.n_gate:   # fit_gate's statistics and the update it falls back to
        shapes.update(gate_mean=D_src, gate_U=(D_src, cfg.n_gate), gate_center=cfg.n_gate,
                      gate_signal_var=cfg.n_gate, gate_noise_var=cfg.n_gate, gate_prior=1,
                      gate_fallback=(cfg.n_tgt, cfg.d_tgt))
    for name, shape in shapes.items():
        model.register_buffer(name, torch.zeros(shape))


@torch.no_grad()
def set_linear_map(model, basis, ridge, gate=None):
    """Copy the public basis, the ridge skip path and the gate into the model's saved buffers."""
    for tensors, new in ((model.basis, basis), (model.ridge, ridge), (model.gate, gate)):
        for name, t in (tensors or {}).items():
            t.copy_(new[name])


# --- the public subspace: PCA of clean public TinyLM updates


def public_basis(X_clean, k):
    """Top-k principal directions of CLEAN public shadow TinyLM updates X_clean (N, n_src, d_src):
    {"mean": (D,), "U": (D, k)} with orthonormal columns, or None for k = 0 (no projection).
    Why projecting helps with DP uploads: DP-SGD noise spreads evenly over all D = n_src * d_src
    (~2,000) coordinates of an update, while what distinguishes one fine-tune from another (here:
    the data's convention) lives in a few directions. A k-dim subspace keeps all of that signal
    but only k / D of the noise's energy. It needs public data only."""
    if k == 0:
        return None
    ### BEGIN SOLUTION public_subspace
    X = X_clean.flatten(1).double()
    mean = X.mean(0)
    U = torch.linalg.svd(X - mean, full_matrices=False).Vh[:k].T          # (D, k)
    return {"mean": mean.float(), "U": U.float().contiguous()}
    ### END SOLUTION


def project(X, basis):
    """(N, n, d) -> (N, n, d): mean + U U^T (x - mean); unchanged when basis is None."""
    if basis is None:
        return X
    ### BEGIN SOLUTION public_subspace
    mean = basis["mean"].to(X.device)
    U = basis["U"].to(X.device)
    centred = X.flatten(1).float() - mean
    return (mean + (centred @ U) @ U.T).view(X.shape)
    ### END SOLUTION


# --- the linear map: ridge regression in the dual, one factorisation for every lambda


def ridge_factors(X, Y):
    """Ridge regression Y ~ X on z-scored, flattened updates, solved in the dual (N << dims):
    pred(x) = z(x) @ keys^T @ values, keys = z(X_train), values = (K + lam I)^-1 z(Y_train). This
    is all of it before lambda enters: the z-scoring, K = keys keys^T = Q diag(e) Q^T and Q^T z(Y),
    computed once for a search over lambda; each lambda then only rescales (`ridge_at`)."""
    ### BEGIN SOLUTION ridge_dual
    X = X.flatten(1).double()
    Y = Y.flatten(1).double()
    x_mean = X.mean(0)
    x_std = X.std(0) + 1e-8
    y_mean = Y.mean(0)
    y_std = Y.std(0) + 1e-8
    keys = (X - x_mean) / x_std
    # (K + lam I)^-1 through K's eigenvectors, keeping only those with a non-negligible eigenvalue:
    # the rest meet keys^T's null space, so they add exactly nothing to a prediction -- but with
    # projected inputs (K has rank k) they hold float round-off scaled by 1 / lam, and at a small
    # lam that swamps the prediction (several times its size at lam = 1e-3)
    eigenvalues, Q = torch.linalg.eigh(keys @ keys.T)
    kept = eigenvalues > 1e-9 * eigenvalues.max()
    Q = Q[:, kept]                                                        # (N, r)
    eigenvalues = eigenvalues[kept]                                       # (r,)
    Qt_y = Q.T @ ((Y - y_mean) / y_std)                                   # (r, D_tgt)
    return dict(keys=keys, Q=Q, eigenvalues=eigenvalues, Qt_y=Qt_y,
                x_mean=x_mean, x_std=x_std, y_mean=y_mean, y_std=y_std)
    ### END SOLUTION


def ridge_at(factors, lam):
    """The ridge map at one lambda: values = Q diag(1/(e + lam)) Q^T z(Y) = (K + lam I)^-1 z(Y)."""
    f = factors
    ### BEGIN SOLUTION ridge_dual
    values = f["Q"] @ (f["Qt_y"] / (f["eigenvalues"][:, None] + lam))                   # (N, D_tgt)
    ### END SOLUTION
    ridge = dict(keys=f["keys"], values=values, x_mean=f["x_mean"], x_std=f["x_std"],
                 y_mean=f["y_mean"], y_std=f["y_std"])
    return {name: t.float() for name, t in ridge.items()}


def ridge_predict(ridge, X):
    """TinyLM updates (N, n_src, d_src) -> LLM updates (N, D_tgt), flat: callers .view() them."""
    r = {k: v.to(X.device) for k, v in ridge.items()}
    z = (X.flatten(1).float() - r["x_mean"]) / r["x_std"]
    return (z @ r["keys"].T) @ r["values"] * r["y_std"] + r["y_mean"]


def leading(basis, k):
    """The first k directions of a public basis (`public_basis` of a larger k): the same numbers
    as public_basis(X_clean, k), since both are the top rows of one SVD. None for k = 0."""
    if k == 0:
        return None
    return {"mean": basis["mean"], "U": basis["U"][:, :k].contiguous()}


def linear_candidates(X_clean, X, Y, ks, lams):
    """{(k, lambda): (public basis, ridge map)} fit on pairs X (N, n, d) -> Y (N, ...); ONE SVD
    (`public_basis` at the largest k, sliced by `leading`) serves every k, and one factorisation
    per k serves every lambda (ridge_factors, then ridge_at)."""
    fits = [k for k in ks if k <= min(X_clean.shape[0] - 1, X_clean[0].numel())]  # else: more
    largest = public_basis(X_clean, max(fits, default=0))        # directions than the data has
    maps = {}
    for k in fits:
        basis = leading(largest, k)
        factors = ridge_factors(project(X, basis), Y)
        for lam in lams:
            maps[(k, lam)] = (basis, ridge_at(factors, lam))
    return maps


# --- the selection: the simplest candidate within one standard error of the best


def simplest_within_one_se(scores):
    """The first candidate (`scores`: simplest first) whose per-run scores (lower is better) exceed
    the best's by at most one standard error of the paired difference (Breiman et al. 1984): a dozen
    held-out runs rank candidates only up to noise, and a noise-fitted pick (a larger subspace, a
    weaker ridge, a later checkpoint) breaks under strong DP noise. Scalar scores: the best wins."""
    ### BEGIN SOLUTION one_se_rule
    values = {c: np.atleast_1d(np.asarray(v, dtype=float)) for c, v in scores.items()}
    best = min(values, key=lambda c: values[c].mean())
    for c, v in values.items():
        d = v - values[best]
        if d.mean() <= (d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0):
            return c
    ### END SOLUTION


class LinearMap(NamedTuple):
    """What `select_linear_map` chooses: the public basis (None: raw input), the ridge map, its
    subspace size k and lambda, and every candidate's mean held-out score {(k, lambda): score}."""
    basis: dict
    ridge: dict
    k: int
    lam: float
    scores: dict


def held_out_scores(X_clean, X, Y, criterion, folds, ks, lams, draws):
    """{(k, lambda): per-run scores (n_runs,)} of every candidate linear map, cross-validated: for
    each fold (train runs, held-out runs) the candidates are fit on the train runs and score each
    held-out run on its last `draws` inputs, so every run of `folds` speaks once. All of a fold's
    candidates are scored in ONE criterion call (their predictions stacked, the held-out runs
    repeated once per candidate). Only candidates every fold could fit are kept (a small fold has
    room for fewer directions)."""
    scores = {}
    for train, held_out in folds:
        fitted = linear_candidates(X_clean[train].flatten(0, 1), X[train].flatten(0, 1),
                                   Y[train].flatten(0, 1), ks, lams)
        if not fitted:   # no candidate fits this fold: none is kept
            return {}
        inputs = X[held_out, -draws:].flatten(0, 1)                      # (runs * draws, n, d)
        pred = torch.stack([ridge_predict(ridge, project(inputs, basis))
                            for basis, ridge in fitted.values()])        # (C, runs * draws, D)
        pred = pred.view(len(fitted) * len(held_out), draws, *Y.shape[2:])
        run_scores = criterion(pred, list(held_out) * len(fitted))      # (C * runs,)
        for candidate, s in zip(fitted, np.reshape(run_scores, (len(fitted), len(held_out)))):
            scores.setdefault(candidate, []).append(s)
    return {c: np.concatenate([np.atleast_1d(s) for s in v]) for c, v in scores.items()
            if len(v) == len(folds)}


def simplicity(candidate):
    """Sort key of a candidate (k, lambda), simplest first: fewer directions first (k = 0, the raw
    input, has the most), then a stronger ridge."""
    k, lam = candidate
    return (k or math.inf, -lam)


def select_linear_map(X_clean, X, Y, criterion, folds, *, ks, lams, rule="one_se", draws=1):
    """Choose the subspace size k and ridge's lambda by a functional criterion on held-out runs
    (parameter-space error would pick a far too strong lambda; train.functional_criterion is the
    LLM's loss), cross-validated over `folds` (`held_out_scores`), then refit on the train runs of
    fold 0.
    Rule "one_se": the simplest within one SE of the best (`simplest_within_one_se`, in the order
    of `simplicity`); "best": the lowest mean. `criterion(pred (runs, draws, n_tgt, d_tgt), runs)
    -> (runs,)`, lower is better; draws: with DP, optionally all of a run's uploads, not one draw's
    luck. X_clean (runs, S, n, d): clean public TinyLM updates, for the basis; X (runs, P, n, d):
    the inputs the map will be given (DP uploads when clients use DP); Y (runs, P, ...): LLM
    updates."""
    scores = held_out_scores(X_clean, X, Y, criterion, folds, ks, lams, draws)
    simplest_first = sorted(scores, key=simplicity)
    if rule == "best":   # the lowest mean held-out score
        k, lam = min(simplest_first, key=lambda c: scores[c].mean())
    else:
        k, lam = simplest_within_one_se({c: scores[c] for c in simplest_first})
    train = folds[0][0]
    refit = linear_candidates(X_clean[train].flatten(0, 1), X[train].flatten(0, 1),
                              Y[train].flatten(0, 1), (k,), (lam,))
    basis, ridge = refit[(k, lam)]
    return LinearMap(basis, ridge, k, lam, {c: float(np.mean(v)) for c, v in scores.items()})


# --- the do-no-harm gate: what a noisy upload still says, along public directions; where the noise
# alone could explain an upload, fall back towards the mean shadow update


def upload_signal(X_clean, X_noisy, basis):
    """How much of a noisy upload is signal, along each public direction: the correlation, over
    shadow runs, between the run's noisy inputs (DP uploads, or means of m of them) and its clean
    update, both projected on the basis. X_clean (N, n, d), X_noisy (N, P, n, d) -> (k,). 1: the
    noise does not matter; 0: no map, however trained, can translate the upload that way."""
    U = basis["U"]
    mean = basis["mean"]
    clean = (X_clean.flatten(1) - mean) @ U                                   # (N, k)
    clean = clean[:, None].expand(-1, X_noisy.shape[1], -1).flatten(0, 1)     # (N*P, k)
    noisy = ((X_noisy.flatten(2) - mean) @ U).flatten(0, 1)                   # (N*P, k)
    a = clean - clean.mean(0)
    b = noisy - noisy.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0) + 1e-12)


def fit_gate(X_noisy, noise, basis, fallback, prior=0.5):
    """Statistics of the do-no-harm gate (`gate_weight`) along the public directions of `basis`, in
    coordinates c = U^T (x - mean): X_noisy (N, n, d) the map's noisy training inputs (their centre,
    and their spread: signal plus noise), noise (N', n, d) draws of the noise alone at the inputs'
    noise level (data.dp_noise: a DP draw minus the mean of its subset's draws, rescaled), fallback
    (n_tgt, d_tgt) the mean shadow LLM update; prior: the share of uploads the gate expects to carry
    a convention of their own."""
    coords = (X_noisy.flatten(1).float() - basis["mean"]) @ basis["U"]                  # (N, k)
    noise_var = (noise.flatten(1).float() @ basis["U"]).pow(2).mean(0)                 # (k,)
    signal_var = (coords.var(0) - noise_var).clamp(min=1e-3 * noise_var.max().item())
    return {"mean": basis["mean"], "U": basis["U"], "center": coords.mean(0),
            "signal_var": signal_var, "noise_var": noise_var, "prior": torch.tensor([prior]),
            "fallback": fallback}


def gate_weight(gate, X):
    """(N, n, d) uploads -> (N,) weights in (0, 1): the probability that an upload carries a
    convention of its own rather than noise around the centre. Two hypotheses for its coordinates c
    along the gate's directions:
        noise only:  c ~ N(center, noise_var)               (writes like the public does)
        signal:      c ~ N(center, signal_var + noise_var)  (writes like any shadow subset)
    and Bayes' rule with the prior. An upload far from the centre in units of the noise gets ~1
    (translated as it is); one the noise alone explains gets a small weight, so the provider falls
    back towards the mean shadow update, not sending a mostly-noise upload to a wrong corner."""
    X = X.flatten(1).float().to(gate["mean"].device)          # an upload held on the CPU, too
    c = (X - gate["mean"]) @ gate["U"] - gate["center"]                               # (N, k)
    n = gate["noise_var"]
    s = gate["noise_var"] + gate["signal_var"]
    log_ratio = (0.5 * c.pow(2) * (1 / n - 1 / s) - 0.5 * torch.log(s / n)).sum(1)  # signal/noise
    return torch.sigmoid(log_ratio + torch.logit(gate["prior"]))


def do_no_harm(gate, updates, uploads, hard=False):
    """The gate applied: LLM updates (B, n_tgt, d_tgt) made from uploads (B, n_src, d_src), moved
    back towards the mean shadow update (gate["fallback"]) as far as each upload may be noise
    (`gate_weight`). Without a gate (None: no DP, or the paper) the updates as they are.
    hard: decide instead of blending: each update as it is where its upload more likely carries a
    convention than not (weight >= 1/2), else the mean update. Why both: the LLM's accuracy
    answers an update like a switch, not a dial (0.7 of a convention's update often teaches none
    of it), so blending a well-measured upload can throw its whole gain away, while deciding never
    sends a fraction; but where the map itself errs on an upload, a blend loses less."""
    if gate is None:
        return updates
    fallback = gate["fallback"]
    weight = gate_weight(gate, uploads)[:, None, None].to(fallback.device)
    updates = updates.to(fallback.device)
    if hard:
        return torch.where(weight >= 0.5, updates, fallback)
    return fallback + weight * (updates - fallback)


# --- the provider's choice: at the client's privacy level, the translation or a simpler fallback,
# whichever the held-out shadow runs say serves best within a budget of harm


CANDIDATES = ("checked", "translator_hard", "ridge_hard", "translator_ungated", "ridge_ungated",
              "translator", "ridge")
"""What the provider may send for an upload besides the mean shadow update (which needs no upload at
all), in the order it prefers them when held-out runs cannot tell them apart. First the check
(`checked`: for each upload the deciding gate passes, the mean update, the map's or the
translator's, whichever makes the LLM answer as the client's own TinyLM does), then the gate
deciding (`_hard`: an upload the noise explains better than a convention gets the mean update,
which protects a client near the centre, whose upload is mostly noise), then no gate
(`_ungated`), then the gate blending (no suffix). At each, "translator" (the linear map plus the
translator's residual: the whole of `translate`) before "ridge" (the map alone): the translator's
residual was already kept only as far as held-out runs said it helps (`fit` stops at its earliest
checkpoint within one standard error of the best), so where the choice cannot tell the two apart,
the translation the provider trained is sent (`candidate_update`)."""

CHECKED = ("mean_shadow", "ridge_hard", "translator_hard")
"""What the check (`check_uploads`) chooses among for each upload, simplest first: behind the
deciding gate, so an upload the noise explains better than a convention keeps the mean update
whatever its TinyLM answers (a client near the middle of the simplex, whose DP TinyLM learned a
skew its data does not have, would otherwise be sent it)."""


class Choice(NamedTuple):
    """What `choose` picks for one privacy level: the candidate sent for every upload at that level
    ("mean_shadow": no upload is read), its mean held-out gain over the mean update and its mean
    held-out loss, and every candidate's {name: [gain, loss, worst held-out run's mean gain]}."""
    candidate: str
    gain: float
    loss: float
    scores: dict


def choose(gains, runs, budget, order=CANDIDATES):
    """The provider's choice for uploads at one privacy level, from held-out shadow uploads alone:
    gains {candidate: (U,)} each candidate's accuracy minus the mean shadow update's, on fresh
    records of the upload's own shadow run; runs (U,) the run each upload came from.
    1. Safe enough: a candidate's held-out LOSS is the mean over the uploads of max(0, -gain), what
       a client loses to the mean update on average where it loses at all (gains elsewhere do not
       buy it back); it must be at most `budget`, and its mean gain above 0.
    2. Of those, the first in `order` (CANDIDATES') whose mean gain is within one standard
       error of the best's, the error of the best's mean over the runs (Breiman's one-SE rule).
       Why not the paired difference the linear map's selection uses: two candidates here differ
       on a few uploads only, so their paired difference has almost no spread, and a 0.001 edge
       that the same few uploads give on every run would count; against how much the runs
       themselves differ, such an edge is noise, and the preferred candidate is the safer bet.
    3. None safe and gaining: the mean update.
    Why a budget on the average loss, not a bound on the worst held-out run: at the knee a noisy
    upload now and then looks like a convention it is not, and its translation lands in the wrong
    corner; a run with one such upload in four fails a worst-run bound for every candidate, which
    leaves the mean update and the loss of the whole gain. Nothing here sees a client: the choice
    is fixed before any upload arrives."""
    runs = np.asarray(runs)
    scores = {}
    run_gains = {}   # each admissible candidate's per-run mean gains
    for candidate in (c for c in order if c in gains):
        g = np.asarray(gains[candidate], dtype=float)
        per_run = np.array([g[runs == r].mean() for r in np.unique(runs)])
        scores[candidate] = [float(g.mean()), float(np.maximum(-g, 0).mean()),
                             float(per_run.min())]
        if scores[candidate][1] <= budget and scores[candidate][0] > 0:
            run_gains[candidate] = per_run
    if not run_gains:
        return Choice("mean_shadow", 0.0, 0.0, scores)
    best = max(run_gains, key=lambda c: run_gains[c].mean())
    error = run_gains[best].std(ddof=1) / math.sqrt(len(run_gains[best]))
    chosen = next(c for c, v in run_gains.items() if v.mean() >= run_gains[best].mean() - error)
    return Choice(chosen, scores[chosen][0], scores[chosen][1], scores)


# -----------------------------------------------------------------------------
# 3. the provider's prediction, composed in one place: gate(uploads, linear_map(x) + residual(x))


def skip_path(model, x):
    """The linear map's prediction for inputs x (B, n_src, d_src), already on the public subspace,
    in the decoder's normalised target units (B, n_tgt, d_tgt): the base the decoder adds its
    residual to. None without a skip path (the paper)."""
    if model.ridge is None:
        return None
    flat = ridge_predict(model.ridge, x)                                 # (B, n_tgt * d_tgt)
    return normalize(model, flat.view(len(x), model.cfg.n_tgt, model.cfg.d_tgt), "y")


def linear_map_plus_residual(model, x):
    """x (B, n_src, d_src) on the public subspace -> raw LLM updates (B, n_tgt, d_tgt): the
    decoder's residual on top of the linear map, in normalised units (each token the decoder reads
    back is the sum: base + residual), then denormalised. The paper: the decoder alone."""
    out = decode(model, normalize(model, x, "x"), skip_path(model, x))
    return denormalize(model, out, "y")


GATES = ("blend", "hard", "none")   # how `translate` applies the do-no-harm gate


@torch.no_grad()
def translate(model, uploads, linear=None, gate="blend"):
    """The provider's prediction for raw uploads (B, n_src, d_src): raw LLM updates
    (B, n_tgt, d_tgt),

        gate(uploads, linear_map(x) + residual(x)),   x = the uploads on the public subspace.

    Every method that reads an upload is this expression, with parts left out:
        gradtx          translate(model, uploads)                               all of it
        ridge           translate(model, uploads, linear=ridge)                 no residual
        ridge_ungated   translate(model, uploads, linear=ridge, gate="none")    no gate either
    linear: a ridge map (`ridge_at`) to use alone in place of the decoder; the fit log keeps it,
    since a translator trained without the skip path has none in its buffers. gate: "blend" (the
    gate's weight moves an update towards the mean update), "hard" (the gate decides between
    them), "none" (`do_no_harm`). With every addition off (no basis, no skip path, no gate) this
    is the paper's translator."""
    if gate not in GATES:
        raise ValueError(f"gate={gate!r}: expected one of {GATES}")
    x = project(uploads, model.basis)
    if linear is None:
        updates = linear_map_plus_residual(model, x)
    else:
        updates = ridge_predict(linear, x).view(len(x), model.cfg.n_tgt, model.cfg.d_tgt)
    if gate != "none":
        updates = do_no_harm(model.gate, updates, uploads, hard=gate == "hard")
    return updates


@torch.no_grad()
def candidate_update(model, uploads, candidate, linear, fallback, check=None):
    """One candidate of the provider's choice for raw uploads (B, n_src, d_src), raw LLM updates
    (B, n_tgt, d_tgt): "mean_shadow" (the fallback (n_tgt, d_tgt) for every upload), or a name of
    CANDIDATES: "checked" (`check_uploads`, which needs `check`), "ridge" (the linear map) or
    "translator" (all of `translate`), then the gate: blending (no suffix), "_hard" (deciding) or
    "_ungated" (none)."""
    if candidate == "mean_shadow":
        return fallback.expand(len(uploads), -1, -1)
    if candidate == "checked":
        return check_uploads(model, uploads, linear, fallback, check).updates
    if candidate not in CANDIDATES:
        raise ValueError(f"unknown candidate {candidate!r}: expected mean_shadow or one of "
                         f"{CANDIDATES}")
    method, _, suffix = candidate.partition("_")
    gate = {"": "blend", "hard": "hard", "ungated": "none"}[suffix]
    return translate(model, uploads, linear=linear if method == "ridge" else None, gate=gate)


class Checked(NamedTuple):
    """What the check sends for each of B uploads."""
    updates: torch.Tensor   # (B, n_tgt, d_tgt)
    picks: list             # (B,) the name in CHECKED of each upload's update


@torch.no_grad()
def check_uploads(model, uploads, linear, fallback, check):
    """The check (the candidate "checked"): for each raw upload (B, n_src, d_src), the simplest of
    CHECKED (the mean update, then the map's, then the translator's, behind the deciding gate) under
    which the LLM answers as the client's own TinyLM does within one standard error of the best.

    The provider can rebuild the client's DP TinyLM from its upload (the public TinyLM plus the
    update: post-processing, no further privacy cost) and let it answer public prompts. What the
    client's data taught its TinyLM (a convention, or nothing but noise) shows in those answers, and
    the LLM update the client needs is one that makes the LLM give them too. So where the gate
    reads an upload's coordinates along a few public directions, the check reads what the upload
    DOES, and catches a translation sent astray (by the translator's residual, or by the map) to a
    corner the client's TinyLM does not answer in. The gate still decides first: without it the
    check would also send a convention to a client near the middle of the simplex whose DP TinyLM
    answers in one that its data does not have (RESULTS.md measures both). Its limit: where the
    noise leaves the rebuilt TinyLM's greedy answers those of the public TinyLM (few records, small
    epsilon), they show the public default, not the upload, and the check leans towards whichever
    option answers like the public TinyLM (RESULTS.md: seed 0's small groups).

    check(uploads (B, n_src, d_src), options (C, B, n_tgt, d_tgt)) -> B tensors (C, P_b): the LLM's
    loss under each option on each of the P_b answers of the upload's TinyLM (eval.tinylm_check, a
    function of the public models and public prompts only). Each upload's options are compared by
    `simplest_within_one_se` over those answers, as the linear map's candidates are over held-out
    runs: a few answers' worth of edge is noise, and then the simpler update is sent. An upload
    whose TinyLM gives no usable answer (P_b = 0) gets the mean update."""
    if check is None:
        raise ValueError("the candidate 'checked' needs check(uploads, options) -> per-answer "
                         "losses (eval.tinylm_check), got None")
    options = torch.stack([candidate_update(model, uploads, c, linear, fallback)
                           for c in CHECKED])                             # (C, B, n_tgt, d_tgt)
    picks = []
    for losses in check(uploads, options):                                # each (C, P_b)
        scores = {c: losses[j].numpy() for j, c in enumerate(CHECKED)}
        picks.append(simplest_within_one_se(scores) if losses.shape[1] else CHECKED[0])
    chosen = torch.tensor([CHECKED.index(p) for p in picks], device=options.device)
    updates = options[chosen, torch.arange(len(uploads), device=options.device)]
    return Checked(updates, picks)


class Sent(NamedTuple):
    """What the provider sends for B uploads under its choice."""
    updates: torch.Tensor   # (B, n_tgt, d_tgt) raw LLM updates
    names: list             # (B,) what each is: the choice, "checked:<what the check picked>",
                            #   "shift:<what the answer test sent instead>"


# --- the answer test, on top of the choice: where the rebuilt TinyLM's next token moves towards an
# operator further than noise alone moves it, an update under which the LLM answers that operator


class Corners(NamedTuple):
    """For each of the task's A conventions, the shadow fine-tune of the LLM under which the LLM
    answers it most (`convention_corners`): what the answer test sends where an upload's TinyLM
    moved towards a convention and no translation of it makes the LLM answer so."""
    updates: torch.Tensor   # (A, n_tgt, d_tgt) raw LLM updates
    runs: list              # (A,) which shadow update each is; -1: none answers that convention


class AnswerTest(NamedTuple):
    """The answer test's calibration at one privacy level (`fit_answer_test`): how far noise alone
    moves the rebuilt TinyLM's next token towards each of the task's A conventions, and the
    updates it may send at a corner of the simplex (None: it sends translations only)."""
    centre: torch.Tensor    # (A,) the mean shift of noise-only uploads
    scale: torch.Tensor     # (A,) its standard deviation
    threshold: float        # a z = (shift - centre) / scale that noise alone rarely passes
    corner_threshold: float  # one it passes more rarely still: a corner asks for more evidence
    corners: Corners | None = None


def fit_answer_test(null_shifts, corners=None, false_pass=0.05, corner_false_pass=0.01):
    """AnswerTest from the shifts (N, A) of N noise-only uploads at one privacy level (DP
    fine-tunes of public records that hold no convention of their own, made as the clients make
    theirs: train.answer_test_stage). threshold: the (1 - false_pass) quantile of each noise-only
    upload's largest z, so that a share false_pass of them passes; corner_threshold: the same at
    corner_false_pass. corners: Corners, or None."""
    centre = null_shifts.mean(0)
    scale = null_shifts.std(0).clamp(min=1e-8)
    largest = ((null_shifts - centre) / scale).amax(1)                                  # (N,)
    return AnswerTest(centre, scale, torch.quantile(largest, 1 - false_pass).item(),
                      torch.quantile(largest, 1 - corner_false_pass).item(), corners)


def convention_corners(shadow_updates, probabilities):
    """Corners from the provider's shadow fine-tunes of the LLM (R, n_tgt, d_tgt) and the LLM's
    probability of each convention under each (R, A; eval.answer_shifts' `llm`): for each
    convention, the update that gives it the highest probability, kept only where it is then the
    LLM's most probable convention (the LLM answers it)."""
    best = probabilities.argmax(0)                                                  # (A,)
    runs = [r if probabilities[r].argmax().item() == a else -1
            for a, r in enumerate(best.tolist())]
    return Corners(shadow_updates[best], runs)


def answer_z(test, shifts):
    """shifts (B, A) -> (B, A): how far each upload's TinyLM moved towards each convention, in
    standard deviations of the moves noise alone makes, from their centre."""
    return (shifts - test.centre) / test.scale


def shifted_convention(test, z):
    """z (B, A) (`answer_z`) -> (B,) the convention each upload's TinyLM moved towards further
    than noise alone would (`AnswerTest`), -1 where none did."""
    best, convention = z.max(1)
    return torch.where(best > test.threshold, convention, -1)


def corner_for(test, z, convention, default):
    """Whether the answer test may send the corner (`Corners`) of `convention` for an upload with
    z (A,). A corner answers its convention on every prompt: a bigger bet than a translation of
    the upload, so it asks for more evidence, on two counts.
    1. The move towards the convention passes `corner_threshold` (what a share corner_false_pass
       of noise-only uploads reach, not false_pass): a noise-only upload that passes the test
       and is sent a corner loses its whole gain.
    2. The upload's TinyLM moved AWAY from the `default`, the convention the LLM answers under the
       mean update (z below the noise's centre; so never the default's own corner, which the
       mean update answers anyway). The noise-only uploads learned the task mixture, whose largest
       share is the default: a client whose data hold less of it moves away from it, while one
       whose data mostly follow it may move towards a convention its data hold a little of.
    And the test's corners must hold one for the convention."""
    return (test.corners is not None and test.corners.runs[convention] >= 0
            and z[convention].item() > test.corner_threshold and z[default].item() < 0)


UNSUPPORTED_Z = 1.0
"""A move of the TinyLM towards a convention this small (in z, `answer_z`) is one noise alone
commonly makes (within one standard deviation of the noise-only uploads' centre): no support for an
update under which the LLM answers that convention (`veto_unsupported`)."""


def veto_unsupported(sent, z, answers, fallback):
    """Sent for B uploads, with the mean update (`fallback`, which the LLM answers in the default
    convention) in place of every update under which the LLM answers another convention that the
    upload's TinyLM did not move towards (z below UNSUPPORTED_Z). Why: a translation sent astray
    (by the translator's residual, or by the map reading noise) makes the LLM answer a convention
    the client's data do not hold, and the check, which reads the rebuilt TinyLM's greedy answers,
    misses it where the noise leaves those answers the public TinyLM's."""
    answered = answers.llm(sent.updates[None])[0].argmax(1)                          # (B,)
    moved = z.gather(1, answered[:, None].to(z.device))[:, 0]                         # (B,)
    vetoed = (answered != answers.default) & (moved < UNSUPPORTED_Z)
    if not vetoed.any():
        return sent
    updates = sent.updates.clone()
    updates[vetoed.to(updates.device)] = fallback.to(updates.device)
    names = [("shift:mean_shadow" if v else n) for n, v in zip(sent.names, vetoed.tolist())]
    return Sent(updates, names)


ANSWERED = ("ridge_ungated", "translator", "ridge")
"""What the answer test may send in place of the provider's choice, in this order: the map without
the gate first, since where the test passes an upload the gate held back, the gate's caution is
what kept the LLM from the client's operator."""


@torch.no_grad()
def answer_test(model, uploads, sent, linear, fallback, answers, test):
    """The answer test, on top of the provider's choice: for each raw upload (B, n_src, d_src)
    whose rebuilt TinyLM moves towards a convention further than noise alone would
    (`shifted_convention`), the first of the update sent (`sent`, Sent) and ANSWERED under which
    the LLM answers that same convention (its most probable after '='); where none does, that
    convention's corner (a shadow fine-tune of the LLM that answers it; `corner_for` says when);
    `sent` elsewhere. First, though, the mean update in place of an update sent under which the
    LLM answers a convention the TinyLM did not move towards (`veto_unsupported`).

    Why: at the knee (few records, small epsilon) the noise leaves the rebuilt TinyLM's greedy
    answers those of the public TinyLM, so the check (`check_uploads`) sees the public default and
    the gate's weight sees coordinates the noise dominates; what the upload still shows is a small
    move of the TinyLM's probabilities towards the client's operator. The test compares that move
    with those of noise-only uploads at the same level (a share `false_pass` of which pass), and
    trusts an update only as far as it makes the LLM answer the same way. Where the map does not
    carry a convention the client's TinyLM learned (a direction the noise drowns), the provider
    still has its own LLM fine-tunes on public records of that convention. It reads public
    prompts and public models only (eval.answer_shifts): post-processing of the upload, as every
    candidate. answers: eval.AnswerShifts; test: AnswerTest for the uploads' level. Returns Sent."""
    z = answer_z(test, answers.tiny(uploads))                                         # (B, A)
    sent = veto_unsupported(sent, z, answers, fallback)
    convention = shifted_convention(test, z)                                            # (B,)
    if (convention < 0).all():
        return sent
    options = torch.stack([sent.updates] + [candidate_update(model, uploads, c, linear, fallback)
                                            for c in ANSWERED])          # (1 + C, B, n_tgt, d_tgt)
    named = answers.llm(options).argmax(2)             # (1 + C, B): what the LLM answers under
    updates = sent.updates.clone()
    names = list(sent.names)
    for b in torch.nonzero(convention >= 0).flatten().tolist():
        c = convention[b].item()
        agree = torch.nonzero(named[:, b] == c).flatten().tolist()
        if agree and agree[0] > 0:   # 0: what was sent already answers so
            updates[b] = options[agree[0], b]
            names[b] = f"shift:{ANSWERED[agree[0] - 1]}"
        elif not agree and corner_for(test, z[b], c, answers.default):
            updates[b] = test.corners.updates[c].to(updates.device)
            names[b] = "shift:corner"
    return Sent(updates, names)


@torch.no_grad()
def provide(model, uploads, choice, linear, fallback, check=None, answers=None, test=None):
    """What the provider sends for raw uploads (B, n_src, d_src) under its `choice` (`choose`):
    Sent, the chosen candidate's raw LLM updates (B, n_tgt, d_tgt) and their names, then, given
    the answer shifts and the level's calibration (`answers`, `test`), the answer test on top
    (`answer_test`)."""
    fallback = fallback.to(model.head.weight.device)
    if choice.candidate == "checked":
        checked = check_uploads(model, uploads, linear, fallback, check)
        sent = Sent(checked.updates, [f"checked:{p}" for p in checked.picks])
    else:
        updates = candidate_update(model, uploads, choice.candidate, linear, fallback)
        sent = Sent(updates, [choice.candidate] * len(uploads))
    if answers is None or test is None:
        return sent
    return answer_test(model, uploads, sent, linear, fallback, answers, test)


@torch.no_grad()
def generate(model, tiny_update):
    """TinyLM update(s) (n_src, d_src) or (B, n_src, d_src) -> LLM update(s), raw units, tinylm.py
    layout: `translate` in eval mode, on the model's device."""
    cfg = model.cfg
    single = torch.is_tensor(tiny_update) and tiny_update.dim() == 2
    batch = len(tiny_update) if torch.is_tensor(tiny_update) and tiny_update.dim() > 0 else 1
    shape = (cfg.n_src, cfg.d_src) if single else (batch, cfg.n_src, cfg.d_src)
    tinylm.check_update(tiny_update, shape, "TinyLM update")   # a clear error for anything else
    was_training = model.training
    model.eval()
    uploads = (tiny_update[None] if single else tiny_update).float().to(model.head.weight.device)
    out = translate(model, uploads)
    model.train(was_training)
    if single:
        return out[0].cpu()
    return out.cpu()


# -----------------------------------------------------------------------------
# 4. training on shadow pairs, and checkpoints: the paper's, the same with the additions on (they
# validate through `generate`; the config and the buffers travel with the weights)


class Translator(NamedTuple):
    """A fitted Grad-Transformer and its fit log (train.fit_stage), for one noise level."""
    model: GradTransformer
    log: dict


def validate(model, X_val, Y_val, val_criterion=None):
    """Score the model's predictions (`generate`) for held-out pairs X_val -> Y_val, raw units:
    ({"val_mse": in normalised units, "val_rel_err": mean relative error}, per-run scores (n_val,)
    by `val_criterion(pred_Y_val)`, lower is better; without one, each pair's normalised MSE)."""
    device = model.head.weight.device
    pred = generate(model, X_val)
    errors = (normalize(model, pred.to(device), "y") - normalize(model, Y_val.to(device), "y"))
    errors = errors.pow(2)
    val_mse = errors.mean().item()
    rel = ((pred - Y_val).flatten(1).norm(dim=1) / Y_val.flatten(1).norm(dim=1)).mean().item()
    if val_criterion is not None:
        per_run = val_criterion(pred)
    else:
        per_run = errors.flatten(1).mean(1).cpu().numpy()
    return {"val_mse": val_mse, "val_rel_err": rel}, per_run


def fit(model, X_train, Y_train, X_val, Y_val, *, steps, lr, weight_decay=0.0, batch_size=32,
        eval_every=100, val_criterion=None, seed=0, compile=False, dtype="float32"):
    """Train on pairs X (N, n_src, d_src) -> Y (N, n_tgt, d_tgt), raw units, with teacher forcing
    and AdamW, validating every `eval_every` steps on held-out RUNS' pairs (`validate`). Keeps the
    earliest checkpoint within one standard error of the best (`simplest_within_one_se`): step 0,
    the linear map, unless training beats it by more than the held-out runs' noise. Every step's
    batch is drawn up front; a step reads nothing back to the host (`fit_step`). compile, dtype:
    the step's (tinylm.compiled, tinylm.autocast).
    Returns {"history": [{"step", "train_mse", "val_mse", "val_rel_err", "criterion"}],
    "best_step"}."""
    # long: the training loop, read top to bottom
    torch.manual_seed(seed)
    device = model.head.weight.device
    X_train = X_train.to(device)
    Y_train = Y_train.to(device)
    x = project(X_train, model.basis)            # on the public subspace (the paper: as it is)
    set_stats(model, x, Y_train)
    xs = normalize(model, x, "x")
    base = skip_path(model, x)
    ys = normalize(model, Y_train, "y")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                            fused=device.type == "cuda" or None)   # one kernel on CUDA
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    # (steps, batch_size): the numbers a draw of batch_size a step gives, copied to the device once
    batches = torch.randint(len(xs), (steps, batch_size),
                            generator=torch.Generator().manual_seed(seed)).to(device)

    def batch_loss(idx):   # the step's forward: gather the batch, the teacher-forcing loss
        with tinylm.autocast(device, dtype):
            base_batch = None if base is None else base[idx]
            return teacher_forcing_loss(model, xs[idx], ys[idx], base_batch)

    loss_of_batch = tinylm.compiled(batch_loss, compile=compile, device=device)
    history = []
    per_run = {}    # step -> per-run validation scores
    states = {}     # step -> the weights then
    train_loss = None
    for step in (bar := tqdm(range(steps + 1), desc="fit grad-transformer", leave=False)):
        if step % eval_every == 0 or step == steps:
            scores, per_run[step] = validate(model, X_val, Y_val, val_criterion)
            crit = float(np.mean(per_run[step]))
            train_mse = float("nan") if train_loss is None else train_loss.item()
            history.append({"step": step, "train_mse": train_mse, **scores, "criterion": crit})
            # the weights only: the buffers do not train (the skip path's are training-set sized)
            states[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            bar.set_postfix(val=f"{crit:.4f}")
        if step == steps:
            break
        model.train()
        train_loss = fit_step(opt, scaler, loss_of_batch(batches[step]))
    best_step = simplest_within_one_se(per_run)   # earliest first: dicts keep their order
    model.load_state_dict(states[best_step], strict=False)
    model.eval()
    return {"history": history, "best_step": best_step}


def fit_step(opt, scaler, loss):
    """One AdamW step of the translator from its batch's loss (scaled under float16: `scaler`
    skips a step whose gradients overflow). Returns the loss, detached: no host read."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def save(model, path):
    """The config and the state dict (weights and buffers), written atomically."""
    tinylm.atomic_save({"config": asdict(model.cfg), "state_dict": model.state_dict()}, path)


def load(path, tiny_shape=None, llm_shape=None, device="cpu"):
    """Load a Grad-Transformer; refuse one made for other TinyLM / LLM update shapes."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GradTransformer(GTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise ValueError(f"{path}: not a valid Grad-Transformer checkpoint ({e})") from e
    expected = (("TinyLM", tiny_shape, (model.cfg.n_src, model.cfg.d_src)),
                ("LLM", llm_shape, (model.cfg.n_tgt, model.cfg.d_tgt)))
    for what, want, have in expected:
        if want is not None and tuple(want) != have:
            raise ValueError(f"{path}: this Grad-Transformer was made for {what} updates of shape "
                             f"{have}, but the {what} here has update shape {tuple(want)}")
    return model.to(device).eval()
