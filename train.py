"""
train.py -- the whole Grad-Transformer protocol, stage by stage, cached on disk.

    python train.py                     # default (cpu) preset: the whole protocol on a laptop CPU
    python train.py --preset smoke      # a tiny run of every stage, ~1 minute
    python train.py --preset gpu        # larger models, for one GPU
    python train.py --help              # every option

Stages (each writes its output atomically into --out and is skipped when already there):
  1. pretrain    both public base models (TinyLM and LLM) on the public corpus
  2. shadow      the provider fine-tunes BOTH models on K shadow subsets of public data and records
                 S snapshots of both update vectors along the tail of each run: the training pairs
  3. fit         the Grad-Transformer learns TinyLM update -> LLM update on those pairs
  4. clients     each client fine-tunes its TinyLM on its private data (optionally with DP-SGD) and
                 uploads only its update vector (optionally output-perturbed)
  5. eval        the provider translates each upload into an LLM update; eval.py scores it against
                 the baselines and writes results.json
"""
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from tqdm import tqdm

import data
import dp
import gradtx
import tinylm

# -----------------------------------------------------------------------------
# configuration: a dataclass, presets, and a small typed --key=value parser


@dataclass
class Config:
    preset: str = "cpu"
    out: str = "out"             # where results.json (and, by default, the stage cache) goes
    cache: str = ""              # where finished stages are cached ("" = --out); share it between
                                 # runs that differ only in later stages (e.g. DP on the clients)
    seed: int = 0                # changes the data split, shadow subsets, clients and inits
    device: str = "auto"         # auto = cuda, then mps, then cpu
    threads: int = 0             # torch CPU threads (0: torch's default)
    workers: int = 2             # processes for independent fine-tunes on a CPU (1: none)
    # base models and their pretraining on the public corpus
    tiny_model: str = "tiny"
    llm_model: str = "llm"
    pretrain_steps_tiny: int = 1500
    pretrain_steps_llm: int = 6000
    pretrain_batch: int = 64
    pretrain_lr_tiny: float = 3e-3   # measured: the LLM learns all four operators far better at
    pretrain_lr_llm: float = 1e-3    # 1e-3 than at 3e-3; the TinyLM the other way round
    # LoRA fine-tuning, shared by shadow runs, clients and baselines
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_seed: int = 1234        # the public seed of A0
    ft_steps: int = 100
    ft_batch: int = 32
    ft_lr: float = 3e-3          # measured: 1e-2 also teaches the convention but erodes the
                                 # LLM's arithmetic (fine-tuned below its base on one client)
    n_train: int = 512           # examples per shadow subset and per client
    # shadow curation
    n_shadow: int = 64           # K shadow subsets
    n_snapshots: int = 4         # S snapshots per run, along the tail
    snapshot_gap: int = 10       # steps between snapshots (the last one is the final update)
    shadow_alpha: float = 2.0    # shadow mixtures ~ Dirichlet(shadow_alpha * m)
    # Grad-Transformer
    gt_d_model: int = 128         # measured: 64 mistranslated the IID client on seed 0
    gt_layers: int = 1           # encoder layers = decoder layers
    gt_heads: int = 4
    gt_dropout: float = 0.3
    gt_weight_decay: float = 0.5
    gt_lr: float = 3e-4
    gt_steps: int = 1500
    gt_batch: int = 32
    gt_eval_every: int = 100
    gt_normalize: bool = True    # z-score inputs and targets (the paper feeds raw values)
    gt_func_weight: float = 0.0  # weight of the LLM-loss term in training (0: the paper's pure MSE)
    val_frac: float = 0.25       # share of shadow RUNS held out for model selection
    # clients
    n_skewed_per_op: int = 1
    n_iid: int = 1
    skew: float = 0.88
    n_test: int = 500
    # differential privacy (off when the epsilons are 0)
    dp_epsilon: float = 0.0      # DP-SGD on the client's TinyLM fine-tuning
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_sample_rate: float = 0.0625  # Poisson rate q; expected batch = q * n_train
    out_epsilon: float = 0.0     # output perturbation of the uploaded update (Gaussian mechanism)
    out_clip: float = 1.0


PRESETS = {
    "cpu": Config(),
    "smoke": Config(preset="smoke", out="out_smoke", tiny_model="micro", llm_model="mini",
                    pretrain_steps_tiny=150, pretrain_steps_llm=250, ft_steps=30, n_train=128,
                    n_shadow=8, n_snapshots=2, snapshot_gap=5, gt_steps=60, gt_eval_every=20,
                    n_test=100),
    "gpu": Config(preset="gpu", out="out_gpu", tiny_model="tiny_gpu", llm_model="llm_gpu",
                  pretrain_steps_tiny=6000, pretrain_steps_llm=12000, pretrain_batch=128,
                  n_shadow=128, gt_steps=3000),
}


def parse_args(argv):
    """--preset=NAME sets the defaults, then --key=value (or --key value) overrides any Config field."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\noptions (default preset shown):")
        for f in fields(Config):
            print(f"  --{f.name}={getattr(Config(), f.name)}  ({f.type.__name__})")
        print(f"presets: {', '.join(PRESETS)}")
        sys.exit(0)
    pairs, args = [], list(argv)
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            raise SystemExit(f"bad argument {a!r}: expected --key=value (see --help)")
        if "=" not in a:  # also accept "--key value"
            if not args:
                raise SystemExit(f"option {a} has no value: expected {a}=VALUE")
            a = a + "=" + args.pop(0)
        pairs.append(a[2:].split("=", 1))
    preset = dict(pairs).get("preset", "cpu")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    cfg, types = PRESETS[preset], {f.name: f.type for f in fields(Config)}
    for key, value in pairs:
        if key not in types:
            raise SystemExit(f"unknown option --{key} (see --help for the list)")
        typ = types[key]
        try:
            value = {"true": True, "false": False}[value.lower()] if typ is bool else typ(value)
        except (KeyError, ValueError):
            raise SystemExit(f"--{key}={value}: expected a {typ.__name__}")
        cfg = replace(cfg, **{key: value})
    return cfg


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# -----------------------------------------------------------------------------
# the cache: a stage's file name carries a hash of every setting it depends on, so a re-run
# reuses exactly the finished stages whose inputs did not change

TINY_KEYS = ("seed", "tiny_model", "pretrain_steps_tiny", "pretrain_batch", "pretrain_lr_tiny")
LLM_KEYS = ("seed", "llm_model", "pretrain_steps_llm", "pretrain_batch", "pretrain_lr_llm")
FINETUNE_KEYS = TINY_KEYS + LLM_KEYS[1:] + ("lora_rank", "lora_alpha", "lora_seed", "ft_steps",
                                            "ft_batch", "ft_lr", "n_train")
SHADOW_KEYS = FINETUNE_KEYS + ("n_shadow", "n_snapshots", "snapshot_gap", "shadow_alpha")
FIT_KEYS = SHADOW_KEYS + ("gt_d_model", "gt_layers", "gt_heads", "gt_dropout", "gt_weight_decay",
                          "gt_lr", "gt_steps", "gt_batch", "gt_eval_every", "gt_normalize",
                          "gt_func_weight", "val_frac")
CLIENT_KEYS = FINETUNE_KEYS + ("n_skewed_per_op", "n_iid", "skew", "n_test", "dp_epsilon",
                               "dp_delta", "dp_clip", "dp_sample_rate", "out_epsilon", "out_clip")
STAGES = {"pretrain_tiny": TINY_KEYS, "pretrain_llm": LLM_KEYS, "shadow": SHADOW_KEYS,
          "fit": FIT_KEYS, "clients": CLIENT_KEYS}


def stage_path(cfg, stage):
    settings = json.dumps({k: getattr(cfg, k) for k in STAGES[stage]}, sort_keys=True)
    return os.path.join(cfg.cache or cfg.out, f"{stage}-{hashlib.sha1(settings.encode()).hexdigest()[:10]}.pt")


def record_seconds(cfg, stage, seconds):
    """Compute time of a finished stage, kept beside its output (timing.json)."""
    path = os.path.join(cfg.cache or cfg.out, "timing.json")
    timing = json.load(open(path)) if os.path.exists(path) else {}
    timing[os.path.basename(stage_path(cfg, stage))] = seconds
    with open(path + ".tmp", "w") as f:
        json.dump(timing, f, indent=1)
    os.replace(path + ".tmp", path)


def stage_seconds(cfg):
    """{pretrain, shadow, fit, clients}: seconds each stage of this configuration took to compute."""
    path = os.path.join(cfg.cache or cfg.out, "timing.json")
    timing = json.load(open(path)) if os.path.exists(path) else {}
    t = {s: timing.get(os.path.basename(stage_path(cfg, s)), 0.0) for s in STAGES}
    return {"pretrain": t["pretrain_tiny"] + t["pretrain_llm"], "shadow": t["shadow"],
            "fit": t["fit"], "clients": t["clients"]}


# -----------------------------------------------------------------------------
# stage 1: pretraining the public base models


def pretrain(cfg, size, steps, lr, seed, device, desc):
    """Train a GPT from scratch on the public corpus, loss on the answer only (AdamW, cosine lr)."""
    torch.manual_seed(seed)
    enc = data.get_tokenizer()
    model = tinylm.GPT(replace(tinylm.MODEL_PRESETS[size], vocab_size=enc.n_vocab,
                               block_size=data.BLOCK_SIZE)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    explicit, ambiguous = data.pretrain_corpus()
    x_all, y_all, mask_all = data.encode_lines(explicit + ambiguous, enc)   # (2 * n_problems, T)
    rng = np.random.default_rng([seed, 0])
    warmup = max(1, steps // 20)
    for step in (bar := tqdm(range(steps), desc=desc, leave=False)):
        lr_mult = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * lr_mult
        idx = torch.from_numpy(data.pretrain_indices(cfg.pretrain_batch, rng, len(explicit)))
        x, y, mask = x_all[idx].to(device), y_all[idx].to(device), mask_all[idx].to(device)
        _, loss = model(x, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def base_models(cfg, device):
    """Load both base models from --out, pretraining (and caching) whichever is missing."""
    models = {}
    for who, size, steps, lr in (("tiny", cfg.tiny_model, cfg.pretrain_steps_tiny, cfg.pretrain_lr_tiny),
                                 ("llm", cfg.llm_model, cfg.pretrain_steps_llm, cfg.pretrain_lr_llm)):
        path = stage_path(cfg, f"pretrain_{who}")
        if not os.path.exists(path):
            t0 = time.time()
            model = pretrain(cfg, size, steps, lr, cfg.seed + (0 if who == "tiny" else 1), device,
                             f"pretrain {who}")
            tinylm.save_model(model, path)
            record_seconds(cfg, f"pretrain_{who}", time.time() - t0)
            print(f"pretrain  : {who} ({size}), {sum(p.numel() for p in model.parameters()):,} "
                  f"params, {steps} steps, {time.time() - t0:.1f}s -> {path}")
        models[who] = tinylm.add_lora(tinylm.load_model(path, device).eval(), cfg.lora_rank,
                                      cfg.lora_alpha, cfg.lora_seed)
    return models["tiny"], models["llm"]


# -----------------------------------------------------------------------------
# LoRA fine-tuning: the routine every party shares


def finetune(model, lines, cfg, seed, snapshot_steps=(), dp_sigma=None, conf_weight=0.0):
    """Fine-tune the LoRA parameters of `model` from zero on `lines`; returns update vectors.

    Returns the update vectors at `snapshot_steps` (1-based) if given, else [final update].
    With dp_sigma set, each step is a DP-SGD step on a Poisson-sampled batch (dp.py).
    conf_weight > 0 adds the weak-to-strong auxiliary confidence loss (eval.py's w2s_conf).
    The model keeps the final update in its LoRA parameters.
    """
    device = model.wte.weight.device
    tinylm.set_update(model, torch.zeros(tinylm.update_shape(model.cfg, cfg.lora_rank)))
    enc = data.get_tokenizer()
    x, y, mask = (t.to(device) for t in data.encode_lines(lines, enc))
    params = tinylm.lora_parameters(model)
    opt = torch.optim.Adam(params, lr=cfg.ft_lr)
    g = torch.Generator().manual_seed(seed)
    snapshots, wanted = [], set(snapshot_steps) or {cfg.ft_steps}
    model.train()
    for step in range(1, cfg.ft_steps + 1):
        if dp_sigma is None:
            idx = torch.randint(len(lines), (cfg.ft_batch,), generator=g)
            logits, loss = model(x[idx], y[idx], mask[idx])
            if conf_weight > 0:  # Burns et al. 2023: also fit the model's own hardened predictions,
                # so the strong model may overrule weak labels; the weight warms up over 20% of steps
                w = conf_weight * min(1.0, step / (0.2 * cfg.ft_steps))
                own = tinylm.masked_cross_entropy(logits, logits.argmax(-1).detach(), mask[idx])
                loss = (1 - w) * loss + w * own
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            idx = dp.poisson_sample(len(lines), cfg.dp_sample_rate, g)
            dp.dp_sgd_step(model, opt, x[idx], y[idx], mask[idx], cfg.dp_clip, dp_sigma,
                           cfg.dp_sample_rate * len(lines), g)
        if step in wanted:
            snapshots.append(tinylm.get_update(model))
    model.eval()
    return snapshots


@torch.no_grad()
def answer_loss(model, lines):
    """Mean answer cross-entropy of `model` on `lines` (the functional criterion)."""
    device = model.wte.weight.device
    x, y, mask = (t.to(device) for t in data.encode_lines(lines, data.get_tokenizer()))
    return model(x, y, mask)[1].item()


# -----------------------------------------------------------------------------
# independent fine-tunes side by side: on a CPU, two single-threaded processes get through about
# 1.7x the work of one process with two threads (measured: these small matrices leave cores idle)

_worker = {}   # what a worker process holds: the config, both base models with LoRA, public pairs


def _init_worker(cfg, device):
    torch.set_num_threads(1)
    tiny, llm = base_models(cfg, device)   # the cached checkpoints
    _worker.update(cfg=cfg, tiny=tiny, llm=llm, public_pairs=data.split_pairs(cfg.seed)[0])


def worker_map(cfg, fn, items, device, tiny, llm):
    """map(fn, items), in order, in cfg.workers processes (in this one when workers <= 1 or on a GPU)."""
    if cfg.workers <= 1 or device != "cpu" or len(items) <= 1:
        _worker.update(cfg=cfg, tiny=tiny, llm=llm, public_pairs=data.split_pairs(cfg.seed)[0])
        yield from map(fn, items)
        return
    with mp.get_context("spawn").Pool(cfg.workers, _init_worker, (cfg, device)) as pool:
        yield from pool.imap(fn, items)


# -----------------------------------------------------------------------------
# stage 2: shadow curation -- (TinyLM update, LLM update) pairs from public data


def snapshot_steps(cfg):
    """S steps along the tail of training, the last one being the final step."""
    return [cfg.ft_steps - i * cfg.snapshot_gap for i in reversed(range(cfg.n_snapshots))]


def load_stage(path):
    """A finished stage's output, or None. Stage files hold only tensors and plain values."""
    return torch.load(path, weights_only=True) if os.path.exists(path) else None


def shadow_run(k):
    """Shadow run k: fine-tune both models on subset k from the same LoRA init and the same batch
    order (same seed); the snapshots at the same steps form the pairs. Runs in a worker."""
    cfg, tiny, llm = _worker["cfg"], _worker["tiny"], _worker["llm"]
    _, lines = data.shadow_subset(_worker["public_pairs"], cfg.n_train, cfg.shadow_alpha, cfg.seed, k)
    seed, steps = 1_000_003 * cfg.seed + k, snapshot_steps(cfg)
    return (torch.stack(finetune(tiny, lines, cfg, seed, steps)),
            torch.stack(finetune(llm, lines, cfg, seed, steps)))


def shadow_stage(cfg, tiny, llm, device):
    """Fine-tune BOTH models on each of K shadow subsets and record S snapshots of each run.

    Returns {"X": (K, S, n_tiny_layer, d_tiny), "Y": (K, S, n_llm_layer, d_llm), "mixtures": (K, 4)}.
    Progress is saved every few runs, so an interrupted curation resumes where it stopped.
    """
    path = stage_path(cfg, "shadow")
    partial = path.replace(".pt", ".partial.pt")
    if (done := load_stage(path)) is not None:
        return done
    state = load_stage(partial) or {"X": [], "Y": [], "seconds": 0.0}
    t0, todo = time.time() - state["seconds"], range(len(state["X"]), cfg.n_shadow)
    runs = worker_map(cfg, shadow_run, todo, device, tiny, llm)
    for k, (x, y) in zip(todo, tqdm(runs, desc="shadow runs", leave=False, initial=todo.start,
                                    total=cfg.n_shadow)):
        state["X"].append(x)
        state["Y"].append(y)
        if (k + 1) % 8 == 0:
            state["seconds"] = time.time() - t0
            tinylm.atomic_save(state, partial)
    public_pairs, _ = data.split_pairs(cfg.seed)
    mixtures = [data.shadow_subset(public_pairs, cfg.n_train, cfg.shadow_alpha, cfg.seed, k)[0]
                for k in range(cfg.n_shadow)]
    out = {"X": torch.stack(state["X"]), "Y": torch.stack(state["Y"]),
           "mixtures": torch.tensor(np.array(mixtures)), "seconds": time.time() - t0}
    tinylm.atomic_save(out, path)
    record_seconds(cfg, "shadow", out["seconds"])
    if os.path.exists(partial):
        os.remove(partial)
    print(f"shadow    : {cfg.n_shadow} runs x {cfg.n_snapshots} snapshots = "
          f"{cfg.n_shadow * cfg.n_snapshots} pairs, {out['seconds']:.1f}s -> {path}")
    return out


# -----------------------------------------------------------------------------
# stage 3: fit the Grad-Transformer, selected on held-out shadow RUNS


def split_runs(cfg):
    """Shadow run indices for training and validation: split by RUN, never by snapshot
    (snapshots of one run are near copies of each other and would leak across the split)."""
    order = np.random.default_rng([cfg.seed, 3]).permutation(cfg.n_shadow)
    n_val = max(2, int(round(cfg.val_frac * cfg.n_shadow)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def functional_criterion(cfg, llm, public_pairs, val_runs):
    """f(pred_updates) = the LLM's mean answer loss on each held-out run's own shadow data with
    that run's predicted update applied. Lower is better. (SPEC §3.4: selection in parameter
    space keeps a translator that still sits at the mean update.)"""
    subsets = data.shadow_subsets(public_pairs, cfg.n_shadow, cfg.n_train, cfg.shadow_alpha, cfg.seed)
    val_lines = [subsets[k][1] for k in val_runs]

    def criterion(pred_updates):
        losses = []
        for update, lines in zip(pred_updates, val_lines):
            tinylm.set_update(llm, update)
            losses.append(answer_loss(llm, lines))
        return float(np.mean(losses))
    return criterion


def functional_loss(cfg, llm, public_pairs, train_runs, rows_per_run=16):
    """A differentiable f(pred_updates, pair_idx): the frozen LLM's answer loss on a few lines of
    each training pair's own shadow subset, with that pair's predicted update as its LoRA weights.
    torch.func runs one LLM per predicted update in a single batched call (vmap)."""
    subsets = data.shadow_subsets(public_pairs, cfg.n_shadow, cfg.n_train, cfg.shadow_alpha, cfg.seed)
    lines = [line for k in train_runs for line in subsets[k][1]]
    x, y, mask = (t.view(len(train_runs), cfg.n_train, -1).to(llm.wte.weight.device)
                  for t in data.encode_lines(lines, data.get_tokenizer()))   # (runs, n_train, T)
    g = torch.Generator().manual_seed(cfg.seed)

    def one_llm(update, xb, yb, mb):
        return torch.func.functional_call(llm, tinylm.split_update(llm, update), (xb, yb, mb))[1]

    def loss(pred_updates, pair_idx):
        run = (pair_idx // cfg.n_snapshots).cpu()[:, None]                  # pairs are run-major
        rows = torch.randint(cfg.n_train, (len(run), rows_per_run), generator=g)
        return torch.func.vmap(one_llm)(pred_updates, x[run, rows], y[run, rows], mask[run, rows]).mean()
    return loss


def fit_stage(cfg, tiny, llm, shadow, public_pairs):
    path = stage_path(cfg, "fit")
    tiny_shape, llm_shape = tinylm.update_shape(tiny.cfg, cfg.lora_rank), tinylm.update_shape(llm.cfg, cfg.lora_rank)
    if os.path.exists(path):
        return gradtx.load(path, tiny_shape, llm_shape, llm.wte.weight.device), load_stage(path + ".log")
    t0 = time.time()
    train_runs, val_runs = split_runs(cfg)
    X, Y = shadow["X"], shadow["Y"]
    gcfg = gradtx.GTConfig(*tiny_shape, *llm_shape, d_model=cfg.gt_d_model, n_layer=cfg.gt_layers,
                           n_head=cfg.gt_heads, dropout=cfg.gt_dropout, normalize=cfg.gt_normalize)
    model = gradtx.GradTransformer(gcfg).to(llm.wte.weight.device)
    criterion = functional_criterion(cfg, llm, public_pairs, val_runs)
    history = gradtx.fit(model, X[train_runs].flatten(0, 1), Y[train_runs].flatten(0, 1),
                         X[val_runs, -1], Y[val_runs, -1], cfg.gt_steps, cfg.gt_lr,
                         cfg.gt_weight_decay, cfg.gt_batch, cfg.gt_eval_every, criterion, cfg.seed,
                         functional_loss(cfg, llm, public_pairs, train_runs), cfg.gt_func_weight)
    best = min(history, key=lambda h: h[4])
    log = {"history": history, "best_step": best[0], "val_rel_err": best[3], "val_loss": best[4],
           "mean_shadow_loss": criterion(Y[train_runs].flatten(0, 1).mean(0).expand(len(val_runs), -1, -1)),
           "true_update_loss": criterion(Y[val_runs, -1]), "seconds": time.time() - t0}
    tinylm.atomic_save(log, path + ".log")
    gradtx.save(model, path)  # last: its presence marks the stage done
    record_seconds(cfg, "fit", log["seconds"])
    print(f"fit       : {len(train_runs)} train / {len(val_runs)} val runs, best step {best[0]}, "
          f"val rel. error {best[3]:.3f}, val answer loss {best[4]:.4f} (mean shadow "
          f"{log['mean_shadow_loss']:.4f}, true update {log['true_update_loss']:.4f}), "
          f"{log['seconds']:.1f}s -> {path}")
    return model, log


# -----------------------------------------------------------------------------
# stage 4: clients fine-tune their TinyLM on private data and upload only the update


def privacy(cfg):
    """DP-SGD noise multiplier calibrated to the target epsilon (None when DP is off)."""
    if cfg.dp_epsilon <= 0:
        return None
    return dp.noise_multiplier_for(cfg.dp_epsilon, cfg.dp_sample_rate, cfg.ft_steps, cfg.dp_delta)


def clients_stage(cfg, tiny, private_pairs):
    """Each client: private train/test lines, its TinyLM update (DP-SGD if asked), the upload
    (output-perturbed if asked). Returns [{"name", "kind", "mixture", "update", "upload"}]."""
    path = stage_path(cfg, "clients")
    if (done := load_stage(path)) is not None:
        return done["clients"]
    t0, sigma, out = time.time(), privacy(cfg), []
    for i, (name, kind, mixture) in enumerate(tqdm(data.client_mixtures(cfg.n_skewed_per_op, cfg.n_iid, cfg.skew),
                                                   desc="clients", leave=False)):
        train_lines, _ = data.client_data(private_pairs, mixture, cfg.n_train, cfg.n_test, cfg.seed, i)
        seed = 2_000_003 * cfg.seed + i
        update = finetune(tiny, train_lines, cfg, seed, dp_sigma=sigma)[-1]
        upload = update
        if cfg.out_epsilon > 0:  # the Gaussian mechanism on the whole uploaded vector
            g = torch.Generator().manual_seed(seed)
            upload = dp.perturb_update(update, cfg.out_epsilon, cfg.dp_delta, cfg.out_clip, g)
        out.append({"name": name, "kind": kind, "index": i, "mixture": torch.tensor(mixture),
                    "update": update, "upload": upload})
    tinylm.atomic_save({"clients": out, "seconds": time.time() - t0}, path)
    record_seconds(cfg, "clients", time.time() - t0)
    dp_note = f", DP-SGD eps={cfg.dp_epsilon} sigma={sigma:.3f}" if sigma else ""
    print(f"clients   : {len(out)} clients fine-tuned their TinyLM{dp_note}, {time.time() - t0:.1f}s -> {path}")
    return out


# -----------------------------------------------------------------------------
# the pipeline


def main(argv):
    cfg = parse_args(argv)
    device = pick_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    os.makedirs(cfg.cache or cfg.out, exist_ok=True)
    t_start = time.time()
    print(f"gradtx: preset {cfg.preset}, seed {cfg.seed}, device {device}, out {cfg.out}")
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    tiny, llm = base_models(cfg, device)
    public_pairs, private_pairs = data.split_pairs(cfg.seed)
    shadow = shadow_stage(cfg, tiny, llm, device)
    translator, fit_log = fit_stage(cfg, tiny, llm, shadow, public_pairs)
    clients = clients_stage(cfg, tiny, private_pairs)
    import eval as evaluation  # eval.py imports this file for finetune(); import it late
    results = evaluation.evaluate(cfg, tiny, llm, translator, shadow, clients)
    results["timing_s"]["this_run_total"] = time.time() - t_start
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
