"""
train.py -- the whole Grad-Transformer protocol, stage by stage, cached on disk.

    python train.py                     # default (cpu) preset: the whole protocol on a laptop CPU
    python train.py --preset smoke      # a tiny run of every stage, under a minute
    python train.py --dp_epsilon=1      # clients fine-tune with DP-SGD at epsilon = 1 (delta 1e-5)
    python train.py --n_train=8192 --dp_epsilon=0.1   # the paper's regime: 8k-record clients
    python train.py --help              # every option (config/presets.py: each default and why)

Experiments run this protocol many times (experiments/: sweeps, the text task, the audit).

Stages (each writes its output atomically into --cache, default --out, and is skipped when there):
  1. pretrain    both public base models (TinyLM and LLM) on the task's public pretraining data
  2. shadow      the provider fine-tunes BOTH models on K shadow subsets of public data and records
                 S snapshots of both update vectors along the tail of each run: the training pairs
  2b. shadow_dp  with DP: R more TinyLM runs per subset made with the clients' published DP recipe,
                 and the answer test's noise-only uploads: the same recipe on public records that
                 follow the task mixture (no convention of their own)
  3. fit         per noise level, the linear map (public subspace + ridge) and the Grad-Transformer
                 (with DP it also learns from pairs between the shadow runs: mixed conventions)
  4. clients     each client fine-tunes its TinyLM on its private data (with DP if asked) and
                 uploads only its update vector; the LLM fine-tunes it is compared with
  5. eval        the provider translates each upload (and each group's mean upload); eval.py scores
                 it against the baselines and writes results.json
The stages that fine-tune (1, 2, 2b, 4) run first, so that the ranks of a torchrun job share them
(config/dist.py); then one process fits and evaluates. `torchrun --nproc_per_node=N train.py ...`
takes the same options.
A stage's cache key covers its settings, the keys of the stages it reads, and a fingerprint of the
data it is given, so a change of either re-runs it and everything after it, and nothing else.
"""
import functools
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import torch

import data
import dp
import eval as evaluation
import gradtx
import tinylm
from config import dist as distributed   # torchrun: ranks that share pretraining and fine-tunes
from config import pool     # worker processes that share a stage's fine-tunes
from config import stages   # where each stage's output is cached
from config.presets import (ANSWER_PROMPTS, CHECK_PROMPTS, CHOICE_EXAMPLES, MODEL_PRESETS,
                            RIDGE_LAMBDAS, SIGNAL_DIRECTIONS, SUBSPACE_SIZES, Config,
                            check_switches, noise_multiplier, parse_args, pick_device, recipe,
                            sample_rate)


# -----------------------------------------------------------------------------
# the protocol: five stages, each cached (the stages follow in order)


def run(cfg, task=None, ranks=None):
    """The protocol end to end for one configuration; returns results.json's contents. task: a
    task object built elsewhere (experiments/text.py); by default cfg.task's from data.py. ranks:
    this process's place in a torchrun job (config/dist.py), None for one process. The stages
    that fine-tune come first (all ranks share them), then rank 0 alone fits and evaluates; the
    other ranks return None."""
    t_start = time.time()
    device = setup(cfg, ranks)
    log(ranks, f"gradtx: preset {cfg.preset}, task {cfg.task}, seed {cfg.seed}, device {device}, "
        f"out {cfg.out}" + (f", rank 0 of {ranks.world}" if ranks else ""))
    if ranks is None or ranks.rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    task = task or load_task(cfg)
    paths = stages.stage_paths(cfg, task, pool_levels(cfg), device)
    tiny, llm = base_models(cfg, task, paths, device, ranks)
    shadow = shadow_stages(cfg, task, tiny, llm, paths, device, ranks)
    clients = clients_stage(cfg, task, tiny, llm, paths, device, ranks)
    if ranks is not None and ranks.rank > 0:
        return None
    distributed.take_idle_threads(ranks)
    mean_shadow = mean_shadow_update(cfg, shadow)
    translators = {}
    choices = {}
    tests = {}   # with DP: the answer test's calibration at each level
    for m in pool_levels(cfg):   # a translator per noise level: inputs that average m uploads
        translators[m] = fit_stage(cfg, task, tiny, llm, shadow, paths[f"fit_{m}"], m)
        if f"choice_{m}" in paths:   # with DP: what the provider sends, translation or fallback
            choices[m] = choice_stage(cfg, task, tiny, llm, shadow, translators[m], mean_shadow,
                                      paths[f"choice_{m}"], m)
            if cfg.gt_answer_test:
                tests[m] = answer_test_stage(cfg, task, tiny, llm, shadow, mean_shadow, m)
    results = evaluation.evaluate(cfg, task, tiny, llm, translators=translators, choices=choices,
                                  answer_tests=tests,
                                  mean_shadow=mean_shadow, clients=clients, recipe=recipe(cfg),
                                  stage_seconds=stages.stage_seconds(cfg, paths),
                                  privacy=privacy_record(cfg, translators))
    results["timing_s"]["this_run_total"] = time.time() - t_start
    return results


def shared_stages(cfg, ranks, *, skip=(), task=None):
    """A sweep's shared stages for one of its points under torchrun: both base models and the
    clean shadow runs, made by all ranks together (their cache holds them for the points that
    follow), unless the shadow stage's file is in `skip`; returns that file."""
    device = setup(cfg, ranks)
    task = task or load_task(cfg)
    paths = stages.stage_paths(cfg, task, pool_levels(cfg), device)
    if paths["shadow"] not in skip:
        tiny, llm = base_models(cfg, task, paths, device, ranks)
        shadow_stages(replace(cfg, dp_epsilon=0.0), task, tiny, llm, paths, device, ranks)
    return paths["shadow"]


def privacy_record(cfg, translators):
    """results.json's "privacy": the clients' (epsilon, delta), their mechanism and its noise, the
    recipe's clip, sample rate and steps, and the public subspace each translator's map chose."""
    private = cfg.dp_epsilon > 0
    return {"epsilon": cfg.dp_epsilon if private else None, "delta": cfg.dp_delta,
            "mechanism": cfg.dp_mechanism if private else None,
            "noise_multiplier": noise_multiplier(cfg) or 0.0, "clip": cfg.dp_clip,
            "sample_rate": sample_rate(cfg), "steps": cfg.ft_steps,
            "subspace_k": {m: t.log["k"] for m, t in translators.items()}}


def log(ranks, line):
    """Print a stage's line: in one process, or on rank 0 of a torchrun job."""
    if ranks is None or ranks.rank == 0:
        print(line, flush=True)


def setup(cfg, ranks=None):
    """The device (picked at run time; under torchrun a GPU rank's own cuda:LOCAL_RANK), threads
    and output folders of a run."""
    device = distributed.device_of(ranks, pick_device(cfg.device))
    if torch.device(device).type == "cuda":
        # the same numbers from run to run; cuBLAS reads its setting when it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # TF32 matmuls (nanoGPT's): float32 inputs, 10-bit mantissa products; set here, at run
        # time on CUDA, never at import
        torch.backends.cuda.matmul.allow_tf32 = True
    check_switches(device, compile=cfg.compile, dtype=cfg.dtype)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    for folder in (cfg.out, cfg.cache or cfg.out):
        os.makedirs(folder, exist_ok=True)
    return device


def load_task(cfg):
    """cfg.task's task from data.py (experiments/text.py builds the text task, passed to `run`)."""
    if cfg.task != "arith":
        raise SystemExit(f"--task={cfg.task}: the text task runs from its own command: "
                         "python experiments/text.py (--help for its options)")
    return data.make_task(cfg.task, cfg.seed)


# -----------------------------------------------------------------------------
# stage 1: pretraining the public base models


def base_models(cfg, task, paths, device, ranks=None):
    """Both base models with LoRA attached (TinyLM, LLM), pretraining (and caching) whichever is
    missing."""
    tiny = base_model(cfg, task, "tiny", paths["pretrain_tiny"], device, ranks)
    llm = base_model(cfg, task, "llm", paths["pretrain_llm"], device, ranks)
    return tiny, llm


def base_model(cfg, task, who, path, device, ranks=None):
    """One public base model, who = "tiny" or "llm", with LoRA attached: read from its cached
    checkpoint at `path`, or pretrained now and cached there."""
    model = cached_model(path, device, ranks)
    if model is None:
        pretrain_base(cfg, task, who, path, device, ranks)
        model = cached_model(path, device, ranks)   # from the file, as a later run gets it
    return tinylm.add_lora(model.eval(), cfg.lora_rank, cfg.lora_alpha, cfg.lora_seed)


def cached_model(path, device, ranks):
    """The checkpoint at `path` as a model on `device`, or None when there is none. Under torchrun
    rank 0 reads the file and hands its bytes to every rank (only rank 0 needs the cache's disk)."""
    if ranks is None:
        return stages.load_stage(path, lambda path: tinylm.load_model(path, device))

    def checked_bytes(path):   # a file that loads, as bytes
        tinylm.load_model(path)
        with open(path, "rb") as f:
            return f.read()
    blob = distributed.from_rank0(ranks, lambda: stages.load_stage(path, checked_bytes),
                                  f"read {os.path.basename(path)}")
    return None if blob is None else tinylm.load_model(io.BytesIO(blob), device)


def pretrain_base(cfg, task, who, path, device, ranks=None):
    """Pretrain base model `who` on the task's public data with its own settings (cfg.tiny_model,
    cfg.pretrain_steps_tiny, cfg.pretrain_lr_tiny, or the llm ones) and seed; save it at `path`.
    Under torchrun on GPUs or several machines every rank trains (data-parallel) and rank 0 saves;
    on one CPU machine rank 0 trains alone with every rank's threads, the others wait for it."""
    if ranks is not None and not distributed.data_parallel(ranks, device):
        if ranks.rank == 0:
            with distributed.all_threads(ranks):
                distributed.guarded(ranks, f"pretrain {who}",
                                    lambda: pretrain_base(cfg, task, who, path, device))
        distributed.barrier(ranks, f"pretrain {who}")
        return
    t0 = time.time()
    size = getattr(cfg, f"{who}_model")
    steps = getattr(cfg, f"pretrain_steps_{who}")
    seed = cfg.seed + (0 if who == "tiny" else 1)
    shape = replace(MODEL_PRESETS[size], vocab_size=task.enc.n_vocab, block_size=task.block_size)
    # the public data's batches, every step's drawn up front
    indices = task.pretrain_draws(cfg.pretrain_batch, steps, data.stream(seed, "pretrain batches"),
                                  device)
    model = tinylm.pretrain(shape, task.pretrain_rows, indices,
                            lr=getattr(cfg, f"pretrain_lr_{who}"), seed=seed, device=device,
                            desc=f"pretrain {who}", compile=cfg.compile, dtype=cfg.dtype,
                            ranks=ranks)
    if ranks is not None and ranks.rank > 0:
        return
    tinylm.save_model(model, path)
    stages.record_seconds(cfg, path, time.time() - t0)
    print(f"pretrain  : {who} ({size}), {sum(p.numel() for p in model.parameters()):,} "
          f"params, {steps} steps, {time.time() - t0:.1f}s -> {path}", flush=True)


# -----------------------------------------------------------------------------
# stage 2: shadow curation -- (TinyLM update, LLM update) pairs from public data


def shadow_runs(worker, ks):
    """Shadow runs ks: both models fine-tuned on each subset k from the same LoRA init and the same
    batch order (same seed); the snapshots at the same steps form the pairs. [(TinyLM snapshots
    (S, ...), LLM snapshots (S, ...))], one per k. Runs in a worker (a `Worker`)."""
    cfg = worker.cfg
    datasets = [worker.task.encode(data.shadow_examples(cfg, worker.task, k)) for k in ks]
    seeds = [data.run_seed(cfg.seed, "shadow run", k) for k in ks]
    steps = [cfg.ft_steps - i * cfg.snapshot_gap for i in reversed(range(cfg.n_snapshots))]  # S
    tiny = fine_tunes(cfg, worker.tiny, datasets, recipe(cfg), seeds, steps)
    llm = fine_tunes(cfg, worker.llm, datasets, recipe(cfg), seeds, steps)
    return [(torch.stack(x), torch.stack(y)) for x, y in zip(tiny, llm)]


def shadow_dp_runs(worker, items):
    """Draws r of shadow subsets k, items [(k, r)]: the TinyLM fine-tuned with the clients' own DP
    recipe on the subset's records (with shadow_dp_fresh, on fresh records of its mixture per draw,
    as each client holds records of its own). The final update of each."""
    cfg = worker.cfg
    datasets = []
    for k, r in items:
        draw = r if cfg.shadow_dp_fresh else None
        datasets.append(worker.task.encode(data.shadow_examples(cfg, worker.task, k, draw)))
    seeds = [data.run_seed(cfg.seed, "shadow DP draw", k, r) for k, r in items]
    runs = fine_tunes(cfg, worker.tiny, datasets, recipe(cfg, private=True), seeds)
    return [run[-1] for run in runs]


def null_runs(worker, items):
    """Noise-only uploads i, items [i]: the TinyLM fine-tuned as a client fine-tunes it (the DP
    recipe, or the clean one plus output perturbation) on public records that follow the task
    mixture (data.null_examples): what a client whose data holds no convention of its own uploads,
    the answer test's null (answer_test_stage). The final update of each."""
    cfg = worker.cfg
    datasets = [worker.task.encode(data.null_examples(cfg, worker.task, i)) for i in items]
    seeds = [data.run_seed(cfg.seed, "null run", i) for i in items]
    return private_updates(cfg, worker.tiny, datasets, seeds)


def shadow_stages(cfg, task, tiny, llm, paths, device, ranks=None):
    """{"X": (K, S, ...) clean TinyLM snapshots, "Y": (K, S, ...) LLM snapshots,
    "X_private": (K, R, ...) final TinyLM updates made as the clients make theirs (DP only),
    "X_null": (answer_null_runs, ...) the answer test's noise-only uploads (where it runs)}."""
    t0 = time.time()
    worker = Worker(cfg, task, tiny, llm)
    runs = run_stage(shadow_runs, list(range(cfg.n_shadow)), worker=worker, path=paths["shadow"],
                     desc="shadow runs", paths=paths, device=device, ranks=ranks)
    shadow = {"X": torch.stack([x for x, _ in runs]), "Y": torch.stack([y for _, y in runs])}
    log(ranks, f"shadow    : {cfg.n_shadow} runs x {cfg.n_snapshots} snapshots = "
        f"{cfg.n_shadow * cfg.n_snapshots} pairs, {time.time() - t0:.1f}s -> {paths['shadow']}")
    if cfg.dp_epsilon > 0:   # the clients' uploads are DP: the provider makes DP draws too
        t0 = time.time()
        items = [(k, r) for k in range(cfg.n_shadow) for r in range(cfg.shadow_dp_draws)]
        if cfg.dp_mechanism == "output":   # the clean run's final update, plus noise
            draws = [perturb(cfg, shadow["X"][k, -1],
                             data.run_seed(cfg.seed, "shadow DP draw", k, r)) for k, r in items]
        else:
            draws = run_stage(shadow_dp_runs, items, worker=worker, path=paths["shadow_dp"],
                              desc="shadow DP draws", paths=paths, device=device, ranks=ranks)
        shadow["X_private"] = torch.stack(draws).view(cfg.n_shadow, cfg.shadow_dp_draws,
                                                      *draws[0].shape)
        log(ranks, f"shadow_dp : {len(items)} TinyLM runs with the clients' DP recipe "
            f"({cfg.dp_mechanism}, eps={cfg.dp_epsilon}), {time.time() - t0:.1f}s -> "
            f"{paths['shadow_dp']}")
    if "shadow_null" in paths and cfg.dp_epsilon > 0:
        t0 = time.time()
        runs = run_stage(null_runs, list(range(cfg.answer_null_runs)), worker=worker,
                         path=paths["shadow_null"], desc="noise-only uploads", paths=paths,
                         device=device, ranks=ranks)
        shadow["X_null"] = torch.stack(runs)
        log(ranks, f"shadow_null: {len(runs)} TinyLM runs with the clients' DP recipe on public "
            f"records of the task mixture, {time.time() - t0:.1f}s -> {paths['shadow_null']}")
    return shadow


# -----------------------------------------------------------------------------
# stage 3: per noise level, the linear map and the Grad-Transformer, selected on held-out RUNS


def pool_levels(cfg):
    """Noise levels that need their own translator: 1 (one upload) and, for groups, 2, 4, ..., M."""
    if cfg.dp_epsilon <= 0 or cfg.group_size == 1:
        return (1,)
    return evaluation.pool_sizes(cfg.group_size)


def fit_runs(cfg):
    """(train, validation) shadow runs of a configuration's fit: the first fit_shadow of the
    n_shadow curated subsets (all of them by default), split by run."""
    return data.split_runs(cfg.fit_shadow or cfg.n_shadow, cfg.val_frac, cfg.seed)


def mean_shadow_update(cfg, shadow):
    """The mean LLM update of the shadow runs the maps fit on (n_tgt, d_tgt): what the provider
    sends without reading any upload."""
    return shadow["Y"][fit_runs(cfg)[0]].flatten(0, 1).mean(0)


def functional_criterion(llm, data_sets, measure="loss"):
    """f(pred_updates, runs) = (len(runs),) the LLM's loss on each run's own shadow data (x, y,
    mask) in data_sets with that run's predicted update applied; lower is better, and its mean is
    the score (selection in parameter space keeps a translator that still sits at the mean update).
    pred_updates (runs, D, ...): D inputs per run, input j scored on the run's examples j, j + D,
    ..., the run scored by their mean. measure="exact_match" scores 1 - the share of examples
    answered exactly right: the loss rewards hedging towards the mean update, this does not."""
    def criterion(pred_updates, runs):
        pred = torch.as_tensor(pred_updates)
        D = 1 if pred.dim() == 3 else pred.shape[1]                   # inputs per run
        pred = pred.reshape(-1, *pred.shape[-2:])                     # (runs * D, n_layer, dim)
        sets = [[t[j::D] for t in data_sets[r]] for r in runs for j in range(D)]
        if measure == "loss":   # every (update, examples) pair in batched forwards
            values = tinylm.loss_of_updates(llm, pred, sets).numpy()
        else:
            # the code's own predictions: no NaN check (a host sync) per update
            values = np.array([1.0 - evaluation.exact_match_of(
                tinylm.set_update(llm, u, check_finite=False), *s) for u, s in zip(pred, sets)])
        return values.reshape(len(runs), D).mean(1)
    return criterion


def fit_stage(cfg, task, tiny, llm, shadow, path, m):
    """The linear map and the Grad-Transformer on top of it for inputs that average m uploads:
    loaded from `path` when cached, else fitted (`fit_translator`) and saved."""
    shapes = [tinylm.update_shape(model.cfg, cfg.lora_rank) for model in (tiny, llm)]
    model = stages.load_stage(path, lambda path: gradtx.load(path, *shapes, llm.wte.weight.device))
    log = stages.load_stage(path + ".log") if model is not None else None
    if log is not None:
        return gradtx.Translator(model, log)
    translator = fit_translator(cfg, task, llm, shadow, m)
    tinylm.atomic_save(translator.log, path + ".log")
    gradtx.save(translator.model, path)  # last: its presence marks the stage done
    stages.record_seconds(cfg, path, translator.log["seconds"])
    return translator


def fit_translator(cfg, task, llm, shadow, m):
    """Choose the linear map (public subspace k and ridge lambda) by the functional criterion on
    held-out runs, then train the Grad-Transformer with it as its skip path. Its log keeps the
    selection, the losses and the linear map itself (the `ridge` baseline)."""
    t0 = time.time()
    private = cfg.dp_epsilon > 0   # the clients' uploads are DP: noisy, and so are the inputs here
    n_runs = cfg.fit_shadow or cfg.n_shadow
    folds = data.split_runs(n_runs, cfg.val_frac, cfg.seed, cfg.gt_select_folds)
    folds = folds if cfg.gt_select_folds > 1 else [folds]
    train_runs, val_runs = folds[0]
    X_all, Y_all = data.translator_inputs(cfg, shadow, list(range(n_runs)), m, private)
    examples = [data.shadow_examples(cfg, task, k)[:cfg.val_examples] for k in range(n_runs)]
    criterion = functional_criterion(llm, [task.encode(e) for e in examples], cfg.gt_select)
    rule, draws = selection_rule(cfg, private, X_all.shape[1])
    linear = gradtx.select_linear_map(shadow["X"][:n_runs], X_all, Y_all, criterion, folds,
                                      ks=SUBSPACE_SIZES if cfg.gt_project else (0,),
                                      lams=RIDGE_LAMBDAS, rule=rule, draws=draws)
    linear_seconds = time.time() - t0
    pairs = translator_pairs(cfg, shadow, X_all, Y_all, train_runs, m, private)
    model = new_translator(cfg, pairs, linear, llm.wte.weight.device)
    X_val = X_all[val_runs, -1]                                              # one per run
    Y_val = Y_all[val_runs, -1]
    fitted = gradtx.fit(model, pairs.X, pairs.Y, X_val, Y_val, steps=cfg.gt_steps, lr=cfg.gt_lr,
                        weight_decay=cfg.gt_weight_decay, batch_size=cfg.gt_batch,
                        eval_every=cfg.gt_eval_every,
                        val_criterion=functools.partial(criterion, runs=val_runs), seed=cfg.seed,
                        compile=cfg.compile, dtype=cfg.dtype)
    log = fit_log(fitted, linear, pairs, criterion, Y_all[train_runs].flatten(0, 1), Y_val,
                  val_runs, rule=rule, draws=draws, level=m)
    log.update(linear_seconds=linear_seconds, seconds=time.time() - t0)
    print_fit(log, m, pairs.n_shadow_pairs, len(train_runs), len(val_runs))
    return gradtx.Translator(model, log)


def selection_rule(cfg, private, n_inputs):
    """How the linear map is chosen: the rule ("auto": the lowest mean with DP, where the gate
    already shrinks noisy uploads, else the simplest within one SE) and how many of a held-out
    run's inputs score it (with DP and gt_select_draws, all n_inputs of its uploads; else one)."""
    rule = cfg.gt_select_rule
    if rule == "auto":
        rule = "best" if private else "one_se"
    draws = n_inputs if private and cfg.gt_select_draws else 1
    return rule, draws


class Pairs(NamedTuple):
    """What the Grad-Transformer learns from: pairs X (N, n_src, d_src) -> Y (N, n_tgt, d_tgt),
    the first n_shadow_pairs of them the shadow pairs of the train runs (with DP, data.extra_pairs
    follow); with DP, the do-no-harm gate and the upload signal (else None)."""
    X: torch.Tensor
    Y: torch.Tensor
    n_shadow_pairs: int
    gate: dict
    signal: list


def translator_pairs(cfg, shadow, X_all, Y_all, train_runs, m, private):
    """The train runs' shadow pairs; with DP also the pairs between runs and with fresh noise
    (data.extra_pairs), the gate fit on the noisy inputs and how much of them is signal."""
    X_train = X_all[train_runs].flatten(0, 1)
    Y_train = Y_all[train_runs].flatten(0, 1)
    if not private:
        return Pairs(X_train, Y_train, len(X_train), None, None)
    X_clean = shadow["X"][train_runs].flatten(0, 1)   # the public subspace: clean updates only
    top = gradtx.public_basis(X_clean, SIGNAL_DIRECTIONS)
    noise = data.dp_noise(cfg, shadow, train_runs, m)
    signal = gradtx.upload_signal(shadow["X"][train_runs, -1], X_all[train_runs], top).tolist()
    gate = gradtx.fit_gate(X_train, noise, top, Y_train.mean(0)) if cfg.gt_gate else None
    extra = data.extra_pairs(cfg, X_all[train_runs], Y_all[train_runs, -1], noise)
    return Pairs(torch.cat([X_train, extra.X]), torch.cat([Y_train, extra.Y]), len(X_train), gate,
                 signal)


def new_translator(cfg, pairs, linear, device):
    """A fresh Grad-Transformer for the pairs' shapes, with the linear map (and the gate) in its
    buffers; its init seeded from the config, not from whatever ran before in the process."""
    n_src, d_src = pairs.X.shape[1:]
    n_tgt, d_tgt = pairs.Y.shape[1:]
    gcfg = gradtx.GTConfig(n_src, d_src, n_tgt, d_tgt, d_model=cfg.gt_d_model,
                           n_layer=cfg.gt_layers, n_head=cfg.gt_heads, dropout=cfg.gt_dropout,
                           normalize=cfg.gt_normalize, n_basis=linear.k,
                           n_skip=pairs.n_shadow_pairs if cfg.gt_skip else 0,
                           n_gate=SIGNAL_DIRECTIONS if pairs.gate else 0)
    torch.manual_seed(cfg.seed + cfg.gt_init)
    model = gradtx.GradTransformer(gcfg).to(device)
    gradtx.set_linear_map(model, linear.basis, linear.ridge if cfg.gt_skip else None, pairs.gate)
    return model


def fit_log(fitted, linear, pairs, criterion, Y_train, Y_val, val_runs, *, rule, draws, level):
    """The fit's log: the curve and the kept step, the linear map's selection and the map itself,
    and the held-out loss of the mean shadow update and of the true updates beside them."""
    best = next(h for h in fitted["history"] if h["step"] == fitted["best_step"])
    mean_shadow = Y_train.mean(0).expand(len(val_runs), -1, -1)
    return {"history": fitted["history"], "best_step": best["step"],
            "val_rel_err": best["val_rel_err"], "val_loss": best["criterion"],
            "k": linear.k, "ridge_lambda": linear.lam, "select_rule": rule, "select_draws": draws,
            "ridge_loss": linear.scores[(linear.k, linear.lam)],
            "basis": linear.basis, "ridge": linear.ridge, "upload_signal": pairs.signal,
            "mean_shadow_loss": float(np.mean(criterion(mean_shadow, val_runs))),
            "true_update_loss": float(np.mean(criterion(Y_val, val_runs))), "level": level}


def print_fit(log, m, n_pairs, n_train_runs, n_val_runs):
    """The fit stage's line: what was chosen, and the held-out losses beside the translator's."""
    signal = log["upload_signal"]
    note = "" if signal is None else ", upload signal " + "/".join(f"{c:.2f}" for c in signal)
    print(f"fit m={m}   : {n_pairs} pairs from {n_train_runs} runs, {n_val_runs} val "
          f"runs; subspace k={log['k']}, ridge lambda={log['ridge_lambda']:g}: val loss "
          f"{log['ridge_loss']:.4f}; translator best step {log['best_step']}: "
          f"{log['val_loss']:.4f} (mean shadow {log['mean_shadow_loss']:.4f}, true update "
          f"{log['true_update_loss']:.4f}){note}, {log['seconds']:.1f}s", flush=True)


def choice_stage(cfg, task, tiny, llm, shadow, translator, mean_shadow, path, m):
    """The provider's choice for inputs that average m uploads (gradtx.choose): loaded from `path`
    when cached, else made (`choose_fallback`) and saved."""
    saved = stages.load_stage(path)
    if saved is not None:
        return gradtx.Choice(**saved)
    t0 = time.time()
    choice = choose_fallback(cfg, task, tiny, llm, shadow, translator, mean_shadow, m)
    tinylm.atomic_save(choice._asdict(), path)
    stages.record_seconds(cfg, path, time.time() - t0)
    print(f"choice m={m}: {choice.candidate}, held-out gain {choice.gain:+.3f} over the mean "
          f"update, loss {choice.loss:.3f} (budget {cfg.choice_budget:g}); each candidate's gain "
          f"/ loss: " + ", ".join(f"{c} {g:+.3f} / {loss:.3f}"
                                  for c, (g, loss, _) in choice.scores.items())
          + f", {time.time() - t0:.1f}s", flush=True)
    return choice


def choose_fallback(cfg, task, tiny, llm, shadow, translator, mean_shadow, m):
    """Score every candidate the provider may send (gradtx.CANDIDATES, and the mean update) on the
    translator's held-out shadow runs at the clients' privacy level (`held_out_uploads`), then
    `gradtx.choose`. Shadow runs only: no client's data or upload is read."""
    held = held_out_uploads(cfg, task, llm, shadow, mean_shadow, m)
    check = evaluation.tinylm_check(task, tiny, llm, CHECK_PROMPTS, cfg.seed)
    return choose_on(held, translator, mean_shadow, cfg.choice_budget, check)


def choose_on(held, translator, mean_shadow, budget, check):
    """gradtx.choose among every candidate, each scored on the held-out uploads `held` (`check`:
    the check's, eval.tinylm_check, for the candidate "checked")."""
    model, log = translator
    fallback = mean_shadow.to(held.uploads.device)
    gains = {c: held.gain(gradtx.candidate_update(model, held.uploads, c, log["ridge"], fallback,
                                                  check))
             for c in gradtx.CANDIDATES}
    return gradtx.choose(gains, held.runs, budget)


def answer_test_stage(cfg, task, tiny, llm, shadow, mean_shadow, m):
    """The answer test's calibration for inputs that average m uploads (gradtx.fit_answer_test):
    the answer shifts of the provider's noise-only uploads (shadow["X_null"], `null_runs`: DP
    fine-tunes of public records with no convention of their own, made as the clients make
    theirs), each brought to the noise of a mean of m of them (its distance from their centre
    / sqrt(m)); and its corners (gradtx.convention_corners), from the final LLM updates of the
    shadow runs the maps fit on. Public records only. None for a task without conventions."""
    t0 = time.time()
    answers = evaluation.answer_shifts(task, tiny, llm, mean_shadow, ANSWER_PROMPTS, cfg.seed)
    if answers is None:
        return None
    null = shadow["X_null"]                                                   # (N, n, d)
    centre = null.mean(0)
    train_runs = fit_runs(cfg)[0]
    finals = shadow["Y"][train_runs, -1]                                      # (R, n_tgt, d_tgt)
    corners = gradtx.convention_corners(finals, answers.llm(finals[None])[0])
    corners = corners._replace(runs=[train_runs[r] if r >= 0 else -1 for r in corners.runs])
    test = gradtx.fit_answer_test(answers.tiny(centre + (null - centre) / math.sqrt(m)), corners)
    print(f"answer test m={m}: threshold z {test.threshold:.2f}, for a corner "
          f"{test.corner_threshold:.2f} ({len(null)} noise-only uploads), corners from shadow runs "
          f"{corners.runs}, "
          f"{time.time() - t0:.1f}s", flush=True)
    return test


class HeldOut(NamedTuple):
    """The uploads the provider's choice is scored on, and how."""
    uploads: torch.Tensor     # (U, n_src, d_src) held-out shadow runs' noisy inputs at level m
    runs: np.ndarray          # (U,) which held-out run each came from: 0, 1, ...
    shadow_runs: np.ndarray   # (U,) that run's index among the shadow runs
    gain: Callable            # updates (U, n_tgt, d_tgt) -> (U,) gains over the mean update


def held_out_uploads(cfg, task, llm, shadow, mean_shadow, m, draws=0):
    """The translator's held-out shadow runs at the clients' privacy level: each run's noisy inputs
    (the first `draws` of them; 0: all), and `gain`: the LLM's accuracy with an update for each on
    fresh records of its run's mixture, minus the mean update's (a task scored otherwise: the
    LLM's loss, the mean update's minus the update's)."""
    _, val_runs = fit_runs(cfg)
    X, _ = data.translator_inputs(cfg, shadow, val_runs, m, private=True)      # (runs, P, n, d)
    return held_out_of(cfg, task, llm, mean_shadow, val_runs, X[:, :draws or X.shape[1]])


def held_out_of(cfg, task, llm, mean_shadow, subsets, uploads):
    """HeldOut for the shadow subsets `subsets` and their uploads (runs, draws, n, d): each upload
    scored on CHOICE_EXAMPLES fresh records of its own subset (`held_out_uploads`)."""
    draws = uploads.shape[1]
    uploads = uploads.flatten(0, 1).to(llm.wte.weight.device)
    runs = np.repeat(np.arange(len(subsets)), draws)                        # (runs * draws,)
    held_out = [task.encode(data.held_out_examples(cfg, task, k, CHOICE_EXAMPLES))
                for k in subsets]
    # lower is better: 1 - accuracy (arith), else the LLM's loss (text: bits per byte, scaled)
    error = functional_criterion(llm, held_out,
                                 "exact_match" if task.metric == "accuracy" else "loss")
    fallback = mean_shadow.to(uploads.device)
    baseline = error(fallback.expand(len(uploads), -1, -1), runs)
    return HeldOut(uploads, runs, np.asarray(subsets)[runs],
                   lambda updates: baseline - error(updates, runs))


# -----------------------------------------------------------------------------
# stage 4: clients fine-tune their TinyLM on private data and upload only the update


def client_runs(worker, clients):
    """Clients fine-tune their TinyLM: [(the non-private update: the PGR floor; the upload)]."""
    cfg = worker.cfg
    datasets = [worker.task.encode(c["train"]) for c in clients]
    seeds = [data.run_seed(cfg.seed, "client run", c["index"]) for c in clients]
    floors = [run[-1] for run in fine_tunes(cfg, worker.tiny, datasets, recipe(cfg), seeds)]
    if cfg.dp_epsilon <= 0:
        return list(zip(floors, floors))
    return list(zip(floors, private_updates(cfg, worker.tiny, datasets, seeds, floors)))


def reference_runs(worker, clients):
    """The LLM fine-tunes the clients' results are compared with (eval.reference_sets), each method
    for all clients at once. The weak baselines use the TinyLM the provider could rebuild: the
    upload under DP, else the floor (the random clients, there for do no harm: llm_ft only)."""
    cfg = worker.cfg
    task = worker.task
    llm = worker.llm
    seeds = [data.run_seed(cfg.seed, "client run", c["index"]) for c in clients]
    sets = []
    for c, seed in zip(clients, seeds):
        weak = cfg.weak_baselines and c["kind"] != "random"
        own = (c["upload"] if cfg.dp_epsilon > 0 else c["floor_update"]) if weak else None
        sets.append(evaluation.reference_sets(task, worker.tiny, c["train"], own, seed,
                                              data.stream(cfg.seed, "public examples", c["index"])))
    out = [{} for _ in clients]
    for method in dict.fromkeys(m for s in sets for m in s):
        who = [i for i, s in enumerate(sets) if method in s]
        _, confidence = sets[who[0]][method]   # (examples, the confidence loss's weight)
        datasets = [task.encode(sets[i][method][0]) if sets[i][method][0] else None for i in who]
        t0 = time.perf_counter()
        runs = fine_tunes(cfg, llm, datasets, replace(recipe(cfg), confidence=confidence),
                          [seeds[i] for i in who])
        for i, run in zip(who, runs):
            out[i][method] = run[-1]
            if method == "llm_ft":   # what one LLM fine-tune costs
                out[i]["seconds"] = (time.perf_counter() - t0) / len(who)
    return out


def clients_stage(cfg, task, tiny, llm, paths, device, ranks=None):
    """The task's clients, each with its TinyLM updates (floor_update: without DP, the PGR floor;
    upload: what it sends the provider) and the LLM fine-tunes it is compared with (references)."""
    t0 = time.time()
    clients = task.clients(cfg.n_train, cfg.n_test, cfg.group_size, cfg.skew, cfg.random_clients)
    worker = Worker(cfg, task, tiny, llm)
    runs = run_stage(client_runs, clients, worker=worker, path=paths["clients"], desc="clients",
                     paths=paths, device=device, ranks=ranks)
    for c, (floor, upload) in zip(clients, runs):
        c.update(floor_update=floor, upload=upload)
    references = run_stage(reference_runs, clients, worker=worker, path=paths["references"],
                           desc="reference fine-tunes", paths=paths, device=device, ranks=ranks)
    for c, refs in zip(clients, references):
        c["references"] = refs
    sigma = noise_multiplier(cfg)
    note = f", DP ({cfg.dp_mechanism}) eps={cfg.dp_epsilon} sigma={sigma:.3f}" if sigma else ""
    log(ranks, f"clients   : {len(clients)} clients fine-tuned their TinyLM{note}, "
        f"{time.time() - t0:.1f}s")
    return clients


# -----------------------------------------------------------------------------
# independent fine-tunes of one base model, and output perturbation


def fine_tunes(cfg, model, datasets, recipe, seeds, snapshot_steps=()):
    """[tinylm.finetune(model, *datasets[i], recipe, seeds[i], ...)]: one run per dataset, as one
    batched computation (tinylm.finetune_many, cfg.batch_runs > 1) or one by one. A dataset None
    (a weak model that answered nothing) teaches nothing: its run is the zero update."""
    todo = [i for i, d in enumerate(datasets) if d is not None]
    if todo and cfg.batch_runs > 1:
        done = tinylm.finetune_many(model, [datasets[i] for i in todo], recipe,
                                    [seeds[i] for i in todo], snapshot_steps=snapshot_steps)
    else:
        done = [tinylm.finetune(model, *datasets[i], recipe, seeds[i],
                                snapshot_steps=snapshot_steps) for i in todo]
    done = dict(zip(todo, done))
    zero = torch.zeros(tinylm.update_shape(model.cfg, model.lora[0]))
    return [done.get(i, [zero] * max(1, len(snapshot_steps))) for i in range(len(datasets))]


def perturb(cfg, update, seed):
    """Output perturbation: the Gaussian mechanism on the whole update vector (dp.py)."""
    g = torch.Generator().manual_seed(seed + 1)
    return dp.perturb_update(update, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip, g)


def private_updates(cfg, tiny, datasets, seeds, clean=None):
    """What a client with each dataset uploads under DP: the final update of a DP-SGD fine-tune,
    or with output perturbation the clean fine-tune's final update (`clean`, when already made:
    same data and seed) clipped plus noise."""
    if cfg.dp_mechanism == "output":
        if clean is None:
            clean = [run[-1] for run in fine_tunes(cfg, tiny, datasets, recipe(cfg), seeds)]
        return [perturb(cfg, update, seed) for update, seed in zip(clean, seeds)]
    return [run[-1] for run in fine_tunes(cfg, tiny, datasets, recipe(cfg, private=True), seeds)]


# -----------------------------------------------------------------------------
# the stages' fine-tunes, in chunks shared by worker processes (config/pool.py)


@dataclass
class Worker:
    """What a stage's fine-tunes read, in whichever process runs them: the run's settings, the
    task, and both base models with LoRA attached."""
    cfg: Config
    task: object      # data.ArithTask, or experiments/text.py's TextTask
    tiny: tinylm.GPT
    llm: tinylm.GPT


def worker_from_cache(cfg, paths, device, task):
    """The same Worker, made in a worker process: the base models from their cached checkpoints."""
    tiny, llm = base_models(cfg, task, paths, device)
    return Worker(cfg, task, tiny, llm)


def run_stage(fn, items, *, worker, path, desc, paths, device, ranks=None):
    """fn(worker, chunk) over chunks of the items, in worker processes (or torchrun's ranks), as a
    cached and resumable stage at `path`; the results, one per item."""
    return pool.run_chunked(worker.cfg, path, desc, fn, items, device=device, state=worker,
                            rebuild=(worker_from_cache, (worker.cfg, paths, device, worker.task)),
                            ranks=ranks)


def main(argv):
    """python train.py [--key=value | --key value ...]: one run; returns results.json's contents
    (under torchrun, on rank 0; None on the other ranks)."""
    cfg = parse_args(argv, __doc__)
    if cfg.experiment:
        raise SystemExit(f"--experiment={cfg.experiment}: experiments run from their own "
                         f"command: python experiments/sweep.py --experiment={cfg.experiment}")
    ranks = distributed.setup(cfg)   # None without torchrun
    try:
        return run(cfg, ranks=ranks)
    finally:
        distributed.finish(ranks)


if __name__ == "__main__":
    main(sys.argv[1:])
