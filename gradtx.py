"""
gradtx.py -- the Grad-Transformer: translate a TinyLM update into an LLM update.

The paper's method section, in code. An update vector is a sequence of layer-tokens
(tinylm.py: one token per transformer layer). The Grad-Transformer is an encoder-decoder:

    TinyLM update Δθ_S  (n_src, d_src) --linear--> encoder  ------------+
                                                                        | cross-attention
    [start, Δθ_T[0], ..., Δθ_T[n-2]] --linear--> decoder (causal) <-----+ --linear--> Δθ_T (n_tgt, d_tgt)

The decoder emits the LLM update one layer-token at a time. Training uses teacher forcing (the
true tokens shifted right behind an all-zero start token); generation is autoregressive, feeding
each produced token back in -- with the SAME start token. Loss: MSE on the LLM update tokens.

Inputs and targets are z-scored per coordinate with the shadow pairs' statistics (the paper uses
raw values; `normalize=False` does that). With the output head initialised to zero, the untrained
model predicts exactly the mean shadow update and training learns the residual.

    python -m pytest tests/test_gradtx.py
"""
import math
from dataclasses import asdict, dataclass

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


# -----------------------------------------------------------------------------
# the model: attention (self or cross), encoder and decoder layers, the whole translator


class Attention(nn.Module):
    """Multi-head attention of queries x over a context (x itself, or the encoder's output)."""

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
        self.cfg = cfg
        D = cfg.d_model
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
        # normalisation statistics, set from the shadow pairs by set_stats(); saved with the model
        for name, shape in (("x", (cfg.n_src, cfg.d_src)), ("y", (cfg.n_tgt, cfg.d_tgt))):
            self.register_buffer(f"{name}_mean", torch.zeros(shape))
            self.register_buffer(f"{name}_std", torch.ones(shape))

    def forward(self, src, tgt_in):
        """src (B, n_src, d_src), tgt_in (B, T, d_tgt) -> next tokens (B, T, d_tgt); normalised units."""
        memory = self.drop(self.src_in(src) + self.src_pos)                 # (B, n_src, D)
        for layer in self.encoder:
            memory = layer(memory)
        memory = self.ln_enc(memory)
        T = tgt_in.shape[1]
        y = self.drop(self.tgt_in(tgt_in) + self.tgt_pos[:T])              # (B, T, D)
        for layer in self.decoder:
            y = layer(y, memory)
        return self.head(self.ln_dec(y))


# -----------------------------------------------------------------------------
# normalisation and the decoder's input


@torch.no_grad()
def set_stats(model, X, Y):
    """Per-coordinate mean/std over the N pairs of TinyLM updates X (N, n_src, d_src) and LLM
    updates Y (N, n_tgt, d_tgt): every entry of every layer-token gets its own statistics.
    With normalize=False they stay 0 and 1: raw values, as in the paper.
    """
    if model.cfg.normalize:
        for name, T in (("x", X), ("y", Y)):
            getattr(model, f"{name}_mean").copy_(T.float().mean(0))
            getattr(model, f"{name}_std").copy_(T.float().std(0) + 1e-8)


def normalize(model, T, name):
    return (T - getattr(model, f"{name}_mean")) / getattr(model, f"{name}_std")


def denormalize(model, T, name):
    return T * getattr(model, f"{name}_std") + getattr(model, f"{name}_mean")


def shift_right(y):
    """(B, T, d) -> (B, T, d): an all-zero start token, then y[:, :-1]. Used in training AND generation."""
    return torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)


# -----------------------------------------------------------------------------
# generation: autoregressive, one LLM layer-token per step


@torch.no_grad()
def generate(model, tiny_update):
    """TinyLM update(s) (n_src, d_src) or (B, n_src, d_src) -> LLM update(s), raw units, tinylm.py layout."""
    cfg = model.cfg
    is_tensor = isinstance(tiny_update, torch.Tensor)
    single = is_tensor and tiny_update.dim() == 2
    batch = len(tiny_update) if is_tensor and tiny_update.dim() > 0 else 1
    shape = (cfg.n_src, cfg.d_src) if single else (batch, cfg.n_src, cfg.d_src)
    tinylm.check_update(tiny_update, shape, "TinyLM update")
    src = tiny_update[None] if single else tiny_update
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    src = normalize(model, src.float().to(device), "x")
    tgt = torch.zeros(len(src), 1, cfg.d_tgt, device=device)   # the start token
    for _ in range(cfg.n_tgt):
        nxt = model(src, tgt)[:, -1:]                             # (B, 1, d_tgt)
        tgt = torch.cat([tgt, nxt], dim=1)
    model.train(was_training)
    out = denormalize(model, tgt[:, 1:], "y").cpu()
    return out[0] if single else out


# -----------------------------------------------------------------------------
# training: MSE with teacher forcing; the checkpoint kept is chosen by a functional criterion


def fit(model, X_train, Y_train, X_val, Y_val, steps, lr, weight_decay, batch_size,
        eval_every, val_criterion=None, seed=0, func_loss=None, func_weight=0.0):
    """Train on (TinyLM update, LLM update) pairs; keep the checkpoint with the best validation.

    X_*: (N, n_src, d_src), Y_*: (N, n_tgt, d_tgt), raw units; the validation pairs come from
    shadow RUNS that are not in the training set. `val_criterion(pred_Y_val) -> float` scores
    autoregressive predictions (lower is better): train.py passes the LLM's answer loss on the
    held-out runs' own data with the predicted update applied. Without it, validation MSE decides.
    Beyond the paper: `func_loss(pred_Y, idx) -> loss` (differentiable, raw units) scores the
    predicted updates of training pairs idx through the frozen LLM, as Text-to-LoRA trains its
    hypernetwork; it is added to the MSE with weight func_weight (0: the paper's pure MSE).
    Returns the history [(step, train_mse, val_mse, val_rel_err, criterion)].
    """
    torch.manual_seed(seed)
    set_stats(model, X_train, Y_train)
    device = model.head.weight.device
    xs, ys = normalize(model, X_train.to(device), "x"), normalize(model, Y_train.to(device), "y")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history, best, best_state, train_mse = [], float("inf"), None, float("nan")
    for step in (bar := tqdm(range(steps + 1), desc="fit grad-transformer", leave=False)):
        if step % eval_every == 0 or step == steps:
            pred = generate(model, X_val)
            val_mse = F.mse_loss(normalize(model, pred.to(device), "y"),
                                 normalize(model, Y_val.to(device), "y")).item()
            rel = ((pred - Y_val).flatten(1).norm(dim=1) / Y_val.flatten(1).norm(dim=1)).mean().item()
            crit = val_criterion(pred) if val_criterion else val_mse
            history.append((step, train_mse, val_mse, rel, crit))
            if crit < best:
                best, best_state = crit, {k: v.clone() for k, v in model.state_dict().items()}
            bar.set_postfix(val=f"{crit:.4f}")
        if step == steps:
            break
        model.train()
        idx = torch.randint(len(xs), (batch_size,), generator=g).to(device)
        pred = model(xs[idx], shift_right(ys[idx]))   # teacher forcing
        loss = mse = F.mse_loss(pred, ys[idx])
        if func_loss is not None and func_weight > 0:
            loss = mse + func_weight * func_loss(denormalize(model, pred, "y"), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_mse = mse.item()
    model.load_state_dict(best_state)
    model.eval()
    return history


# -----------------------------------------------------------------------------
# checkpoints: the config and the normalisation travel with the weights


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
    cfg = model.cfg
    for what, want, have in (("TinyLM", tiny_shape, (cfg.n_src, cfg.d_src)),
                             ("LLM", llm_shape, (cfg.n_tgt, cfg.d_tgt))):
        if want is not None and tuple(want) != have:
            raise ValueError(f"{path}: this Grad-Transformer was made for {what} updates of shape "
                             f"{have}, but the {what} here has update shape {tuple(want)}")
    return model.to(device).eval()
