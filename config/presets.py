"""
config/presets.py -- every setting of a gradtx run: its default (the "cpu" preset) and why, the
other presets, the experiments, the option parser every command uses (--key=value or --key value),
and what the settings publish (the fine-tuning recipe and its DP noise). The measurements behind
the defaults: RESULTS.md, "Why the defaults are what they are".

    python train.py --help                 # every option with its default
    python train.py --preset=smoke --seed=1   # a preset, then any field overridden

A preset is a Config instance; an experiment is a list of overrides, one run each.
"""
import os
import shutil
import sys
from dataclasses import dataclass, fields, replace

import torch

import dp
import tinylm


# CPU defaults "tiny"/"llm" (~27% vs ~73% arithmetic pretrained); *_gpu: one GPU; micro/mini: smoke
MODEL_PRESETS = {
    "micro": tinylm.GPTConfig(n_layer=1, n_head=2, n_embd=32),
    "mini": tinylm.GPTConfig(n_layer=2, n_head=2, n_embd=48),
    "tiny": tinylm.GPTConfig(n_layer=2, n_head=4, n_embd=64),
    "llm": tinylm.GPTConfig(n_layer=4, n_head=4, n_embd=128),
    "tiny_gpu": tinylm.GPTConfig(n_layer=4, n_head=4, n_embd=128),
    "llm_gpu": tinylm.GPTConfig(n_layer=8, n_head=8, n_embd=256),
}


@dataclass
class Config:
    preset: str = "cpu"
    out: str = "out"             # where results.json goes (and, by default, the stage cache)
    # where finished stages are cached ("" = --out); share it between runs
    cache: str = ""
    seed: int = 0                # changes the data split, shadow subsets, clients and inits
    device: str = "auto"         # auto = cuda, then mps, then cpu
    threads: int = 0             # torch CPU threads (0: torch's default)
    workers: int = 2             # processes for independent fine-tunes on a CPU (1: none)
    # under torchrun each rank is one worker (--workers unused); a rank that waits longer than this
    # for the others (one failed or hangs) ends the job, naming itself and its stage
    dist_timeout: float = 1800.0
    # torch.compile the pretraining and translator steps (one graph each; a CUDA graph on CUDA).
    # Off by default: on a CPU it needs a C++ compiler and a minute of compiling per run
    compile: bool = False
    # the precision of those steps' forwards: "float32", "bfloat16" (autocast) or "float16"
    # (autocast and a grad scaler). The fine-tunes and DP stay float32, whatever this says
    dtype: str = "float32"
    # independent fine-tunes of one base model run this many at a time as one batched computation
    # (tinylm.finetune_many; 1: one by one, tinylm.finetune)
    batch_runs: int = 16
    # "" (one run), "dp" (DP sweep), "collab" (pooling), "frontier" (N x eps), "shadow_count"
    experiment: str = ""
    # "arith" (reasoning, accuracy) or "text" (language modeling, bits/byte)
    task: str = "arith"
    text_path: str = ""          # text task: your own UTF-8 file instead of Python's own text
    # base models and their pretraining on public data
    tiny_model: str = "tiny"
    llm_model: str = "llm"
    pretrain_steps_tiny: int = 1500
    pretrain_steps_llm: int = 4000   # fewer leave the LLM weak at > and <
    pretrain_batch: int = 64
    pretrain_lr_tiny: float = 3e-3   # each model's best for learning all four operators
    pretrain_lr_llm: float = 1e-3
    # LoRA fine-tuning: the recipe every party shares (tinylm.Recipe)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_seed: int = 1234        # the public seed of A0
    ft_steps: int = 100
    ft_batch: int = 32
    ft_lr: float = 3e-3          # teaches the convention without eroding the arithmetic
    n_train: int = 512           # examples per shadow subset and per client
    # shadow curation
    n_shadow: int = 48           # K shadow subsets (more cost time and translate no better)
    fit_shadow: int = 0          # fit on the first K of the n_shadow subsets (0: all of them)
    n_snapshots: int = 4         # S snapshots per run, along the tail
    snapshot_gap: int = 10       # steps between snapshots (the last one is the final update)
    # shadow mixtures ~ Dirichlet(shadow_alpha * m): many near-pure conventions, so the shadow
    # updates reach the corners where skewed clients sit ...
    shadow_alpha: float = 0.5
    # ... and this share of the subsets near m (Dirichlet(20 m), every 4th at 0.25), where IID
    # clients sit. Off: at 0.25 it kept the IID client from harm at N = 2048, eps = 0.3 (seed 1)
    # but starved the corners (skewed gain 0.78 there, 0.77 at K = 24); RESULTS, "Do no harm"
    shadow_near_mean: float = 0.0
    shadow_dp_draws: int = 4     # R: DP TinyLM runs per shadow subset (with DP only)
    # each DP draw of a subset on fresh records of its mixture, as each client holds its own. Off:
    # it left the IID group's pooled uploads as harmed as before (RESULTS, "Do no harm")
    shadow_dp_fresh: bool = False
    # Grad-Transformer
    gt_d_model: int = 128        # narrower mistranslates the IID client
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
    # with DP: fall back towards the mean update as far as an upload may be noise alone (the
    # do-no-harm gate, gradtx.py; off: translate every upload as it is)
    gt_gate: bool = True
    # with DP: the provider's choice (gradtx.choose) among the mean update, the linear map and the
    # translator, the gate blending, deciding or left out, by their scores on held-out shadow runs
    # at the clients' privacy level: the first in gradtx.CANDIDATES' order within one standard
    # error of the best, among those whose held-out uploads lose at most choice_budget (accuracy)
    # to the mean update on average, where they lose (off: the translator behind the blending gate
    # for every upload)
    gt_choose: bool = True
    choice_budget: float = 0.02
    # with DP, on top of the choice: where an upload's rebuilt TinyLM moves towards an operator
    # further than noise-only uploads at its level do, an update under which the LLM answers that
    # operator (gradtx.answer_test; off: the choice alone)
    gt_answer_test: bool = True
    # ... calibrated on this many noise-only uploads: DP fine-tunes of public records that hold no
    # convention of their own (the task mixture m), made as the clients make theirs
    answer_null_runs: int = 64
    gt_init: int = 0             # the translator's init is drawn from seed + gt_init
    # model selection by the LLM's "loss" or, for accuracy tasks, "exact_match"
    gt_select: str = "loss"
    val_frac: float = 0.25       # share of shadow RUNS held out for model selection
    # the linear map is chosen by cross-validation over the runs of the fit: each run held out once
    # in one of this many folds (1: the single held-out split; few runs rank maps only up to noise)
    gt_select_folds: int = 4
    # of the linear maps: "one_se", the simplest within one standard error of the best; "best",
    # the lowest mean score; "auto", "best" with DP uploads (the gate already pulls a noisy upload
    # to the mean update; a simplest map would pull it twice, and drop a convention's directions)
    gt_select_rule: str = "auto"
    val_examples: int = 64       # examples of each held-out run the selection criterion scores
    # with DP, the map's selection scores every noisy input of a held-out run (its examples shared
    # between them), not only its last (off: it moves the argmin among near-ties both ways)
    gt_select_draws: bool = False
    # with DP, the translator (not its linear map) also learns from pairs between shadow runs
    # (data.between_runs), this many per shadow pair: the mixed conventions between near-pure ones
    gt_mixup: float = 1.0
    # ... and from this many inputs per run with fresh noise (data.noise_copies), not only its draws
    gt_noise_copies: int = 16
    # clients
    group_size: int = 1          # members per convention group (the skewed ones and the IID one)
    skew: float = 0.88
    # clients at random points of the convention simplex (arith), each with its own llm_ft: do no
    # harm is checked away from the corners too
    random_clients: int = 4
    n_test: int = 500
    # the weak baselines w2s, w2s_conf, vissup and kd: four more LLM fine-tunes per client
    weak_baselines: bool = True
    # differential privacy (off when dp_epsilon is 0)
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    # "sgd": DP-SGD on the TinyLM; "output": Gaussian noise on the upload
    dp_mechanism: str = "sgd"
    dp_clip: float = 1.0         # per-example gradient bound (sgd) or update-norm bound (output)
    # Poisson rate q; 0: q = ft_batch / n_train (the expected batch stays ft_batch)
    dp_sample_rate: float = 0.0


PRESETS = {
    "cpu": Config(),
    "smoke": Config(preset="smoke", out="out_smoke", tiny_model="micro", llm_model="mini",
                    pretrain_steps_tiny=150, pretrain_steps_llm=250, ft_steps=30, n_train=128,
                    n_shadow=8, n_snapshots=2, snapshot_gap=5, shadow_dp_draws=2, gt_steps=60,
                    gt_eval_every=20, n_test=100),
    # language modeling on kinds of text from the standard library (experiments/text.py): windows of
    # 64 bytes, bits per byte; near-pure shadow subsets (Dirichlet(0.4 / 3) per kind), so that the
    # translator sees what each kind's update looks like alone
    "text": Config(preset="text", out="out_text", task="text", pretrain_steps_tiny=600,
                   pretrain_steps_llm=750, ft_lr=5e-4, n_train=1024, n_test=200, n_shadow=32,
                   n_snapshots=2, snapshot_gap=20, shadow_alpha=0.4, val_frac=0.125,
                   gt_project=False, gt_steps=400, gt_eval_every=200, weak_baselines=False,
                   shadow_near_mean=0.0, gt_select_folds=1),
    "text_smoke": Config(preset="text_smoke", out="out_text_smoke", task="text", tiny_model="micro",
                         llm_model="mini", pretrain_steps_tiny=150, pretrain_steps_llm=250,
                         ft_steps=30, ft_lr=1e-3, n_train=64, n_test=32, n_shadow=8, n_snapshots=2,
                         snapshot_gap=5, shadow_alpha=0.4, gt_project=False, gt_steps=60,
                         gt_eval_every=20, shadow_near_mean=0.0, gt_select_folds=1),
    "gpu": Config(preset="gpu", out="out_gpu", tiny_model="tiny_gpu", llm_model="llm_gpu",
                  pretrain_steps_tiny=6000, pretrain_steps_llm=12000, pretrain_batch=128,
                  n_shadow=128, gt_steps=3000, compile=True, dtype="bfloat16"),
}
# the translator as the paper publishes it: raw values in and out, no public subspace, no skip path
# over the linear map, no gate
PAPER_TRANSLATOR = dict(gt_normalize=False, gt_project=False, gt_skip=False, gt_gate=False)
SHADOW_COUNTS = (12, 24, 48, 96, 192)
# (privacy level, inits of this project's translator): no DP; DP-SGD at epsilon = 1; and high
# noise, where the translator's residual moves off its linear map by an amount that depends on its
# init
SHADOW_COUNT_LEVELS = ((dict(), 1), (dict(dp_epsilon=1.0), 1),
                       (dict(n_train=3072, dp_epsilon=0.1), 3))


def shadow_count_runs(counts, levels):
    """The shadow-count experiment: per privacy level the largest K is curated once (n_shadow) and
    each run fits on the first K of it (fit_shadow), the paper's translator and this project's (with
    `inits` inits of it); its linear map and the mean shadow update come with the latter."""
    return [dict(n_shadow=max(counts), fit_shadow=K, weak_baselines=False, **level, **translator)
            for level, inits in levels for K in counts
            for translator in [PAPER_TRANSLATOR] + [dict(gt_init=i) for i in range(inits)]]


# the linear map's search grid (gradtx.select_linear_map); k = 0: no projection
SUBSPACE_SIZES = (0, 4, 8, 16, 32, 64)
RIDGE_LAMBDAS = (1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
# how a map and a checkpoint are chosen (part of the fit's cache key)
SELECTION = "simplest within one standard error"
SIGNAL_DIRECTIONS = 4   # the top public directions along which a fit measures upload_signal
CHOICE_EXAMPLES = 256   # fresh records of each held-out shadow run the provider's choice scores
CHECK_PROMPTS = 64      # public prompts an upload's rebuilt TinyLM answers for the check
ANSWER_PROMPTS = 256    # public prompts the answer test reads both models' next token on


EXPERIMENTS = {   # one command each; every run of a sweep shares --cache
    "dp": [dict(dp_epsilon=eps, dp_mechanism=mech) for eps in (0.0, 8.0, 1.0, 0.3, 0.1)
           for mech in (("sgd", "output") if eps else ("sgd",))],
    "collab": [dict(group_size=8, n_train=128, n_test=200, weak_baselines=False, dp_epsilon=eps,
                    dp_sample_rate=0.0625, shadow_dp_draws=8) for eps in (0.0, 1.0)],
    # privacy vs utility on one axis, N * epsilon * sqrt(m): clients of N records at epsilon, then
    # at the paper's size (N = 8,192) epsilon below 0.1, then groups of m <= 8 pooled uploads
    "frontier": [dict(n_train=n, dp_epsilon=eps) for n in (8192, 2048, 512)
                 for eps in (0.1, 0.3, 1.0)]
                + [dict(n_train=8192, dp_epsilon=eps) for eps in (0.05, 0.03)]
                + [dict(n_train=512, dp_epsilon=0.3, group_size=8, shadow_dp_draws=8, n_test=200,
                        weak_baselines=False)],
    # how many shadow subsets the provider needs, and whether the translator beats its linear map
    "shadow_count": shadow_count_runs(SHADOW_COUNTS, SHADOW_COUNT_LEVELS),
}


def parse_args(argv, usage=""):
    """--preset=NAME sets the defaults, then --key=value (or --key value) overrides any Config
    field. --help prints `usage` (train.py's docstring) and every option."""
    if any(a in ("-h", "--help") for a in argv):
        print_help(usage, Config())
        print(f"presets: {', '.join(PRESETS)}; experiments: {', '.join(EXPERIMENTS)}")
        sys.exit(0)
    pairs = option_pairs(argv)
    preset = dict(pairs).get("preset", "cpu")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    cfg = override(PRESETS[preset], pairs)
    check_config(cfg)
    return cfg


def parse_options(defaults, argv, usage=""):
    """A tool's options, parsed as train.py's are: --key=value (or --key value) over the dataclass
    `defaults`; --help prints `usage` and every option, then exits."""
    if any(a in ("-h", "--help") for a in argv):
        print_help(usage, defaults)
        sys.exit(0)
    return override(defaults, option_pairs(argv))


def option_pairs(argv):
    """["--a=1", "--b", "2"] -> [("a", "1"), ("b", "2")]: both spellings, as argparse accepts."""
    pairs = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            raise SystemExit(f"bad argument {a!r}: expected --key=value (see --help)")
        if "=" not in a:  # also accept "--key value"
            if not args:
                raise SystemExit(f"option {a} has no value: expected {a}=VALUE")
            a = a + "=" + args.pop(0)
        pairs.append(tuple(a[2:].split("=", 1)))
    return pairs


def override(cfg, pairs):
    """A copy of the dataclass `cfg` with each (key, value) parsed to its field's type."""
    types = {f.name: f.type for f in fields(cfg)}
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


def print_help(usage, defaults):
    print(usage + "\noptions (defaults shown):")
    for f in fields(defaults):
        print(f"  --{f.name}={getattr(defaults, f.name)}  ({f.type.__name__})")


def check_config(cfg):
    """Settings that parse but make no sense fail here, with what was expected."""
    check_choices(cfg)
    check_ranges(cfg)


def check_choices(cfg):
    """The settings that name one of a few choices: each a known one, and one that fits the rest."""
    if cfg.experiment not in ("", *EXPERIMENTS):
        raise SystemExit(f"unknown experiment {cfg.experiment!r}: expected one of "
                         f"{', '.join(EXPERIMENTS)}")
    if cfg.task not in ("arith", "text") or (cfg.text_path and cfg.task != "text"):
        raise SystemExit(f"--task={cfg.task} --text_path={cfg.text_path}: expected task 'arith' or "
                         "'text', and a text_path only with --task=text (or --preset=text)")
    if cfg.gt_select not in ("loss", "exact_match") or (cfg.gt_select == "exact_match"
                                                        and cfg.task != "arith"):
        raise SystemExit(f"--gt_select={cfg.gt_select}: expected 'loss', or 'exact_match' for the "
                         "arith task")
    if cfg.gt_select_rule not in ("one_se", "best", "auto") or cfg.gt_select_folds < 1:
        raise SystemExit(f"--gt_select_rule={cfg.gt_select_rule} --gt_select_folds="
                         f"{cfg.gt_select_folds}: expected 'one_se', 'best' or 'auto', and 1 or "
                         "more folds")
    if cfg.dtype not in tinylm.DTYPES:
        raise SystemExit(f"--dtype={cfg.dtype}: expected one of {', '.join(tinylm.DTYPES)}")
    if cfg.dp_mechanism not in ("sgd", "output"):
        raise SystemExit(f"--dp_mechanism={cfg.dp_mechanism}: expected 'sgd' or 'output'")
    if cfg.shadow_dp_fresh and cfg.dp_mechanism == "output":
        raise SystemExit("--shadow_dp_fresh with --dp_mechanism=output: output perturbation's "
                         "draws add noise to the clean runs' updates, there are no records to "
                         "draw afresh; expected --dp_mechanism=sgd")


def check_ranges(cfg):
    """The numeric settings: each within its range, and the counts consistent with each other."""
    if (cfg.dp_epsilon < 0 or not 0 < cfg.dp_delta < 1 or not 0 <= cfg.dp_sample_rate <= 1
            or cfg.dp_clip <= 0):
        raise SystemExit("DP settings out of range: expected dp_epsilon >= 0 (0 = off), "
                         "0 < dp_delta < 1, 0 <= dp_sample_rate <= 1 (0 = ft_batch / n_train), "
                         "dp_clip > 0")
    if not 0 <= cfg.fit_shadow <= cfg.n_shadow or 0 < cfg.fit_shadow < 4:
        raise SystemExit(f"--fit_shadow={cfg.fit_shadow}: expected 0 (all) or 4 to n_shadow "
                         f"({cfg.n_shadow}) subsets")
    for key in ("random_clients", "gt_mixup", "gt_noise_copies"):
        if getattr(cfg, key) < 0:
            raise SystemExit(f"--{key}={getattr(cfg, key)}: expected 0 or more")
    for key in ("group_size", "n_shadow", "n_snapshots", "n_train", "n_test", "ft_steps",
                "shadow_dp_draws"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"--{key}={getattr(cfg, key)}: expected a positive integer")
    if cfg.answer_null_runs < 2:
        raise SystemExit(f"--answer_null_runs={cfg.answer_null_runs}: expected 2 or more (the "
                         "answer test needs the spread of the noise-only uploads)")
    if cfg.snapshot_gap * (cfg.n_snapshots - 1) >= cfg.ft_steps:
        raise SystemExit(f"snapshots reach before step 1: expected snapshot_gap * (n_snapshots - "
                         "1) < ft_steps")
    if cfg.dp_epsilon > 0 and cfg.shadow_dp_draws < cfg.group_size:
        raise SystemExit(f"--shadow_dp_draws={cfg.shadow_dp_draws} < "
                         f"--group_size={cfg.group_size}: the map for a group's mean upload is "
                         "trained on means of group_size DP draws per shadow subset")


# -----------------------------------------------------------------------------
# what the settings publish: the fine-tuning recipe every party follows, the noise it needs for
# the clients' (epsilon, delta), and the device a run picks


def recipe(cfg, private=False):
    """The published fine-tuning recipe; private=True gives the clients' DP-SGD recipe."""
    sigma = noise_multiplier(cfg) if private and cfg.dp_mechanism == "sgd" else 0.0
    return tinylm.Recipe(cfg.ft_steps, cfg.ft_batch, cfg.ft_lr, sigma or 0.0, cfg.dp_clip,
                         sample_rate(cfg))


def sample_rate(cfg):
    """DP-SGD's Poisson rate q: --dp_sample_rate, or by default q = B / N (B = ft_batch, N =
    n_train), so a step costs the same whatever the client's size. The recipe keeps B and its T =
    ft_steps steps, and the accountant then needs sigma ~ q sqrt(T) / epsilon: the noise in the
    final update, relative to its signal, falls roughly like 1 / (N epsilon) -- a client with more
    records buys the same utility at a smaller epsilon."""
    return cfg.dp_sample_rate or min(1.0, cfg.ft_batch / cfg.n_train)


def noise_multiplier(cfg):
    """DP-SGD's sigma, or output perturbation's noise std, for the clients' (epsilon, delta); None:
    no DP."""
    if cfg.dp_epsilon <= 0:
        return None
    return dp.calibrate(cfg.dp_mechanism, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip,
                        sample_rate(cfg), cfg.ft_steps)


def check_switches(device, *, compile, dtype):
    """Refuse a --compile / --dtype the device cannot run, saying what to use instead: on MPS
    torch.compile and float16's grad scaler are not supported here; on a CPU, compiling needs a
    C++ compiler (Inductor writes C++)."""
    kind = torch.device(device).type
    if kind == "mps" and compile:
        raise SystemExit("--compile=True with --device=mps: torch.compile is not supported on MPS "
                         "here; expected --compile=False (bfloat16 works: --dtype=bfloat16)")
    if kind == "mps" and dtype == "float16":
        raise SystemExit("--dtype=float16 with --device=mps: its grad scaler is not supported on "
                         "MPS; expected --dtype=bfloat16 or float32")
    if kind == "cpu" and compile and not cpp_compiler():
        raise SystemExit("--compile=True on a CPU: torch.compile needs a C++ compiler and none "
                         "was found (set $CXX, or install g++); expected --compile=False")


def cpp_compiler():
    """The C++ compiler Inductor would use on a CPU ($CXX, else c++ / g++ / clang++), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    found = [shutil.which(name) for name in names]
    return next((path for path in found if path), None)


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"
