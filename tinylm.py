"""
tinylm.py -- the language models of gradtx: a small GPT, LoRA on q/v, and update vectors.

Both parties' models are the same `GPT` class at two sizes (config/presets.py: MODEL_PRESETS):
the client's TinyLM and the provider's LLM. After pretraining, each gets LoRA adapters on its
attention q and v projections; fine-tuning trains only those. The *update vector* of a fine-tuned
model is the change of its LoRA matrices from the public init -- Δθ_S (TinyLM) and Δθ_T (LLM) in
the paper -- laid out as one token per transformer layer:

    token[l] = concat( flat(q_A - q_A0), flat(q_B), flat(v_A - v_A0), flat(v_B) )    # (token_dim,)
    token_dim = 4 * rank * n_embd

A0 comes from a fixed seed (every party re-creates it) and B0 = 0: an all-zero update vector is the
pretrained model. Many runs of one base, one vmap'd computation: `finetune_many`, `loss_of_updates`.
Under DP, `finetune` takes dp.py's DP-SGD step, whose per-example gradients are the LoRA layers'
own (`LoRA.per_example_grads`); `finetune_many` gets them another way and says why.

    python -m pytest tests/test_tinylm.py tests/test_batched.py
"""
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import data
import dp

# -----------------------------------------------------------------------------
# the transformer: its configuration, its sizes, its parts


@dataclass
class GPTConfig:
    vocab_size: int = 257    # 256 bytes + <|endoftext|> (data.py's tokenizer)
    block_size: int = 16     # longest sequence the model sees
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


def masked_cross_entropy(logits, targets, mask=None):
    """Mean cross-entropy over the positions where mask is 1 (all positions without a mask)."""
    ### BEGIN SOLUTION masked_cross_entropy
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    mask = torch.ones_like(nll) if mask is None else mask.flatten().to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1)
    ### END SOLUTION


class LoRA(nn.Module):
    """A low-rank delta beside a frozen linear layer: x -> (alpha/r) * x A^T B^T. We store the
    *trainable change* dA = A - A0 (init 0), not A: the update vector IS the parameters, exactly."""

    def __init__(self, n_in, n_out, rank, alpha, generator):
        super().__init__()
        A0 = torch.randn(rank, n_in, generator=generator) / math.sqrt(n_in)
        self.register_buffer("A0", A0)                          # public, re-created from the seed
        self.dA = nn.Parameter(torch.zeros(rank, n_in))         # A - A0
        self.B = nn.Parameter(torch.zeros(n_out, rank))         # B0 = 0: no change at init
        self.scale = alpha / rank

    def forward(self, x):                                       # (B, T, n_in) -> (B, T, n_out)
        ### BEGIN SOLUTION lora_forward
        return (x @ (self.A0 + self.dA).T) @ self.B.T * self.scale
        ### END SOLUTION

    def per_example_grads(self, x, grad_out):
        """Each example's gradient of dA and B (dp.py) from this layer's input x (B, T, n_in) and
        grad_out (B, T, n_out), the gradient of its own loss. out_t = s B h_t, h_t = (A0 + dA) x_t:
            dB = s sum_t g_t h_t^T            dA = s sum_t (B^T g_t) x_t^T     (as Opacus does)"""
        ### BEGIN SOLUTION per_example_grads
        g = grad_out * self.scale                               # (B, T, n_out): s g_t
        h = x @ (self.A0 + self.dA).T                           # (B, T, r)
        g_h = g @ self.B                                        # (B, T, r): s B^T g_t
        # a batched matmul sums over each example's own tokens: (B, r, T) @ (B, T, n_in)
        return {"dA": g_h.mT @ x,                               # (B, r, n_in)
                "B": g.mT @ h}                                  # (B, n_out, r)
        ### END SOLUTION


class SelfAttention(nn.Module):
    """Causal multi-head attention with separate q/k/v/o projections (the paper's q_proj, v_proj),
    written out by hand (no fused kernel): torch.func.vmap batches it and its gradients."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.o_proj = nn.Linear(C, C)
        self.q_lora = None                                      # LoRA on q and v: add_lora()
        self.v_lora = None
        causal = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x)                                      # (B, T, C) each
        k = self.k_proj(x)
        v = self.v_proj(x)
        if self.q_lora is not None:
            q = q + self.q_lora(x)
            v = v + self.v_lora(x)
        ### BEGIN SOLUTION causal_attention
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, n_head, T, T)
        att = att.masked_fill(~self.causal[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)          # back to (B, T, C)
        ### END SOLUTION
        return self.o_proj(y)


class MLP(nn.Module):
    """The feed-forward part of a block: C -> 4C, GELU, -> C."""

    def __init__(self, n_embd):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The language model: token and position embeddings, n_layer blocks, a final LayerNorm and
    an output layer tied to the token embedding (GPT-2's layout, as nanoGPT's)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                   # tied input/output embeddings
        self._init_weights()
        self.lora = None                                        # (rank, alpha, seed) once added

    def _init_weights(self):
        """GPT-2's init: every weight N(0, 0.02^2), every bias 0 (drawn from torch's global
        generator, in module order: `pretrain` seeds it)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None, mask=None):
        """idx, targets: (B, T) token ids; mask: (B, T), 1 where the loss counts (the answer).
        Returns (logits (B, T, vocab), loss): loss is the mean cross-entropy over masked tokens."""
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))   # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, masked_cross_entropy(logits, targets, mask)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, generator=None):
        """Extend each row of idx (B, T) by max_new_tokens; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[0][:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = (logits / temperature).softmax(dim=-1)
                # drawn where the CPU generator lives: a GPU run draws as a CPU run does
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


# -----------------------------------------------------------------------------
# LoRA: adapters on q and v, with the public A0 drawn from a fixed seed


def add_lora(model, rank=4, alpha=8.0, seed=1234):
    """Freeze the base model, attach LoRA to every layer's q and v. A0 comes from `seed` in a fixed
    order (layer 0 q, 0 v, 1 q, ...): client and provider build the same adapters from the seed."""
    if model.lora is not None:
        raise ValueError("model already has LoRA adapters")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    C = model.cfg.n_embd
    device = model.wte.weight.device
    for block in model.blocks:
        block.attn.q_lora = LoRA(C, C, rank, alpha, g).to(device)
        block.attn.v_lora = LoRA(C, C, rank, alpha, g).to(device)
    model.lora = (rank, alpha, seed)
    return model


def lora_parameters(model):
    """The trainable tensors, in update-vector order: per layer q.dA, q.B, v.dA, v.B."""
    if model.lora is None:
        raise ValueError("this model has no LoRA adapters: call add_lora(model) first")
    return [p for b in model.blocks for p in (b.attn.q_lora.dA, b.attn.q_lora.B,
                                              b.attn.v_lora.dA, b.attn.v_lora.B)]


def update_shape(cfg, rank):
    """(n_layer, token_dim) of a model's update vector."""
    return (cfg.n_layer, 4 * rank * cfg.n_embd)


def get_update(model):
    """Δθ of a LoRA model as a (n_layer, token_dim) float32 tensor (a copy)."""
    params = lora_parameters(model)
    ### BEGIN SOLUTION update_vector
    tokens = [torch.cat([p.detach().flatten() for p in params[4 * l: 4 * l + 4]])
              for l in range(model.cfg.n_layer)]
    return torch.stack(tokens).float().cpu()
    ### END SOLUTION


def check_update(update, shape, what="update vector", *, finite=True):
    """Refuse anything that is not a floating tensor of the expected shape, and, with `finite`,
    one holding NaN or inf. The finite check reads the values back (a host sync): it guards the
    boundary (an update or upload from outside); scoring loops over updates the code made itself
    pass finite=False and stay asynchronous."""
    if not isinstance(update, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(update).__name__}")
    if tuple(update.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {tuple(update.shape)}")
    if not update.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, got dtype {update.dtype}")
    if finite and not torch.isfinite(update).all():
        raise ValueError(f"{what}: contains NaN or inf values")


def split_update(model, update):
    """An update vector (n_layer, token_dim) -> {name: tensor} in the shapes of the LoRA parameters
    (update order). Differentiable: train.py runs the LLM with a *predicted* update (torch.func)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    params = lora_parameters(model)
    out = {}
    ### BEGIN SOLUTION update_vector
    for l in range(model.cfg.n_layer):
        offset = 0
        for p in params[4 * l: 4 * l + 4]:
            out[names[id(p)]] = update[l, offset: offset + p.numel()].view_as(p)
            offset += p.numel()
    ### END SOLUTION
    return out


def flat_lora(model):
    """The model's LoRA tensors as ONE flat buffer (n_layer * token_dim,) laid out as the update
    vector, each LoRA parameter a view of it (`split_update` of the buffer): writing an update is
    then one copy, not one per tensor (16 at the default preset). Built on first use, and rebuilt
    (from the parameters' current values) when they no longer view it: after `.to(device)` or a
    deepcopy, for example."""
    params = lora_parameters(model)
    flat = getattr(model, "lora_flat", None)
    if flat is not None and all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                                for p in params):   # host-side pointers only: no kernel, no sync
        return flat
    shape = update_shape(model.cfg, model.lora[0])
    flat = torch.zeros(math.prod(shape), device=params[0].device, dtype=params[0].dtype)
    by_name = dict(model.named_parameters())
    with torch.no_grad():
        for name, view in split_update(model, flat.view(shape)).items():
            view.copy_(by_name[name])
            by_name[name].data = view
    model.lora_flat = flat   # a plain attribute: not in the state dict, never saved
    return flat


@torch.no_grad()
def set_update(model, update, *, check_finite=True):
    """Write an update vector (n_layer, token_dim) into the model's LoRA parameters, in one copy
    (`flat_lora`). check_finite=False skips the NaN/inf check (a host sync) for updates the code
    made itself, in scoring loops; shape and dtype are always checked."""
    flat = flat_lora(model)                  # refuses a model without LoRA
    check_update(update, update_shape(model.cfg, model.lora[0]), finite=check_finite)
    flat.copy_(update.reshape(-1))   # update order = the buffer's layout
    return model


# -----------------------------------------------------------------------------
# nanoGPT's one-GPU switches: a step's precision and its compilation (config/presets.py: --dtype,
# --compile; train.py checks them against the device)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device, dtype):
    """The context a forward runs in: float32 as written, or autocast to "bfloat16" / "float16"
    (matmuls in half precision, reductions and the loss in float32; the weights, their gradients
    and AdamW's state stay float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype],
                          enabled=dtype != "float32")


def compiled(fn, *, compile, device):
    """fn itself, or with compile torch.compile'd as one graph (fullgraph: a graph break is an
    error, not a slow fallback); on CUDA mode="reduce-overhead" replays it as a CUDA graph, one
    launch per call. Its backward is compiled with it (AOTAutograd)."""
    if not compile:
        return fn
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    return torch.compile(fn, fullgraph=True, mode=mode)


# -----------------------------------------------------------------------------
# training: a base model from scratch, then LoRA fine-tuning, the algorithm every party shares


def learning_rate(step, steps, lr):
    """The pretraining lr at `step` (0-based) of `steps`: a linear warmup over the first 5% of the
    steps, times a cosine from 1 at the start down to 0.1 at the end."""
    warmup = max(1, steps // 20)
    cosine = 0.55 + 0.45 * math.cos(math.pi * step / steps)   # decays to 0.1 of lr
    return lr * min(1.0, (step + 1) / warmup) * cosine


def pretrain(cfg, rows_of, indices, *, lr, seed, device="cpu", desc="pretrain", compile=False,
             dtype="float32", log_every=50, ranks=None):
    """A GPT(cfg) trained from scratch (the public base models), step s on the batch
    rows_of(indices[s]) -> (x, y, mask) (B, T): AdamW with the `learning_rate` schedule, gradients
    clipped to norm 1. indices (steps, B): every step's batch drawn up front, on `device` (no copy
    from the host a step); the loss is read on the host every `log_every` steps only, so that a
    step never waits for the GPU. compile, dtype: `compiled` and `autocast`. Under torchrun
    (ranks, config/dist.py) it is DistributedDataParallel: every rank holds the same global batch
    and trains on its slice (`pretrain_loss`), and the averaged gradient is the one-process gradient
    up to float sums."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    device = torch.device(device)
    net = model if ranks is None else DDP(model, device_ids=[device.index] if device.type == "cuda"
                                          else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                            fused=device.type == "cuda" or None)   # one kernel on CUDA
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    loss_of_batch = compiled(pretrain_loss(net, rows_of, device=device, dtype=dtype, ranks=ranks),
                             compile=compile, device=device)
    steps = len(indices)
    quiet = ranks is not None and ranks.rank > 0   # rank 0 alone shows progress
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, disable=quiet)):
        loss = pretrain_step(model, opt, scaler, loss_of_batch(indices[step]),
                             lr=learning_rate(step, steps, lr))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")   # the one host read, every log_every steps
    return model.eval()


def pretrain_loss(net, rows_of, *, device, dtype, ranks=None):
    """The pretraining step's forward as a function of the step's batch indices (B,): gather the
    batch, the masked loss under `autocast`. Under torchrun (ranks) this rank's rows of the batch
    only, its loss weighted by its share of the batch's tokens: DDP averages the ranks' gradients,
    and that weighted average is the gradient of the mean over all the batch's tokens."""
    def batch_loss(idx):
        with autocast(device, dtype):
            return net(*rows_of(idx))[1]

    def rank_loss(idx):
        x, y, mask = rows_of(idx)
        total = mask.sum()
        x, y, mask = [t.tensor_split(ranks.world)[ranks.rank] for t in (x, y, mask)]
        share = mask.sum() * ranks.world / total
        with autocast(device, dtype):
            return net(x, y, mask)[1] * share

    return batch_loss if ranks is None else rank_loss


def pretrain_step(model, opt, scaler, loss, *, lr):
    """One optimizer step of pretraining from the batch's loss: backward, clip the gradient to
    norm 1, AdamW at `lr`. With float16 the scaler scales the loss and skips a step whose
    gradients overflow; otherwise it does nothing. Returns the loss, detached (no host read)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)                               # clip the true gradient, not the scaled one
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


@dataclass
class Recipe:
    """How a LoRA fine-tune runs. The provider publishes it; the clients' and the shadow runs'
    fine-tunes follow it, DP included: a translator must learn from updates made as uploads are.
    The weak-to-strong baselines (eval.py) change only its `confidence`."""
    steps: int = 100
    batch: int = 32              # without DP; with DP the batch is Poisson-sampled at rate q
    lr: float = 3e-3
    dp_sigma: float = 0.0        # DP-SGD noise multiplier; 0 = no DP
    dp_clip: float = 1.0         # per-example gradient norm bound C
    dp_sample_rate: float = 0.0625
    confidence: float | str = 0.0    # the loss's own-prediction term: 0, w > 0 or "adaptive"


def with_confidence(logits, y, mask, loss, recipe, step):
    """The fine-tuning loss at `step` (1-based) given the masked loss of the labels y, by
    recipe.confidence: also fit the model's own hardened predictions, so that it may overrule weak
    labels y (the weak-to-strong baselines, eval.py):
        0           `loss` itself (every fine-tune but the baselines')
        w > 0       Burns et al. 2023 (w2s_conf): (1 - w) loss + w CE(own), with w warmed up over
                    the first 20% of the steps
        "adaptive"  Guo et al. 2024 (vissup): per-token weights, `adaptive_confidence`"""
    weight = recipe.confidence
    if weight == "adaptive":
        return adaptive_confidence(logits, y, mask, step, recipe.steps)
    if not weight > 0:
        return loss
    w = weight * min(1.0, step / (0.2 * recipe.steps))
    return (1 - w) * loss + w * masked_cross_entropy(logits, logits.argmax(-1).detach(), mask)


def adaptive_confidence(logits, y, mask, step, steps):
    """Guo et al. 2024's loss (vissup): per token, beta = sigmoid(CE(own) - CE(weak)), warmed up
    over the first 25% of the steps; the masked mean of (1 - beta) CE(weak) + beta CE(own)."""
    own_labels = logits.argmax(-1).detach()
    weak = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")          # (B*T,)
    own = F.cross_entropy(logits.flatten(0, 1), own_labels.flatten(), reduction="none")  # (B*T,)
    m = mask.flatten().to(logits.dtype)
    beta = torch.sigmoid(own - weak).detach() * min(1.0, step / (0.25 * steps))        # (B*T,)
    return (((1 - beta) * weak + beta * own) * m).sum() / m.sum().clamp(min=1)


def finetune(model, x, y, mask, recipe, seed, *, snapshot_steps=()):
    """Fine-tune the LoRA of `model` from zero on the examples (x, y, mask) (N, T) by `recipe`, with
    the batches (and DP noise) `data.draw_run` draws from `seed`. Returns the update vectors at
    `snapshot_steps` (1-based), else [the final update], which the model keeps. recipe.dp_sigma > 0:
    DP-SGD steps on Poisson-sampled batches (`dp.dp_sgd_step`)."""
    device = model.wte.weight.device
    set_update(model, torch.zeros(update_shape(model.cfg, model.lora[0])))
    x = x.to(device)
    y = y.to(device)
    mask = mask.to(device)
    params = lora_parameters(model)
    opt = torch.optim.Adam(params, lr=recipe.lr, fused=device.type == "cuda" or None)  # 1 kernel
    batches, noise = data.draw_run(recipe, len(x), seed, sum(p.numel() for p in params), device)
    wanted = set(snapshot_steps) or {recipe.steps}
    snapshots = []
    model.train()
    for step, idx in enumerate(batches, start=1):
        if recipe.dp_sigma > 0:
            dp.dp_sgd_step(model, opt, x[idx], y[idx], mask[idx], clip=recipe.dp_clip,
                           noise_multiplier=recipe.dp_sigma,
                           expected_batch_size=recipe.dp_sample_rate * len(x),
                           noise=noise[step - 1])
        else:
            logits, loss = model(x[idx], y[idx], mask[idx])
            loss = with_confidence(logits, y[idx], mask[idx], loss, recipe, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step in wanted:
            snapshots.append(get_update(model))
    model.eval()
    return snapshots


@torch.no_grad()
def loss_of(model, x, y, mask, batch=1024):
    """Mean masked cross-entropy (nats per masked token) of `model` on the examples (N, T)."""
    total = 0.0
    count = 0.0
    for i in range(0, len(x), batch):
        xb, yb, mb = (t[i:i + batch].to(model.wte.weight.device) for t in (x, y, mask))
        n = mb.sum().item()
        total = total + model(xb, yb, mb)[1].item() * n
        count = count + n
    return total / max(count, 1.0)


# -----------------------------------------------------------------------------
# many runs of one frozen base as one computation: torch.func.vmap over K update vectors


def finetune_many(model, datasets, recipe, seeds, *, snapshot_steps=()):
    """[finetune(model, *datasets[k], recipe, seeds[k], snapshot_steps=...)] to round-off, as one
    computation: run k's LoRA tensors are params[name][k], the model runs vmap'd over them, one
    Adam is K Adams, and each run draws its own batches (`data.draw_run`), padded. Under DP, the
    per-example gradients come from autograd (`_private_grads` says why)."""
    x, y, mask = data.stack_runs(datasets, seeds, "seeds", model.wte.weight.device)  # (K, N, T)
    K = len(x)
    shape = update_shape(model.cfg, model.lora[0])
    params = _stacked_lora(model, K, x.device)                             # {name: (K, *shape)}
    opt = torch.optim.Adam(params.values(), lr=recipe.lr, fused=True)    # one kernel per step
    idx, valid, widths, noise = _padded_batches(recipe, datasets, seeds, math.prod(shape), x.device)
    expected = torch.tensor([recipe.dp_sample_rate * len(d[0]) for d in datasets], device=x.device)
    wanted = set(snapshot_steps) or {recipe.steps}
    saved = []
    runs = torch.arange(K, device=x.device)[:, None]                                  # (K, 1)
    for step, width in enumerate(widths, start=1):
        i = idx[:, step - 1, :width]                                                   # (K, B)
        ok = valid[:, step - 1, :width, None]                                          # (K, B, 1)
        # (K, B, T); a padded example gets mask 0: loss 0, gradient exactly 0
        xb = x[runs, i]
        yb = y[runs, i]
        mb = mask[runs, i] * ok
        opt.zero_grad(set_to_none=True)
        if recipe.dp_sigma > 0:
            _private_grads(model, params, xb, yb, mb, recipe=recipe, expected=expected,
                           noise=noise[:, step - 1])
        else:
            _plain_grads(model, params, xb, yb, mb, recipe=recipe, step=step)
        opt.step()
        if step in wanted:  # the tensors side by side in update order: the update vectors
            saved.append(torch.cat([p.detach().flatten(1) for p in params.values()], dim=1))
    snapshots = torch.stack(saved, 1) if saved else torch.zeros(K, 0, math.prod(shape))
    return [list(run) for run in snapshots.view(K, len(saved), *shape).float().cpu()]


def _stacked_lora(model, K, device):
    """K all-zero LoRA updates, {name: (K, *shape)} trainable tensors in update order: run k's
    tensors are [k]."""
    zero = split_update(model, torch.zeros(update_shape(model.cfg, model.lora[0])))
    return {n: torch.zeros(K, *t.shape, device=device, requires_grad=True)
            for n, t in zero.items()}


def _padded_batches(recipe, datasets, seeds, n_noise, device):
    """Every run's draws (`data.draw_run`) side by side, its batches padded to each step's largest:
    idx (K, steps, B) the examples (0 where padded), valid (K, steps, B) False where padded, widths
    (steps,) each step's largest batch, noise (K, steps, n_noise) N(0, 1), None without DP."""
    draws = [data.draw_run(recipe, len(d[0]), s, n_noise) for d, s in zip(datasets, seeds)]
    idx = pad_sequence([i for indices, _ in draws for i in indices], True, -1)  # -1: padding
    idx = idx.view(len(draws), recipe.steps, -1)                                  # (K, steps, B)
    widths = (idx >= 0).sum(2).max(0).values.tolist()     # (steps,): each step's largest batch
    valid = (idx >= 0).to(device)
    idx = idx.clamp(min=0).to(device)
    noise = torch.stack([n for _, n in draws]).to(device) if recipe.dp_sigma > 0 else None
    return idx, valid, widths, noise


def _plain_grads(model, params, x, y, mask, *, recipe, step):
    """Every run's gradient of its own batch's loss (x, y, mask (K, B, T)) into params' .grad."""

    def run_loss(p, x, y, mask, step):  # one run: its LoRA tensors p, its batch (B, T)
        logits, loss = functional_call(model, p, (x, y, mask))
        return with_confidence(logits, y, mask, loss, recipe, step)

    vmap(run_loss, in_dims=(0, 0, 0, 0, None))(params, x, y, mask, step).sum().backward()


def _private_grads(model, params, x, y, mask, *, recipe, expected, noise):
    """Every run's DP-SGD gradient (`dp.clip_and_noise`) of its batch (x, y, mask (K, B, T)) into
    params' .grad; expected (K,) the runs' expected batch sizes q*N, noise (K, D) N(0, 1).

    The per-example gradients do not come from dp.per_sample_grads (LoRA.per_example_grads), for
    two reasons. Its forward hooks record each layer's input and output, and inside vmap those are
    batched tensors that may not leave the vmap'd function. And the two ways round differently:
    the runs agree with `finetune` (which uses it) to round-off, not bit for bit
    (tests/test_batched.py). Instead each example gets its own copy of its run's LoRA (a view: as
    Opacus' expanded weights), so ONE backward gives every example's gradient."""
    K, width = x.shape[:2]

    def example_logits(p, x):           # one example (T,) with its run's LoRA -> (T, vocab)
        return functional_call(model, p, (x[None],))[0][0]

    own = {n: p.detach()[:, None].expand(K, width, *p.shape[1:]).requires_grad_()
           for n, p in params.items()}                                     # (K, B, *shape)
    logits = vmap(vmap(example_logits))(own, x).flatten(0, 1)              # (K*B, T, vocab)
    losses = dp.per_example_losses(logits, y.flatten(0, 1), mask.flatten(0, 1))
    grads = torch.autograd.grad(losses.sum(), list(own.values()))         # each (K, B, *shape)
    flat = torch.cat([g.flatten(2) for g in grads], dim=2)                # (K, B, D)
    clip_and_noise = vmap(dp.clip_and_noise, in_dims=(0, None, None, 0, 0))
    g, _ = clip_and_noise(flat, recipe.dp_clip, recipe.dp_sigma, expected, noise)   # (K, D)
    sizes = [p[0].numel() for p in params.values()]
    for p, g_p in zip(params.values(), g.split(sizes, 1)):
        p.grad = g_p.contiguous().view_as(p)  # fused Adam misreads a strided grad


@torch.no_grad()
def loss_of_updates(model, updates, datasets, max_tokens=None):
    """(U,) [loss_of(set_update(model, updates[u]), *datasets[u])] from forwards vmap'd over the
    updates (U, n_layer, token_dim), ~max_tokens tokens a chunk (GPU 2^16, CPU 2^12: its caches)."""
    lora_parameters(model)                                  # refuses a model without LoRA
    x, y, mask = data.stack_runs(datasets, updates, "updates", model.wte.weight.device)  # (U, N, T)
    # shape and dtype only: the updates scored here are the code's own (predictions, references)
    check_update(updates, (len(x), *update_shape(model.cfg, model.lora[0])), "updates",
                 finite=False)
    updates = updates.to(x.device, model.wte.weight.dtype)

    def loss_with(update, x, y, mask):
        # all of one dataset in one batch: its masked mean is loss_of's
        return functional_call(model, split_update(model, update), (x, y, mask))[1]

    chunk = max(1, (max_tokens or (1 << 16 if x.is_cuda else 1 << 12)) // x[0].numel())
    losses = []
    for i in range(0, len(x), chunk):
        part = slice(i, i + chunk)
        losses.append(vmap(loss_with)(updates[part], x[part], y[part], mask[part]))   # (chunk,)
    return torch.cat(losses).cpu()


# -----------------------------------------------------------------------------
# checkpoints: the config travels with the weights; loading never unpickles objects


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: an interrupted write never leaves half a file (the
    temp file is the writer's own: processes of a torchrun sweep may write the same stage)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_model(model, path):
    """Save the base weights (no LoRA) and the config."""
    state = {k: v for k, v in model.state_dict().items() if "lora" not in k}
    atomic_save({"config": asdict(model.cfg), "state_dict": state}, path)


def load_model(path, device="cpu"):
    """The model `save_model` wrote (weights only: nothing is unpickled), on `device`. Raises
    ValueError for anything else."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # truncated file, wrong keys, foreign checkpoint ...
        raise ValueError(f"{path}: not a valid gradtx model checkpoint ({e})") from e
    return model.to(device)
