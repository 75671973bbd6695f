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

Then this project's measured additions, each an option (off = the paper): the input projected on
a public subspace, the top principal directions of clean public shadow TinyLM updates, which keeps
DP noise out (`public_basis`); a linear skip path, so the decoder learns the residual over a ridge
map (`ridge_factors`; train.py chooses the map by the LLM's loss on held-out shadow runs); and the
do-no-harm gate for noisy uploads (dp.py). Checkpoints are kept by the same criterion: the
simplest within one standard error of the best (`simplest_within_one_se`).

    python -m pytest tests/test_gradtx.py
"""
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import dp
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
    n_basis: int = 0     # k: input projected onto a k-dim public subspace (0: raw input, the paper)
    n_skip: int = 0      # training pairs behind the ridge skip path (0: no skip path, the paper)
    # public directions of the do-no-harm gate for noisy uploads (0: no gate, the paper)
    n_gate: int = 0


# -----------------------------------------------------------------------------
# the paper's translator: attention, encoder and decoder layers, the model


class Attention(nn.Module):
    """Multi-head attention of queries x over a context (x itself, or the encoder's output).
    Not tinylm.SelfAttention: that one is causal self-attention only, with LoRA on q and v."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.q, self.k = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v, self.o = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def forward(self, x, context, causal=False):
        (B, T, C), S = x.shape, context.shape[1]
        split = lambda t, n: t.view(B, n, self.n_head, C // self.n_head).transpose(1, 2)
        q, k, v = split(self.q(x), T), split(self.k(context), S), split(self.v(context), S)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))     # (B, n_head, T, S)
        if causal:  # token t may look at target tokens 0..t only
            future = torch.ones(T, S, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(future, float("-inf"))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        return self.o(y)


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg.d_model, cfg.n_head)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model), tinylm.MLP(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.drop(self.attn(h, h))
        return x + self.drop(self.mlp(self.ln_2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.self_attn = nn.LayerNorm(cfg.d_model), Attention(cfg.d_model, cfg.n_head)
        self.ln_2, self.cross_attn = nn.LayerNorm(cfg.d_model), Attention(cfg.d_model, cfg.n_head)
        self.ln_3, self.mlp = nn.LayerNorm(cfg.d_model), tinylm.MLP(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y, memory):
        h = self.ln_1(y)
        y = y + self.drop(self.self_attn(h, h, causal=True))
        y = y + self.drop(self.cross_attn(self.ln_2(y), memory))
        return y + self.drop(self.mlp(self.ln_3(y)))


class GradTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, D = cfg, cfg.d_model
        self.src_in, self.tgt_in = nn.Linear(cfg.d_src, D), nn.Linear(cfg.d_tgt, D)
        self.src_pos = nn.Parameter(0.02 * torch.randn(cfg.n_src, D))   # learned positions
        self.tgt_pos = nn.Parameter(0.02 * torch.randn(cfg.n_tgt, D))
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.ln_enc, self.ln_dec = nn.LayerNorm(D), nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(D, cfg.d_tgt)
        nn.init.zeros_(self.head.weight)   # the untrained model predicts 0 in normalised units,
        nn.init.zeros_(self.head.bias)     # i.e. the mean shadow update
        # per-coordinate statistics (set_stats): mean 0, std 1 is a no-op until they are set
        for name, shape in (("x", (cfg.n_src, cfg.d_src)), ("y", (cfg.n_tgt, cfg.d_tgt))):
            self.register_buffer(f"{name}_mean", torch.zeros(shape))
            self.register_buffer(f"{name}_std", torch.ones(shape))
        register_additions(self, cfg)   # this project's additions, below; none in the paper's

    # {rest of the name: live buffer} for buffers prefix*; None if none
    def buffers_named(self, prefix):
        return {n.removeprefix(prefix): t for n, t in self.named_buffers(recurse=False)
                if n.startswith(prefix)} or None

    basis = property(lambda self: self.buffers_named("basis_"))  # {"mean", "U"}; None: raw input
    ridge = property(lambda self: self.buffers_named("ridge_"))  # ridge_at's; None: no skip path
    gate = property(lambda self: self.buffers_named("gate_"))    # fit_gate's; None: no gate

    def forward(self, src, tgt_in, base=None):
        """src (B, n_src, d_src), tgt_in (B, T, d_tgt) -> next tokens (B, T, d_tgt); normalised
        units. base (B, n_tgt, d_tgt): the skip path's prediction, to which the decoder adds its
        residual."""
        memory = self.drop(self.src_in(src) + self.src_pos)                 # (B, n_src, D)
        for layer in self.encoder:
            memory = layer(memory)
        memory = self.ln_enc(memory)
        T = tgt_in.shape[1]
        y = self.drop(self.tgt_in(tgt_in) + self.tgt_pos[:T])              # (B, T, D)
        for layer in self.decoder:
            y = layer(y, memory)
        out = self.head(self.ln_dec(y))
        return out if base is None else out + base[:, :T]


# -----------------------------------------------------------------------------
# what the model reads and writes: z-scores, teacher forcing, autoregressive generation


@torch.no_grad()
def set_stats(model, X, Y):
    """Per-coordinate mean/std over N pairs of TinyLM updates X (N, n_src, d_src) and LLM updates
    Y (N, n_tgt, d_tgt). With normalize=False they stay 0 and 1: raw values, as in the paper."""
    if model.cfg.normalize:
        for name, T in (("x", X), ("y", Y)):
            getattr(model, f"{name}_mean").copy_(T.float().mean(0))
            getattr(model, f"{name}_std").copy_(T.float().std(0) + 1e-8)


def normalize(model, T, name):
    return (T - getattr(model, f"{name}_mean")) / getattr(model, f"{name}_std")


def denormalize(model, T, name):
    return T * getattr(model, f"{name}_std") + getattr(model, f"{name}_mean")


def model_inputs(model, X):
    """Raw TinyLM updates (B, n_src, d_src) -> what the network reads: the projected, normalised
    input, and the skip path's prediction in normalised target units (None without a skip path)."""
    X = project(X, model.basis)
    base = None if model.ridge is None else normalize(model, ridge_predict(model.ridge, X).view(
        len(X), model.cfg.n_tgt, model.cfg.d_tgt), "y")
    return normalize(model, X, "x"), base


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
def generate(model, tiny_update):
    """TinyLM update(s) (n_src, d_src) or (B, n_src, d_src) -> LLM update(s), raw units, tinylm.py
    layout."""
    cfg = model.cfg
    single = torch.is_tensor(tiny_update) and tiny_update.dim() == 2
    batch = len(tiny_update) if torch.is_tensor(tiny_update) and tiny_update.dim() > 0 else 1
    shape = (cfg.n_src, cfg.d_src) if single else (batch, cfg.n_src, cfg.d_src)
    tinylm.check_update(tiny_update, shape, "TinyLM update")   # a clear error for anything else
    was_training, device = model.training, model.head.weight.device
    model.eval()
    src_raw = (tiny_update[None] if single else tiny_update).float().to(device)
    src, base = model_inputs(model, src_raw)
    ### BEGIN SOLUTION autoregressive_decoding
    tgt = torch.zeros(len(src), 1, cfg.d_tgt, device=device)   # the start token
    for _ in range(cfg.n_tgt):
        nxt = model(src, tgt, base)[:, -1:]                       # (B, 1, d_tgt)
        tgt = torch.cat([tgt, nxt], dim=1)
    ### END SOLUTION
    model.train(was_training)
    out = denormalize(model, tgt[:, 1:], "y")
    if model.gate is not None:   # do no harm: towards the mean update as far as it may be noise
        out = dp.do_no_harm(model.gate, out, src_raw)
    return out[0].cpu() if single else out.cpu()


# -----------------------------------------------------------------------------
# training on shadow pairs, and checkpoints (the config and the buffers travel with the weights)


class Translator(NamedTuple):
    """A fitted Grad-Transformer and its fit log (train.fit_stage), for one noise level."""
    model: GradTransformer
    log: dict


def fit(model, X_train, Y_train, X_val, Y_val, steps, lr, weight_decay, batch_size,
        eval_every, val_criterion=None, seed=0):
    """Train on pairs X (N, n_src, d_src) -> Y (N, n_tgt, d_tgt), raw units, validating on held-out
    RUNS' pairs: `val_criterion(pred_Y_val) -> (n_val,)` scores autoregressive predictions, lower is
    better (else validation MSE). Keeps the earliest checkpoint within one standard error of the
    best: step 0, the linear map, unless training beats it by more than the held-out runs' noise.
    Returns {"history": [{"step", "train_mse", "val_mse", "val_rel_err", "criterion"}],
    "best_step"}."""
    torch.manual_seed(seed)
    device = model.head.weight.device
    X_train, Y_train = X_train.to(device), Y_train.to(device)
    set_stats(model, project(X_train, model.basis), Y_train)
    (xs, base), ys = model_inputs(model, X_train), normalize(model, Y_train, "y")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history, per_run, states, train_loss = [], {}, {}, None
    for step in (bar := tqdm(range(steps + 1), desc="fit grad-transformer", leave=False)):
        if step % eval_every == 0 or step == steps:
            pred = generate(model, X_val)
            errors = (normalize(model, pred.to(device), "y") - normalize(model, Y_val.to(device),
                                                                         "y")).pow(2)
            val_mse = errors.mean().item()
            rel = ((pred - Y_val).flatten(1).norm(dim=1)
                   / Y_val.flatten(1).norm(dim=1)).mean().item()
            per_run[step] = (val_criterion(pred) if val_criterion
                             else errors.flatten(1).mean(1).cpu().numpy())
            crit = float(np.mean(per_run[step]))
            train_mse = float("nan") if train_loss is None else train_loss.item()  # no sync a step
            history.append({"step": step, "train_mse": train_mse, "val_mse": val_mse,
                            "val_rel_err": rel, "criterion": crit})
            # the weights only: the buffers do not train (the skip path's are training-set sized)
            states[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            bar.set_postfix(val=f"{crit:.4f}")
        if step == steps:
            break
        model.train()
        idx = torch.randint(len(xs), (batch_size,), generator=g).to(device, non_blocking=True)
        loss = teacher_forcing_loss(model, xs[idx], ys[idx], None if base is None else base[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_loss = loss.detach()
    best_step = simplest_within_one_se(per_run)   # earliest first: dicts keep their order
    model.load_state_dict(states[best_step], strict=False)
    model.eval()
    return {"history": history, "best_step": best_step}


def save(model, path):
    tinylm.atomic_save({"config": asdict(model.cfg), "state_dict": model.state_dict()}, path)


def load(path, tiny_shape=None, llm_shape=None, device="cpu"):
    """Load a Grad-Transformer; refuse one made for other TinyLM / LLM update shapes."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GradTransformer(GTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise ValueError(f"{path}: not a valid Grad-Transformer checkpoint ({e})") from e
    for what, want, have in (("TinyLM", tiny_shape, (model.cfg.n_src, model.cfg.d_src)),
                             ("LLM", llm_shape, (model.cfg.n_tgt, model.cfg.d_tgt))):
        if want is not None and tuple(want) != have:
            raise ValueError(f"{path}: this Grad-Transformer was made for {what} updates of shape "
                             f"{have}, but the {what} here has update shape {tuple(want)}")
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# this project's additions (each an option; off = the paper): selection on held-out runs by
# the LLM's loss, the public subspace, the ridge skip path, the do-no-harm gate


def register_additions(model, cfg):
    """The buffers of this project's additions, saved with the model and filled by
    `set_linear_map`: the public basis (cfg.n_basis), the ridge skip path (cfg.n_skip training
    pairs) and the gate (cfg.n_gate directions). The paper's translator (all three 0) has none."""
    D_src, D_tgt, N = cfg.n_src * cfg.d_src, cfg.n_tgt * cfg.d_tgt, cfg.n_skip
    shapes = dict(basis_mean=D_src, basis_U=(D_src, cfg.n_basis)) if cfg.n_basis else {}
    if N:
        shapes.update(ridge_keys=(N, D_src), ridge_values=(N, D_tgt), ridge_x_mean=D_src,
                      ridge_x_std=D_src, ridge_y_mean=D_tgt, ridge_y_std=D_tgt)
    if cfg.n_gate:   # fit_gate's statistics and the update it falls back to
        shapes.update(gate_mean=D_src, gate_U=(D_src, cfg.n_gate), gate_center=cfg.n_gate,
                      gate_signal_var=cfg.n_gate, gate_noise_var=cfg.n_gate, gate_prior=1,
                      gate_fallback=(cfg.n_tgt, cfg.d_tgt))
    for name, shape in shapes.items():
        model.register_buffer(name, torch.zeros(shape))


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


# -----------------------------------------------------------------------------
# the linear map: the public subspace (PCA of clean public TinyLM updates, which keeps DP noise
# out), then the ridge skip path (fit in the dual, one factorisation for every lambda)


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
    mean, U = basis["mean"].to(X.device), basis["U"].to(X.device)
    centred = X.flatten(1).float() - mean
    return (mean + (centred @ U) @ U.T).view(X.shape)
    ### END SOLUTION


def ridge_factors(X, Y):
    """Ridge regression Y ~ X on z-scored, flattened updates, solved in the dual (N << dims):
    pred(x) = z(x) @ keys^T @ values, keys = z(X_train), values = (K + lam I)^-1 z(Y_train). This
    is all of it before lambda enters: the z-scoring, K = keys keys^T = Q diag(e) Q^T and Q^T z(Y),
    computed once for a search over lambda; each lambda then only rescales (`ridge_at`)."""
    ### BEGIN SOLUTION ridge_dual
    X, Y = X.flatten(1).double(), Y.flatten(1).double()
    x_mean, x_std, y_mean, y_std = X.mean(0), X.std(0) + 1e-8, Y.mean(0), Y.std(0) + 1e-8
    keys = (X - x_mean) / x_std
    # (K + lam I)^-1 through K's eigenvectors, keeping only those with a non-negligible eigenvalue:
    # the rest meet keys^T's null space, so they add exactly nothing to a prediction -- but with
    # projected inputs (K has rank k) they hold float round-off scaled by 1 / lam, and at a small
    # lam that swamped the prediction (measured: 5x its size at lam = 1e-3, 5% at 0.1)
    eigenvalues, Q = torch.linalg.eigh(keys @ keys.T)
    kept = eigenvalues > 1e-9 * eigenvalues.max()
    Q, eigenvalues = Q[:, kept], eigenvalues[kept]                        # (N, r), (r,)
    # (r, D_tgt)
    return dict(keys=keys, Q=Q, eigenvalues=eigenvalues, Qt_y=Q.T @ ((Y - y_mean) / y_std),
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


class LinearMap(NamedTuple):
    """What train.select_linear_map chooses: the public basis (None: raw input), the ridge map, its
    subspace size k and lambda, and every candidate's mean held-out score {(k, lambda): score}."""
    basis: dict
    ridge: dict
    k: int
    lam: float
    scores: dict


def linear_candidates(X_clean, X, Y, ks, lams):
    """{(k, lambda): (public basis, ridge map)} fit on pairs X (N, n, d) -> Y (N, ...); one
    factorisation per k serves every lambda (ridge_factors, then ridge_at)."""
    maps = {}
    for k in ks:
        if k > min(X_clean.shape[0] - 1, X_clean[0].numel()):   # more directions than the data has
            continue
        basis = public_basis(X_clean, k)
        factors = ridge_factors(project(X, basis), Y)
        maps.update({(k, lam): (basis, ridge_at(factors, lam)) for lam in lams})
    return maps


@torch.no_grad()
def set_linear_map(model, basis, ridge, gate=None):
    """Copy the public basis, the ridge skip path and the gate into the model's saved buffers."""
    for tensors, new in ((model.basis, basis), (model.ridge, ridge), (model.gate, gate)):
        for name, t in (tensors or {}).items():
            t.copy_(new[name])
