"""
train.py -- the whole Grad-Transformer protocol, stage by stage, cached on disk.

    python train.py                     # default (cpu) preset: the whole protocol on a laptop CPU
    python train.py --preset smoke      # a tiny run of every stage, well under a minute
    python train.py --dp_epsilon=1      # clients fine-tune with DP-SGD at epsilon = 1 (delta 1e-5)
    python train.py --experiment=dp     # the DP sweep: epsilon in {inf, 8, 1, 0.3, 0.1}, one table
    python train.py --experiment=collab # groups of 8 small clients pool their uploads, with and without DP
    python train.py --preset text       # language modeling on the docs that ship with Python
    python train.py --help              # every option

Stages (each writes its output atomically into --cache, default --out, and is skipped when there):
  1. pretrain    both public base models (TinyLM and LLM) on the task's public pretraining data
  2. shadow      the provider fine-tunes BOTH models on K shadow subsets of public data and records
                 S snapshots of both update vectors along the tail of each run: the training pairs
  2b. shadow_dp  with DP: R more TinyLM runs per subset made with the clients' published DP recipe
  3. fit         per noise level, the linear map (public subspace + ridge) and the Grad-Transformer
  4. clients     each client fine-tunes its TinyLM on its private data (with DP if asked) and
                 uploads only its update vector
  5. eval        the provider translates each upload (and each group's mean upload); eval.py scores
                 it against the baselines and writes results.json
A stage's cache key covers its settings, the keys of the stages it reads, and a fingerprint of the
data it is given, so a change of either re-runs it and everything after it, and nothing else.
"""
import hashlib
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from tqdm import tqdm

import data
import dp
import eval as evaluation
import gradtx
import tinylm

# -----------------------------------------------------------------------------
# configuration: a dataclass, presets, and a small typed --key=value parser


@dataclass
class Config:
    preset: str = "cpu"
    out: str = "out"             # where results.json goes (and, by default, the stage cache)
    cache: str = ""              # where finished stages are cached ("" = --out); share it between runs
    seed: int = 0                # changes the data split, shadow subsets, clients and inits
    device: str = "auto"         # auto = cuda, then mps, then cpu
    threads: int = 0             # torch CPU threads (0: torch's default)
    workers: int = 2             # processes for independent fine-tunes on a CPU (1: none)
    experiment: str = ""         # "" (one run), "dp" (the DP sweep) or "collab" (pooling groups)
    task: str = "arith"          # "arith" (reasoning, accuracy) or "text" (language modeling, bits/byte)
    text_path: str = ""          # text task: your own UTF-8 file instead of Python's documentation
    # base models and their pretraining on public data
    tiny_model: str = "tiny"
    llm_model: str = "llm"
    pretrain_steps_tiny: int = 1500
    pretrain_steps_llm: int = 4000   # measured: 3500 left the LLM weak at > and < (seed 0)
    pretrain_batch: int = 64
    pretrain_lr_tiny: float = 3e-3   # measured: the LLM learns all four operators far better at
    pretrain_lr_llm: float = 1e-3    # 1e-3 than at 3e-3; the TinyLM the other way round
    # LoRA fine-tuning: the recipe every party shares (tinylm.Recipe)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_seed: int = 1234        # the public seed of A0
    ft_steps: int = 100
    ft_batch: int = 32
    ft_lr: float = 3e-3          # measured: 1e-2 also teaches the convention but erodes arithmetic
    n_train: int = 512           # examples per shadow subset and per client
    # shadow curation
    n_shadow: int = 48           # K shadow subsets (measured: 64 cost 20 s more and translated no better
                                 # in the default run; under DP, 128-example groups did better with 64: README)
    n_snapshots: int = 4         # S snapshots per run, along the tail
    snapshot_gap: int = 10       # steps between snapshots (the last one is the final update)
    shadow_alpha: float = 0.5    # shadow mixtures ~ Dirichlet(shadow_alpha * m): 0.5 gives many near-pure
                                 # conventions (measured: 2.0 translated DP uploads far worse, README)
    shadow_dp_draws: int = 4     # R: DP TinyLM runs per shadow subset (with DP only)
    # Grad-Transformer
    gt_d_model: int = 128        # measured: 64 mistranslated the IID client on seed 0
    gt_layers: int = 1           # encoder layers = decoder layers
    gt_heads: int = 4
    gt_dropout: float = 0.3
    gt_weight_decay: float = 0.5
    gt_lr: float = 3e-4
    gt_steps: int = 800
    gt_batch: int = 32
    gt_eval_every: int = 100
    gt_normalize: bool = True    # z-score inputs and targets (the paper feeds raw values)
    gt_project: bool = True      # choose a public subspace for the input (k = 0 allowed; off: raw)
    gt_skip: bool = True         # learn the residual over the ridge map (off: the paper's decoder)
    gt_func_weight: float = 0.0  # weight of an LLM-loss term in training (0: the paper's pure MSE)
    gt_select: str = "loss"      # model selection by the LLM's "loss" or, for accuracy tasks, "exact_match"
    val_frac: float = 0.25       # share of shadow RUNS held out for model selection
    val_examples: int = 64       # examples of each held-out run the selection criterion scores
    # clients
    group_size: int = 1          # members per convention group (the skewed ones and the IID one)
    skew: float = 0.88
    n_test: int = 500
    weak_baselines: bool = True  # w2s, w2s_conf, kd: three LLM fine-tunes per client
    # differential privacy (off when dp_epsilon is 0)
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_mechanism: str = "sgd"    # "sgd": DP-SGD on the TinyLM; "output": Gaussian noise on the upload
    dp_clip: float = 1.0         # per-example gradient bound (sgd) or update-norm bound (output)
    dp_sample_rate: float = 0.0625  # Poisson rate q; expected batch = q * n_train


PRESETS = {
    "cpu": Config(),
    "smoke": Config(preset="smoke", out="out_smoke", tiny_model="micro", llm_model="mini",
                    pretrain_steps_tiny=150, pretrain_steps_llm=250, ft_steps=30, n_train=128,
                    n_shadow=8, n_snapshots=2, snapshot_gap=5, shadow_dp_draws=2, gt_steps=60,
                    gt_eval_every=20, n_test=100),
    # language modeling on Python's documentation (data.TextTask): windows of 64 bytes, bits per byte
    # measured (seed 0): 1,500 TinyLM + 2,500 LLM pretraining steps and 40 shadow runs took 12.7 min
    "text": Config(preset="text", out="out_text", task="text", pretrain_steps_tiny=1000, pretrain_steps_llm=1500,
                   ft_lr=5e-4, n_train=1024, n_test=200, n_shadow=32, n_snapshots=2, snapshot_gap=20,
                   shadow_alpha=3.0, val_frac=0.125, gt_project=False, gt_steps=400, gt_eval_every=200,
                   weak_baselines=False),
    "text_smoke": Config(preset="text_smoke", out="out_text_smoke", task="text", tiny_model="micro",
                         llm_model="mini", pretrain_steps_tiny=150, pretrain_steps_llm=250, ft_steps=30,
                         ft_lr=1e-3, n_train=64, n_test=32, n_shadow=8, n_snapshots=2, snapshot_gap=5,
                         shadow_alpha=3.0, gt_project=False, gt_steps=60, gt_eval_every=20),
    "gpu": Config(preset="gpu", out="out_gpu", tiny_model="tiny_gpu", llm_model="llm_gpu",
                  pretrain_steps_tiny=6000, pretrain_steps_llm=12000, pretrain_batch=128,
                  n_shadow=128, gt_steps=3000),
}
EXPERIMENTS = {   # one command each; every run of a sweep shares --cache
    "dp": [dict(dp_epsilon=eps, dp_mechanism=mech) for eps in (0.0, 8.0, 1.0, 0.3, 0.1)
           for mech in (("sgd", "output") if eps else ("sgd",))],
    "collab": [dict(group_size=8, n_train=128, n_test=200, weak_baselines=False, dp_epsilon=eps,
                    shadow_dp_draws=8) for eps in (0.0, 1.0)],
}


def parse_args(argv):
    """--preset=NAME sets the defaults, then --key=value (or --key value) overrides any Config field."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\noptions (default preset shown):")
        for f in fields(Config):
            print(f"  --{f.name}={getattr(Config(), f.name)}  ({f.type.__name__})")
        print(f"presets: {', '.join(PRESETS)}; experiments: {', '.join(EXPERIMENTS)}")
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
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Settings that parse but make no sense fail here, with what was expected."""
    if cfg.experiment not in ("", *EXPERIMENTS):
        raise SystemExit(f"unknown experiment {cfg.experiment!r}: expected one of {', '.join(EXPERIMENTS)}")
    if cfg.task not in ("arith", "text") or (cfg.text_path and cfg.task != "text"):
        raise SystemExit(f"--task={cfg.task} --text_path={cfg.text_path}: expected task 'arith' or 'text', and a "
                         f"text_path only with --task=text (or --preset=text)")
    if cfg.gt_select not in ("loss", "exact_match") or (cfg.gt_select == "exact_match" and cfg.task != "arith"):
        raise SystemExit(f"--gt_select={cfg.gt_select}: expected 'loss', or 'exact_match' for the arith task")
    if cfg.dp_mechanism not in ("sgd", "output"):
        raise SystemExit(f"--dp_mechanism={cfg.dp_mechanism}: expected 'sgd' or 'output'")
    if cfg.dp_epsilon < 0 or not 0 < cfg.dp_delta < 1 or not 0 < cfg.dp_sample_rate <= 1 or cfg.dp_clip <= 0:
        raise SystemExit("DP settings out of range: expected dp_epsilon >= 0 (0 = off), 0 < dp_delta < 1, "
                         "0 < dp_sample_rate <= 1, dp_clip > 0")
    for key in ("group_size", "n_shadow", "n_snapshots", "n_train", "n_test", "ft_steps", "shadow_dp_draws"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"--{key}={getattr(cfg, key)}: expected a positive integer")
    if cfg.snapshot_gap * (cfg.n_snapshots - 1) >= cfg.ft_steps:
        raise SystemExit(f"snapshots reach before step 1: expected snapshot_gap * (n_snapshots - 1) < ft_steps")
    if cfg.dp_epsilon > 0 and cfg.shadow_dp_draws < cfg.group_size:
        raise SystemExit(f"--shadow_dp_draws={cfg.shadow_dp_draws} < --group_size={cfg.group_size}: the map for "
                         f"a group's mean upload is trained on means of group_size DP draws per shadow subset")


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# -----------------------------------------------------------------------------
# the recipe and the privacy it buys

DP_ORDERS = dp.DEFAULT_ORDERS + [64, 80, 96, 128, 160, 192, 256, 384, 512]   # larger orders: eps 0.1 too


def recipe(cfg, private=False):
    """The published fine-tuning recipe; private=True gives the clients' DP-SGD recipe."""
    sigma = noise_multiplier(cfg) if private and cfg.dp_mechanism == "sgd" else 0.0
    return tinylm.Recipe(cfg.ft_steps, cfg.ft_batch, cfg.ft_lr, sigma or 0.0, cfg.dp_clip, cfg.dp_sample_rate)


def noise_multiplier(cfg):
    """DP-SGD: sigma calibrated to (epsilon, delta) by the RDP accountant; output perturbation: the
    Gaussian mechanism's noise std; None when DP is off."""
    if cfg.dp_epsilon <= 0:
        return None
    if cfg.dp_mechanism == "output":
        return dp.gaussian_sigma(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip)
    return dp.noise_multiplier_for(cfg.dp_epsilon, cfg.dp_sample_rate, cfg.ft_steps, cfg.dp_delta, DP_ORDERS)


def make_upload(cfg, private_recipe, model, x, y, mask, seed):
    """What a client releases: its TinyLM update (DP-SGD-trained when asked), or with output
    perturbation its clean update clipped to C plus Gaussian noise. Returns (upload, update)."""
    update = tinylm.finetune(model, x, y, mask, private_recipe, seed)[-1]
    if cfg.dp_epsilon > 0 and cfg.dp_mechanism == "output":
        return perturb(cfg, update, seed), update
    return update, update


def perturb(cfg, update, seed):
    """Output perturbation: the Gaussian mechanism on the whole update vector (dp.py)."""
    g = torch.Generator().manual_seed(seed + 1)
    return dp.perturb_update(update, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip, g)


# -----------------------------------------------------------------------------
# the cache: a stage's file name is a hash of its settings, its inputs' keys and its data

TINY_KEYS = ("task", "seed", "tiny_model", "pretrain_steps_tiny", "pretrain_batch", "pretrain_lr_tiny")
LLM_KEYS = ("task", "seed", "llm_model", "pretrain_steps_llm", "pretrain_batch", "pretrain_lr_llm")
FINETUNE_KEYS = ("lora_rank", "lora_alpha", "lora_seed", "ft_steps", "ft_batch", "ft_lr", "n_train")
SHADOW_KEYS = FINETUNE_KEYS + ("n_shadow", "n_snapshots", "snapshot_gap", "shadow_alpha")
DP_KEYS = ("dp_epsilon", "dp_delta", "dp_mechanism", "dp_clip", "dp_sample_rate")
SHADOW_DP_KEYS = SHADOW_KEYS + DP_KEYS + ("shadow_dp_draws",)
FIT_KEYS = ("gt_d_model", "gt_layers", "gt_heads", "gt_dropout", "gt_weight_decay", "gt_lr", "gt_steps",
            "gt_batch", "gt_eval_every", "gt_normalize", "gt_project", "gt_skip", "gt_func_weight", "gt_select",
            "val_frac", "val_examples")
CLIENT_DATA_KEYS = FINETUNE_KEYS + ("group_size", "skew", "n_test")   # who holds what, and the shared recipe
CLIENT_KEYS = CLIENT_DATA_KEYS + DP_KEYS


def stage_paths(cfg, task, levels=(1,)):
    """{stage: file} for this configuration. Each key hashes the stage's settings, the files of the
    stages it reads and a fingerprint of the data it is given: it cannot go stale."""
    def path(stage, keys, *inputs):   # an input stage counts by its file name: a cache can be moved
        inputs = [os.path.basename(i) if isinstance(i, str) else i for i in inputs]
        blob = json.dumps([stage, {k: getattr(cfg, k) for k in keys}, inputs], sort_keys=True)
        return os.path.join(cfg.cache or cfg.out, f"{stage}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}.pt")
    shadow_data = data.digest(e for k in range(cfg.n_shadow)
                              for e in task.shadow_subset(k, cfg.n_train, cfg.shadow_alpha)[1])
    client_data = data.digest(e for c in task.clients(cfg.n_train, cfg.n_test, cfg.group_size, cfg.skew)
                              for e in c["train"] + c["test"])
    p = {"pretrain_tiny": path("pretrain_tiny", TINY_KEYS, task.fingerprint()),
         "pretrain_llm": path("pretrain_llm", LLM_KEYS, task.fingerprint())}
    p["shadow"] = path("shadow", SHADOW_KEYS, p["pretrain_tiny"], p["pretrain_llm"], shadow_data)
    inputs = p["shadow"]
    if cfg.dp_epsilon > 0:
        p["shadow_dp"] = inputs = path("shadow_dp", SHADOW_DP_KEYS, p["shadow"])
    for m in levels:   # one translator per noise level: inputs that average m uploads
        p[f"fit_{m}"] = path("fit", FIT_KEYS, inputs, m, gradtx.SUBSPACE_SIZES, gradtx.RIDGE_LAMBDAS)
    p["clients"] = path("clients", CLIENT_KEYS, p["pretrain_tiny"], client_data)
    # llm_ft reads only the clients' data; the weak baselines also read their uploads (the clients stage)
    p["references"] = path("references", CLIENT_DATA_KEYS + ("seed", "weak_baselines"),
                           p["pretrain_llm"], p["clients"] if cfg.weak_baselines else client_data)
    return p


def load_stage(path):
    """A finished stage's output, or None. Stage files hold only tensors and plain values."""
    return torch.load(path, weights_only=True) if os.path.exists(path) else None


def record_seconds(cfg, path, seconds):
    """Compute time of a finished stage, kept beside its output (timing.json)."""
    timing_path = os.path.join(cfg.cache or cfg.out, "timing.json")
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
    timing[os.path.basename(path)] = seconds
    with open(timing_path + ".tmp", "w") as f:
        json.dump(timing, f, indent=1)
    os.replace(timing_path + ".tmp", timing_path)


def stage_seconds(cfg, paths):
    """{pretrain, shadow, fit, clients}: seconds each stage of this configuration took to compute."""
    timing_path = os.path.join(cfg.cache or cfg.out, "timing.json")
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
    t = lambda prefix: sum(timing.get(os.path.basename(p), 0.0) for s, p in paths.items() if s.startswith(prefix))
    return {"pretrain": t("pretrain"), "shadow": t("shadow"), "fit": t("fit"), "clients": t("clients"),
            "references": t("references")}


# -----------------------------------------------------------------------------
# stage 1: pretraining the public base models


def pretrain(cfg, task, size, steps, lr, seed, device, desc):
    """Train a GPT from scratch on the task's public pretraining data (AdamW, warmup + cosine)."""
    torch.manual_seed(seed)
    model = tinylm.GPT(replace(tinylm.MODEL_PRESETS[size], vocab_size=task.enc.n_vocab,
                               block_size=task.block_size)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 0])
    warmup = max(1, steps // 20)
    for step in (bar := tqdm(range(steps), desc=desc, leave=False)):
        lr_mult = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * lr_mult
        x, y, mask = (t.to(device) for t in task.pretrain_batch(cfg.pretrain_batch, rng))
        _, loss = model(x, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def base_models(cfg, task, paths, device):
    """Both base models with LoRA attached, pretraining (and caching) whichever is missing."""
    models = {}
    for who, size, steps, lr in (("tiny", cfg.tiny_model, cfg.pretrain_steps_tiny, cfg.pretrain_lr_tiny),
                                 ("llm", cfg.llm_model, cfg.pretrain_steps_llm, cfg.pretrain_lr_llm)):
        path = paths[f"pretrain_{who}"]
        if not os.path.exists(path):
            t0 = time.time()
            model = pretrain(cfg, task, size, steps, lr, cfg.seed + (0 if who == "tiny" else 1), device,
                             f"pretrain {who}")
            tinylm.save_model(model, path)
            record_seconds(cfg, path, time.time() - t0)
            print(f"pretrain  : {who} ({size}), {sum(p.numel() for p in model.parameters()):,} "
                  f"params, {steps} steps, {time.time() - t0:.1f}s -> {path}")
        models[who] = tinylm.add_lora(tinylm.load_model(path, device).eval(), cfg.lora_rank,
                                      cfg.lora_alpha, cfg.lora_seed)
    return models["tiny"], models["llm"]


# -----------------------------------------------------------------------------
# independent fine-tunes side by side: on a CPU, two single-threaded processes get through about
# 1.7x the work of one process with two threads (measured: these small matrices leave cores idle)

_worker = {}   # what a worker process holds: the config, the task, both base models with LoRA


def _init_worker(cfg, paths, device):
    torch.set_num_threads(1)
    task = data.make_task(cfg.task, cfg.seed, cfg.text_path)
    tiny, llm = base_models(cfg, task, paths, device)   # the cached checkpoints
    _worker.update(cfg=cfg, task=task, tiny=tiny, llm=llm)


def worker_map(cfg, fn, items, device, task, tiny, llm, paths):
    """map(fn, items), in order, in cfg.workers processes (in this one when workers <= 1 or on a GPU)."""
    if cfg.workers <= 1 or device != "cpu" or len(items) <= 1:
        _worker.update(cfg=cfg, task=task, tiny=tiny, llm=llm)
        yield from map(fn, items)
        return
    with mp.get_context("spawn").Pool(cfg.workers, _init_worker, (cfg, paths, device)) as pool:
        yield from pool.imap(fn, items)


def run_stage(cfg, path, desc, fn, items, device, task, tiny, llm, paths):
    """Results of fn over items, in worker processes, saved every few items so an interrupted stage
    resumes where it stopped; the finished list is saved atomically at `path`."""
    if (done := load_stage(path)) is not None:
        return done["results"]
    partial = path.replace(".pt", ".partial.pt")
    state = load_stage(partial) or {"results": [], "seconds": 0.0}
    t0, todo = time.time() - state["seconds"], items[len(state["results"]):]
    for i, result in enumerate(tqdm(worker_map(cfg, fn, todo, device, task, tiny, llm, paths), desc=desc,
                                    leave=False, initial=len(state["results"]), total=len(items))):
        state["results"].append(result)
        if (i + 1) % 8 == 0:
            state["seconds"] = time.time() - t0
            tinylm.atomic_save(state, partial)
    tinylm.atomic_save({"results": state["results"], "seconds": time.time() - t0}, path)
    record_seconds(cfg, path, time.time() - t0)
    if os.path.exists(partial):
        os.remove(partial)
    return state["results"]


# -----------------------------------------------------------------------------
# stage 2: shadow curation -- (TinyLM update, LLM update) pairs from public data


def snapshot_steps(cfg):
    """S steps along the tail of training, the last one being the final step."""
    return [cfg.ft_steps - i * cfg.snapshot_gap for i in reversed(range(cfg.n_snapshots))]


def shadow_run(k):
    """Shadow run k: fine-tune both models on subset k from the same LoRA init and the same batch
    order (same seed); the snapshots at the same steps form the pairs. Runs in a worker."""
    cfg, task = _worker["cfg"], _worker["task"]
    x, y, mask = task.encode(task.shadow_subset(k, cfg.n_train, cfg.shadow_alpha)[1])
    seed, steps, clean = 1_000_003 * cfg.seed + k, snapshot_steps(cfg), recipe(cfg)
    return (torch.stack(tinylm.finetune(_worker["tiny"], x, y, mask, clean, seed, steps)),
            torch.stack(tinylm.finetune(_worker["llm"], x, y, mask, clean, seed, steps)))


def shadow_dp_run(item):
    """Draw r of shadow subset k: the TinyLM fine-tuned with the clients' own DP recipe (the
    provider re-creates exactly what a client would upload from these data). Runs in a worker."""
    (k, r), cfg, task = item, _worker["cfg"], _worker["task"]
    x, y, mask = task.encode(task.shadow_subset(k, cfg.n_train, cfg.shadow_alpha)[1])
    return make_upload(cfg, recipe(cfg, private=True), _worker["tiny"], x, y, mask,
                       3_000_017 * cfg.seed + 1_009 * k + r)[0]


def shadow_stages(cfg, task, tiny, llm, paths, device):
    """{"X": (K, S, ...) clean TinyLM snapshots, "Y": (K, S, ...) LLM snapshots,
    "X_private": (K, R, ...) final TinyLM updates made as the clients make theirs (DP only)}."""
    t0 = time.time()
    runs = run_stage(cfg, paths["shadow"], "shadow runs", shadow_run, list(range(cfg.n_shadow)),
                     device, task, tiny, llm, paths)
    shadow = {"X": torch.stack([x for x, _ in runs]), "Y": torch.stack([y for _, y in runs])}
    print(f"shadow    : {cfg.n_shadow} runs x {cfg.n_snapshots} snapshots = {cfg.n_shadow * cfg.n_snapshots} "
          f"pairs, {time.time() - t0:.1f}s -> {paths['shadow']}")
    if "shadow_dp" in paths:
        t0 = time.time()
        items = [(k, r) for k in range(cfg.n_shadow) for r in range(cfg.shadow_dp_draws)]
        if cfg.dp_mechanism == "output":   # the clean run's final update IS the recipe's update: add noise
            draws = [perturb(cfg, shadow["X"][k, -1], 3_000_017 * cfg.seed + 1_009 * k + r) for k, r in items]
        else:
            draws = run_stage(cfg, paths["shadow_dp"], "shadow DP draws", shadow_dp_run, items, device,
                              task, tiny, llm, paths)
        shadow["X_private"] = torch.stack(draws).view(cfg.n_shadow, cfg.shadow_dp_draws, *draws[0].shape)
        print(f"shadow_dp : {len(items)} TinyLM runs with the clients' DP recipe ({cfg.dp_mechanism}, "
              f"eps={cfg.dp_epsilon}), {time.time() - t0:.1f}s -> {paths['shadow_dp']}")
    return shadow


# -----------------------------------------------------------------------------
# stage 3: per noise level, the linear map and the Grad-Transformer, selected on held-out RUNS


def translator_inputs(cfg, shadow, runs, m):
    """The shadow pairs a map for level-m inputs learns from: X (runs, P, n_src, d_src), Y (runs, P, ...).

    Without DP: the S clean snapshots of each run. With DP the inputs must carry the noise of the
    uploads they stand for: means of m DP draws of one subset (the mean of m uploads is ~sqrt(m)
    less noisy than one), P = R // m disjoint means per subset, each paired with the final LLM update."""
    if "X_private" not in shadow:
        return shadow["X"][runs], shadow["Y"][runs]
    P = cfg.shadow_dp_draws // m
    X = shadow["X_private"][runs, :P * m].unflatten(1, (P, m)).mean(2)
    return X, shadow["Y"][runs, -1:].expand(-1, P, -1, -1)


def fit_stage(cfg, task, tiny, llm, shadow, path, m):
    """The linear map (public subspace k and ridge lambda, chosen by the functional criterion) and
    the Grad-Transformer on top of it, for inputs that average m uploads."""
    if os.path.exists(path):
        return gradtx.load(path, tinylm.update_shape(tiny.cfg, cfg.lora_rank),
                           tinylm.update_shape(llm.cfg, cfg.lora_rank), llm.wte.weight.device), load_stage(path + ".log")
    t0 = time.time()
    train_runs, val_runs = gradtx.split_runs(cfg.n_shadow, cfg.val_frac, cfg.seed)
    X, Y = translator_inputs(cfg, shadow, train_runs, m)
    X_train, Y_train = X.flatten(0, 1), Y.flatten(0, 1)
    X_val, Y_val = (t[:, -1] for t in translator_inputs(cfg, shadow, val_runs, m))   # one input per run
    examples = [task.shadow_subset(k, cfg.n_train, cfg.shadow_alpha)[1] for k in range(cfg.n_shadow)]
    criterion = gradtx.functional_criterion(llm, [task.encode(examples[k][:cfg.val_examples]) for k in val_runs],
                                            cfg.gt_select)
    X_clean = shadow["X"][train_runs].flatten(0, 1)   # the public subspace: clean public updates only
    ks = gradtx.SUBSPACE_SIZES if cfg.gt_project else (0,)
    basis, ridge, k, lam, scores = gradtx.select_linear_map(X_clean, X_train, Y_train, X_val, criterion, ks)
    signal = None   # a diagnostic: how much of these inputs is signal, could any map translate them?
    if "X_private" in shadow:
        top = gradtx.public_basis(X_clean, gradtx.SIGNAL_DIRECTIONS)
        signal = gradtx.upload_signal(shadow["X"][train_runs, -1], X, top).tolist()
    gcfg = gradtx.GTConfig(*X_train.shape[1:], *Y_train.shape[1:], d_model=cfg.gt_d_model,
                           n_layer=cfg.gt_layers, n_head=cfg.gt_heads, dropout=cfg.gt_dropout,
                           normalize=cfg.gt_normalize, n_basis=k, n_skip=len(X_train) if cfg.gt_skip else 0)
    model = gradtx.GradTransformer(gcfg).to(llm.wte.weight.device)
    gradtx.set_linear_map(model, basis, ridge if cfg.gt_skip else None)
    func_loss = None
    if cfg.gt_func_weight > 0:   # encoded together so that every run has the same length T
        x, y, mask = (t.view(len(train_runs), cfg.n_train, -1)
                      for t in task.encode([e for k in train_runs for e in examples[k]]))
        func_loss = gradtx.functional_loss(llm, x, y, mask, torch.arange(len(train_runs)).repeat_interleave(X.shape[1]),
                                           seed=cfg.seed)
    history = gradtx.fit(model, X_train, Y_train, X_val, Y_val, cfg.gt_steps, cfg.gt_lr, cfg.gt_weight_decay,
                         cfg.gt_batch, cfg.gt_eval_every, criterion, cfg.seed, func_loss, cfg.gt_func_weight)
    best = min(history, key=lambda h: h[4])
    log = {"history": history, "best_step": best[0], "val_rel_err": best[3], "val_loss": best[4],
           "k": k, "ridge_lambda": lam, "ridge_loss": scores[(k, lam)], "basis": basis, "ridge": ridge,
           "upload_signal": signal,
           "mean_shadow_loss": criterion(Y_train.mean(0).expand(len(val_runs), -1, -1)),
           "true_update_loss": criterion(Y_val), "level": m, "seconds": time.time() - t0}
    tinylm.atomic_save(log, path + ".log")
    gradtx.save(model, path)  # last: its presence marks the stage done
    record_seconds(cfg, path, log["seconds"])
    print(f"fit m={m}   : {len(X_train)} pairs from {len(train_runs)} runs, {len(val_runs)} val runs; "
          f"subspace k={k}, ridge lambda={lam:g}: val loss {log['ridge_loss']:.4f}; translator best step "
          f"{best[0]}: {best[4]:.4f} (mean shadow {log['mean_shadow_loss']:.4f}, true update "
          f"{log['true_update_loss']:.4f}){signal_note(signal)}, {log['seconds']:.1f}s")
    return model, log


def signal_note(signal):
    return "" if signal is None else ", upload signal " + "/".join(f"{c:.2f}" for c in signal)


def pool_levels(cfg):
    """Noise levels that need their own translator: 1 (one upload) and, for groups, 2, 4, ..., M."""
    if cfg.dp_epsilon <= 0 or cfg.group_size == 1:
        return (1,)
    return tuple(sorted({*(2 ** i for i in range(int(math.log2(cfg.group_size)) + 1)), cfg.group_size}))


# -----------------------------------------------------------------------------
# stage 4: clients fine-tune their TinyLM on private data and upload only the update


def client_run(c):
    """One client: its non-private TinyLM update (the PGR floor, never uploaded) and its upload."""
    cfg, tiny = _worker["cfg"], _worker["tiny"]
    x, y, mask = _worker["task"].encode(c["train"])
    seed = 2_000_003 * cfg.seed + c["index"]
    floor = tinylm.finetune(tiny, x, y, mask, recipe(cfg), seed)[-1]
    if cfg.dp_epsilon <= 0:
        return floor, floor
    return floor, make_upload(cfg, recipe(cfg, private=True), tiny, x, y, mask, seed)[0]


def reference_run(c):
    """The LLM fine-tunes a client's results are compared with. They use data the provider never
    sees: llm_ft (the client's private data: the ceiling) and, with weak_baselines, w2s / w2s_conf
    (the client's inputs labelled by its own TinyLM -- the DP one under DP-SGD) and kd (public
    prompts labelled by that TinyLM). Runs in a worker."""
    cfg, task, tiny, llm = _worker["cfg"], _worker["task"], _worker["tiny"], _worker["llm"]
    seed, clean = 2_000_003 * cfg.seed + c["index"], recipe(cfg)
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng([cfg.seed, 4, c["index"]])

    def finetune_llm(examples, conf_weight=0.0):
        if not examples:   # a weak model that answers nothing teaches nothing: the LLM stays as it is
            return torch.zeros(tinylm.update_shape(llm.cfg, cfg.lora_rank))
        return tinylm.finetune(llm, *task.encode(examples), clean, seed, conf_weight=conf_weight)[-1]

    t0 = time.perf_counter()
    out = {"llm_ft": finetune_llm(c["train"]), "seconds": time.perf_counter() - t0}
    if cfg.weak_baselines:
        own = c["upload"] if cfg.dp_epsilon > 0 else c["floor_update"]   # what the provider could rebuild
        tinylm.set_update(tiny, own)
        weak = evaluation.relabel(task, tiny, c["train"], g)
        kd = evaluation.relabel(task, tiny, task.public_examples(len(c["train"]), rng), g)
        out.update(w2s=finetune_llm(weak), w2s_conf=finetune_llm(weak, 0.5), kd=finetune_llm(kd))
    return out


def clients_stage(cfg, task, tiny, llm, paths, device):
    t0 = time.time()
    clients = task.clients(cfg.n_train, cfg.n_test, cfg.group_size, cfg.skew)
    runs = run_stage(cfg, paths["clients"], "clients", client_run, clients, device, task, tiny, llm, paths)
    for c, (floor, upload) in zip(clients, runs):
        c.update(floor_update=floor, upload=upload)
    references = run_stage(cfg, paths["references"], "reference fine-tunes", reference_run, clients, device,
                           task, tiny, llm, paths)
    for c, refs in zip(clients, references):
        c["references"] = refs
    sigma = noise_multiplier(cfg)
    note = f", DP ({cfg.dp_mechanism}) eps={cfg.dp_epsilon} sigma={sigma:.3f}" if sigma else ""
    print(f"clients   : {len(clients)} clients fine-tuned their TinyLM{note}, {time.time() - t0:.1f}s")
    return clients


# -----------------------------------------------------------------------------
# the pipeline, and the experiments that run it several times


def provenance():
    """The commit (when run from a git checkout) and the versions behind a result."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"commit": commit, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__}


def run(cfg):
    device = pick_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    os.makedirs(cfg.cache or cfg.out, exist_ok=True)
    t_start = time.time()
    print(f"gradtx: preset {cfg.preset}, task {cfg.task}, seed {cfg.seed}, device {device}, out {cfg.out}")
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    task = data.make_task(cfg.task, cfg.seed, cfg.text_path)
    paths = stage_paths(cfg, task, pool_levels(cfg))
    tiny, llm = base_models(cfg, task, paths, device)
    shadow = shadow_stages(cfg, task, tiny, llm, paths, device)
    translators = {m: fit_stage(cfg, task, tiny, llm, shadow, paths[f"fit_{m}"], m) for m in pool_levels(cfg)}
    clients = clients_stage(cfg, task, tiny, llm, paths, device)
    privacy = {"epsilon": cfg.dp_epsilon if cfg.dp_epsilon > 0 else None, "delta": cfg.dp_delta,
               "mechanism": cfg.dp_mechanism if cfg.dp_epsilon > 0 else None,
               "noise_multiplier": noise_multiplier(cfg) or 0.0, "clip": cfg.dp_clip,
               "sample_rate": cfg.dp_sample_rate, "steps": cfg.ft_steps,
               "subspace_k": {m: log["k"] for m, (_, log) in translators.items()}}
    results = evaluation.evaluate(cfg, task, tiny, llm, translators, shadow, clients,
                                  recipe(cfg), stage_seconds(cfg, paths), privacy, provenance())
    results["timing_s"]["this_run_total"] = time.time() - t_start
    return results


def main(argv):
    cfg = parse_args(argv)
    if not cfg.experiment:
        return run(cfg)
    rows = []
    for o in EXPERIMENTS[cfg.experiment]:   # later runs reuse the earlier runs' stages
        name = f"eps{o['dp_epsilon']:g}_{o.get('dp_mechanism', 'sgd')}" if o["dp_epsilon"] else "no_dp"
        sub = replace(cfg, experiment="", cache=cfg.cache or cfg.out, out=os.path.join(cfg.out, name), **o)
        rows.append(run(sub))
    table = evaluation.experiment_table(cfg.experiment, rows)
    with open(os.path.join(cfg.out, f"{cfg.experiment}.md"), "w") as f:
        f.write(table + "\n")
    print(f"\n{cfg.experiment} experiment ({len(rows)} runs) -> {cfg.out}/{cfg.experiment}.md\n\n{table}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
