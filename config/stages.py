"""
config/stages.py -- where each stage of a run keeps its output: a file in --cache whose name hashes
the stage's settings, the files of the stages it reads and a fingerprint of the data it is given,
so it cannot go stale. train.py reads a stage from there when it exists and writes it atomically
(a temp file, then a rename) when it does not; a long stage saves its progress and resumes. Its
fine-tunes run in chunks shared by worker processes: config/pool.py.
"""
import contextlib
import hashlib
import json
import os
import time

import torch
from tqdm import tqdm

import data
import gradtx
import tinylm
from config import dist as distributed
from config.presets import CHECK_PROMPTS, CHOICE_EXAMPLES, RIDGE_LAMBDAS, SELECTION, SUBSPACE_SIZES

WEAK = "w2s w2s_conf vissup kd"   # the weak baselines a references stage holds

# the settings each stage's output depends on
TINY_KEYS = ("task", "seed", "tiny_model", "pretrain_steps_tiny", "pretrain_batch",
             "pretrain_lr_tiny")
LLM_KEYS = ("task", "seed", "llm_model", "pretrain_steps_llm", "pretrain_batch", "pretrain_lr_llm")
FINETUNE_KEYS = ("lora_rank", "lora_alpha", "lora_seed", "ft_steps", "ft_batch", "ft_lr", "n_train",
                 "batch_runs")
SHADOW_KEYS = FINETUNE_KEYS + ("n_shadow", "n_snapshots", "snapshot_gap", "shadow_alpha",
                               "shadow_near_mean")
DP_KEYS = ("dp_epsilon", "dp_delta", "dp_mechanism", "dp_clip", "dp_sample_rate")
SHADOW_DP_KEYS = SHADOW_KEYS + DP_KEYS + ("shadow_dp_draws", "shadow_dp_fresh")
NULL_KEYS = FINETUNE_KEYS + DP_KEYS + ("answer_null_runs",)
FIT_KEYS = ("gt_d_model", "gt_layers", "gt_heads", "gt_dropout", "gt_weight_decay", "gt_lr",
            "gt_steps", "gt_batch", "gt_eval_every", "gt_normalize", "gt_project", "gt_skip",
            "gt_gate", "gt_init", "gt_select", "val_frac", "val_examples", "fit_shadow",
            "gt_select_folds", "gt_select_rule", "gt_select_draws", "batch_runs", "gt_mixup",
            "gt_noise_copies")
# who holds what, and the shared recipe
CLIENT_DATA_KEYS = FINETUNE_KEYS + ("group_size", "skew", "n_test", "random_clients")
CLIENT_KEYS = CLIENT_DATA_KEYS + DP_KEYS


def stage_paths(cfg, task, levels=(1,), device="cpu"):
    """{stage: file} for this configuration. Each key hashes the stage's settings, the files of the
    stages it reads and a fingerprint of the data it is given: it cannot go stale. A GPU's float
    kernels give other numbers than a CPU's, so a CUDA- or MPS-made stage gets a file of its own
    (the device type joins the key when it is not "cpu"; so does `numerics`)."""
    made_on = [] if torch.device(device).type == "cpu" else [torch.device(device).type]
    made_on += numerics(cfg, device)

    def path(stage, keys, *inputs):   # an input stage counts by its file name: a cache can be moved
        inputs = [os.path.basename(i) if isinstance(i, str) else i for i in inputs]
        blob = json.dumps([stage, {k: getattr(cfg, k) for k in keys}, inputs] + made_on,
                          sort_keys=True)
        return os.path.join(cfg.cache or cfg.out,
                            f"{stage}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}.pt")
    shadow_data = data.digest(e for k in range(cfg.n_shadow)
                              for e in task.shadow_subset(k, cfg.n_train, cfg.shadow_alpha,
                                                          cfg.shadow_near_mean).examples)
    client_data = data.digest(e
                              for c in task.clients(cfg.n_train, cfg.n_test, cfg.group_size,
                                                    cfg.skew, cfg.random_clients)
                              for e in c["train"] + c["test"])
    p = {"pretrain_tiny": path("pretrain_tiny", TINY_KEYS, task.fingerprint()),
         "pretrain_llm": path("pretrain_llm", LLM_KEYS, task.fingerprint())}
    p["shadow"] = path("shadow", SHADOW_KEYS, p["pretrain_tiny"], p["pretrain_llm"], shadow_data)
    inputs = p["shadow"]
    if cfg.dp_epsilon > 0:
        p["shadow_dp"] = inputs = path("shadow_dp", SHADOW_DP_KEYS, p["shadow"])
    if answer_test_runs(cfg, task):   # the answer test's noise-only uploads, from public records
        null_data = data.digest(e for i in range(cfg.answer_null_runs)
                                for e in data.null_examples(cfg, task, i))
        p["shadow_null"] = path("shadow_null", NULL_KEYS, p["pretrain_tiny"], null_data)
    for m in levels:   # one translator per noise level: inputs that average m uploads
        p[f"fit_{m}"] = path("fit", FIT_KEYS, inputs, m, SUBSPACE_SIZES, RIDGE_LAMBDAS,
                             SELECTION)
        if cfg.dp_epsilon > 0 and cfg.gt_choose:   # the provider's choice, from the fit's runs
            p[f"choice_{m}"] = path("choice", ("choice_budget",), p[f"fit_{m}"], CHOICE_EXAMPLES,
                                    gradtx.CANDIDATES, gradtx.CHECKED, CHECK_PROMPTS)
    p["clients"] = path("clients", CLIENT_KEYS, p["pretrain_tiny"], client_data)
    # llm_ft reads only the clients' data; the weak baselines also read their uploads (the clients
    # stage)
    p["references"] = path("references", CLIENT_DATA_KEYS + ("seed", "weak_baselines"), WEAK,
                           p["pretrain_llm"], p["clients"] if cfg.weak_baselines else client_data)
    return p


def answer_test_runs(cfg, task):
    """Whether this configuration's provider runs the answer test (gradtx.answer_test): DP uploads,
    the provider's choice and the test switched on, and a task with conventions to read."""
    return (cfg.dp_epsilon > 0 and cfg.gt_choose and cfg.gt_answer_test
            and bool(getattr(task, "conventions", None)))


def numerics(cfg, device):
    """What joins every stage's key besides the device type where the arithmetic changes: TF32 on
    CUDA, --dtype other than float32, --compile (another round-off). Empty for a float32 eager run
    on a CPU or MPS: its keys are as they were before these switches."""
    extra = ["tf32"] if torch.device(device).type == "cuda" else []
    if cfg.dtype != "float32":
        extra.append(f"dtype={cfg.dtype}")
    if cfg.compile:
        extra.append("compile")
    return extra


def load_stage(path, load=None):
    """load(path) of a finished stage's file, or None: not made yet, or unreadable. By default
    torch.load, of tensors and plain values only (what stage files hold). A file cut short (a full
    disk, an interrupted copy) is reported in one line and moved aside to <path>.unreadable, and
    the stage that made it runs again."""
    if not os.path.exists(path):
        return None
    try:
        return load(path) if load else torch.load(path, weights_only=True)
    except Exception as e:   # torch's own error names no file; ours names it, in one line
        cause = e.__cause__ or e
        reason = f"{type(cause).__name__}: {str(cause).strip()}".splitlines()[0].split(". ")[0]
        print(f"cache: {path} is unreadable ({reason}): recomputing it", flush=True)
        os.replace(path, path + ".unreadable")
        return None


def record_seconds(cfg, path, seconds):
    """Compute time of a finished stage, kept beside the cache in timing.json: read, added to and
    replaced by one process at a time (the ranks of a torchrun sweep share it)."""
    timing_path = os.path.join(cfg.cache or cfg.out, "timing.json")
    with locked(timing_path + ".lock"):
        timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
        timing[os.path.basename(path)] = seconds
        with open(f"{timing_path}.{os.getpid()}.tmp", "w") as f:
            json.dump(timing, f, indent=1)
        os.replace(f"{timing_path}.{os.getpid()}.tmp", timing_path)


@contextlib.contextmanager
def locked(lock, stale=30.0):
    """Hold the lock file `lock` (created exclusively) for the block; one older than `stale`
    seconds was left by a process that died, and is taken over."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL)
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):   # (its holder may let go meanwhile)
                if time.time() - os.path.getmtime(lock) > stale:
                    os.remove(lock)
            time.sleep(0.05)
    try:
        yield
    finally:
        os.close(fd)
        os.remove(lock)


def stage_seconds(cfg, paths):
    """{pretrain, shadow, fit, clients, references}: seconds each stage of this configuration
    took."""
    timing_path = os.path.join(cfg.cache or cfg.out, "timing.json")
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
    return {stage: sum(timing.get(os.path.basename(p), 0.0)
                       for s, p in paths.items() if s.startswith(stage))
            for stage in ("pretrain", "shadow", "fit", "clients", "references")}


def run_stage(cfg, path, desc, items, compute, ranks=None):
    """The results of compute(items) -> an iterator of one result per item, saved every few items
    so an interrupted stage resumes where it stopped; the finished list is saved atomically at
    `path`, and read from there when it exists. Under torchrun (ranks, config/dist.py) rank 0 reads
    and writes the files, and hands what it read to every rank."""
    if ranks is None:
        state = stage_state(path)
    else:
        state = distributed.from_rank0(ranks, lambda: stage_state(path), desc)
    if state["finished"]:
        return state["results"]
    writes = ranks is None or ranks.rank == 0
    partial = path.replace(".pt", ".partial.pt")
    t0 = time.time() - state["seconds"]   # a resumed stage counts the time it took before
    todo = items[len(state["results"]):]
    for i, result in enumerate(tqdm(compute(todo), desc=desc, leave=False, disable=not writes,
                                    initial=len(state["results"]), total=len(items))):
        state["results"].append(result)
        if writes and (i + 1) % 8 == 0:
            state["seconds"] = time.time() - t0
            tinylm.atomic_save(state, partial)
    if writes:
        tinylm.atomic_save({"results": state["results"], "seconds": time.time() - t0}, path)
        record_seconds(cfg, path, time.time() - t0)
        if os.path.exists(partial):
            os.remove(partial)
    return state["results"]


def stage_state(path):
    """A stage's progress: {"results", "seconds", "finished"}, from its file when finished, else
    from its partial file, else empty."""
    if (done := load_stage(path)) is not None:
        return dict(done, finished=True)
    partial = load_stage(path.replace(".pt", ".partial.pt")) or {"results": [], "seconds": 0.0}
    return dict(partial, finished=False)
