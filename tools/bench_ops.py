"""
tools/bench_ops.py -- how many kernels a whole run launches on a GPU, counted on a CPU: per stage
of a preset, its operator calls along the CUDA code path, from short runs extrapolated to the
preset's step counts, and the GPU time they take at a stated cost per launch. A launch-bound GPU
run is judged by this count (RESULTS.md, "On one GPU").

    python tools/bench_ops.py                                  # both presets, every stage
    python tools/bench_ops.py --preset=gpu --stages=pretrain,shadow
    python tools/bench_ops.py --launch_us 8                    # another cost per launch

How it counts: a TorchDispatchMode sees every ATen operator below autograd and vmap -- the
backward pass and the batched kernels included, what a device executes -- whatever the device.
(torch.profiler on a CPU records CPU functions, a composite op and the ops inside it both, and
counts CUDA launches only on a GPU.) Each operator but a view or an allocation (metadata only)
counts one launch; a multi-tensor operator (_foreach_*, _fused_*) counts the launches of CUDA's
multi_tensor_apply: ceil(tensors / the most per launch for its depth), or ceil(65,536-element
chunks / 320) where that is more. A linear-algebra call counts one (cuSOLVER launches several: an
undercount, a few dozen per fit); host work the CUDA path does on the CPU (each run's batch draws,
the datasets stacked before their one copy) counts as launched (an overcount: 1.5% of a fine-tune
stage's count, a run's draw a step); a copy a CPU makes a no-op (a pretraining batch's indices to
the device) is not counted (one a step).

The CUDA path, where it differs from the CPU's (`cuda_paths`): AdamW in pretraining and in the
translator's fit and tinylm.finetune's Adam are fused there (fused=device.type == "cuda"); a fused
Adam(W) dispatches the one _fused_adam(w)_ operator on a CPU as on CUDA, so it counts as CUDA's
multi_tensor_apply would launch it. Optimizers made without `fused` take the foreach
implementation, as they do by default on CUDA. LLM scoring (tinylm.loss_of_updates) takes the
GPU's chunks of 2^16 tokens; the fine-tunes of a stage run in chunks of batch_runs
(config/pool.chunked with one worker, as on CUDA).

Extrapolation: a stage's count is linear in its steps, so two short runs of s1 < s2 steps give
    per step = (c(s2) - c(s1)) / (s2 - s1),   fixed = c(s1) - s1 * per step,
    launches  = chunks * (fixed + per step * steps)
the translator's evaluations the same way in their number, and the map's selection in its
candidates (1 and 2 of the 10 lambdas per subspace size and fold). Nothing else is scaled down
that the count depends on: an operator count does not depend on a model's width, so the models
counted have the presets' depths and heads at n_embd = 4 per head (seconds, not minutes); the
data, chunk sizes, candidates and clients are the presets' own. Where the number of examples
only sets a batch's size, fewer count alike: a client's test split is one generation batch
(<= 1000 prompts of PROMPT_LEN tokens), 16 of them here; the selection's LLM scoring reads the 8
longest of each run's val_examples (the same T) with 1/8 the tokens per chunk (the same chunks):
on the gpu preset within 0.01% of a count with all 64. The translator's inputs are random updates
of the right shapes; the models are untrained (an untrained TinyLM answers too few prompts for
the weak baselines: every example is kept, the labels do not change the count).

Per launch: `--launch_us` (5 µs: launch-bound, H100-class). Eager PyTorch costs more per operator
on the host than the launch itself: the gpu preset's LLM pretraining ran at ~22 steps/s on an H200
(HISTORY.md), 781 launches a step here, ~58 µs an operator.

Compiled regions: where the preset sets --compile (the gpu preset does), tinylm.compiled
compiles the forward of the pretraining step and of the translator's step with
mode="reduce-overhead" on CUDA: a CUDA graph. Such a call counts one graph launch for its forward
plus one copy per tensor argument into the graph's static inputs (the step's batch indices), and
one graph launch for its backward (`GraphReplay`); the work inside runs eagerly here, uncounted.
What stays outside the graphs counts as before: the gradient clipping (foreach) and the fused
AdamW, a few launches a step. (Without CUDA graphs a compiled region would count the kernels
Inductor generated for it plus the ones it calls out to, per call: not counted here.) The
fine-tunes, the selection and the evaluations are not compiled.
"""
import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import eval as evaluation
import gradtx
import tinylm
import train
from config import pool
from config.presets import (MODEL_PRESETS, PRESETS, RIDGE_LAMBDAS, SUBSPACE_SIZES,
                            parse_options, recipe)

STAGES = ("pretrain", "shadow", "fit", "clients", "eval")
# metadata only: no kernel runs
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
             "lift_fresh", "_unsafe_view", "resize_", "set_", "detach"}
# multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): the most tensors per launch of a
# depth-d operator (d tensor lists, the outputs included), and the most 65,536-element chunks
MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
MAX_CHUNKS, CHUNK = 320, 65536


# -----------------------------------------------------------------------------
# counting: operators -> launches


def multi_tensor_launches(name, args):
    """The launches of a _foreach_* / _fused_* operator on CUDA, from its tensor-list arguments."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a
             and all(isinstance(t, torch.Tensor) for t in a)]
    depth = len(lists) + (not name.endswith("_"))          # an out-of-place op writes a new list
    if name.startswith("_fused_"):
        depth -= 1                                         # the step counts ride along, not a list
    tensors = lists[0] if lists else []
    chunks = sum(math.ceil(t.numel() / CHUNK) for t in tensors)
    return max(1, math.ceil(len(tensors) / MAX_TENSORS[min(max(depth, 1), 5)]),
               math.ceil(chunks / MAX_CHUNKS))


class LaunchCount(TorchDispatchMode):
    """Counts the ATen operators dispatched below autograd and vmap (`calls`) and the kernel
    launches they make on CUDA (`launches`): none for a view or an allocation, multi_tensor_apply's
    for a multi-tensor operator, one for any other."""

    def __init__(self):
        super().__init__()
        self.calls = self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            name = func.overloadpacket.__name__
            self.calls += 1
            if name.startswith(("_foreach_", "_fused_")):
                self.launches += multi_tensor_launches(name, args)
            elif not (func.is_view or name in NO_KERNEL):
                self.launches += 1
        return func(*args, **(kwargs or {}))


def launches_of(run, *args, **kwargs):
    """The launches run(*args, **kwargs) makes."""
    with LaunchCount() as count:
        run(*args, **kwargs)
    return count.launches


def fixed_and_per_step(run, short=(2, 4)):
    """(fixed, per step) of run(steps)'s launches, fixed + per step * steps, from two short runs."""
    s1, s2 = short
    c1, c2 = launches_of(run, s1), launches_of(run, s2)
    per_step = (c2 - c1) / (s2 - s1)
    return c1 - s1 * per_step, per_step


@dataclass
class Row:
    """A stage's estimate: `chunks` times (fixed + per_step * steps) launches."""
    stage: str
    fixed: float
    per_step: float
    steps: int
    chunks: int = 1

    @property
    def launches(self):
        return self.chunks * (self.fixed + self.per_step * self.steps)


# -----------------------------------------------------------------------------
# the CUDA code path, followed on a CPU


class CudaAdam(torch.optim.Adam):
    """torch.optim.Adam as tinylm.finetune makes it on CUDA: fused (one kernel per step)."""

    def __init__(self, params, *args, fused=None, **kwargs):
        super().__init__(params, *args, fused=True, **kwargs)


class CudaAdamW(torch.optim.AdamW):
    """torch.optim.AdamW as pretraining and the translator's fit make it on CUDA: fused."""

    def __init__(self, params, *args, fused=None, **kwargs):
        super().__init__(params, *args, fused=True, **kwargs)


class Uncounted(TorchDispatchMode):
    """Runs every operator with no count: the work inside a captured CUDA graph."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with torch.utils._python_dispatch._disable_current_modes():
            return func(*args, **(kwargs or {}))


def launch(n=1):
    """n counted launches (a graph replay, a copy into a graph's static input)."""
    for _ in range(n):
        torch.empty(1).zero_()


class GraphReplay(torch.autograd.Function):
    """A compiled region under CUDA graphs, counted: its forward one replay plus one copy per
    tensor argument into the graph's static inputs, its backward one replay. The work itself runs
    eagerly, uncounted."""

    @staticmethod
    def forward(ctx, anchor, fn, *args):
        with torch.enable_grad(), Uncounted():
            ctx.out = fn(*args)
        ctx.n_args = len(args)
        launch(1 + sum(isinstance(a, torch.Tensor) for a in args))
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, grad):
        with Uncounted():
            torch.autograd.backward(ctx.out, grad)   # into the parameters' .grad, as the graph does
        launch(1)
        return (None, None, *[None] * ctx.n_args)   # nothing flows to the anchor or the args


def captured(fn, *, compile, device):
    """tinylm.compiled on CUDA, counted: with compile, fn's calls count as `GraphReplay`s."""
    if not compile:
        return fn

    def replay(*args):
        with Uncounted():
            anchor = torch.zeros((), requires_grad=True)   # puts the replay on autograd's tape
        return GraphReplay.apply(anchor, fn, *args)
    return replay


def foreach_devices():
    """The devices whose optimizers default to foreach kernels, the CPU among them."""
    return ["cuda", "cpu"]


LOSS_OF_UPDATES = tinylm.loss_of_updates


@contextlib.contextmanager
def cuda_paths(score_tokens=1 << 16):
    """Inside: the optimizers and LLM scoring take the paths they take on CUDA. score_tokens:
    tokens per chunk of tinylm.loss_of_updates (2^16 on CUDA)."""
    loss_of_updates = functools.partial(LOSS_OF_UPDATES, max_tokens=score_tokens)
    with mock.patch("torch.optim.optimizer._get_foreach_kernels_supported_devices",
                    foreach_devices), \
            mock.patch.object(torch.optim, "Adam", CudaAdam), \
            mock.patch.object(torch.optim, "AdamW", CudaAdamW), \
            mock.patch.object(tinylm, "compiled", captured), \
            mock.patch.object(tinylm, "loss_of_updates", loss_of_updates):
        yield


def narrow(size, task):
    """MODEL_PRESETS[size]'s depth and heads at n_embd = 4 per head: the same operators."""
    shape = MODEL_PRESETS[size]
    return replace(shape, n_embd=4 * shape.n_head, vocab_size=task.enc.n_vocab,
                   block_size=task.block_size)


def base_models(cfg, task):
    """Untrained, narrow TinyLM and LLM with LoRA attached, as train.base_models gives them."""
    models = []
    for size in (cfg.tiny_model, cfg.llm_model):
        torch.manual_seed(cfg.seed)
        model = tinylm.GPT(narrow(size, task)).eval()
        models.append(tinylm.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_seed))
    return models


# -----------------------------------------------------------------------------
# the stages, each as train.py runs it


def pretrain_rows(cfg, task, tiny, llm):
    """Stage 1: tinylm.pretrain of both models (AdamW, foreach on CUDA)."""
    rows = []
    for who, size, steps, lr in (("tiny", cfg.tiny_model, cfg.pretrain_steps_tiny,
                                  cfg.pretrain_lr_tiny),
                                 ("llm", cfg.llm_model, cfg.pretrain_steps_llm,
                                  cfg.pretrain_lr_llm)):
        def run(n):
            rng = data.stream(cfg.seed, "pretrain batches")
            indices = task.pretrain_draws(cfg.pretrain_batch, n, rng)
            tinylm.pretrain(narrow(size, task), task.pretrain_rows, indices, lr=lr, seed=cfg.seed,
                            compile=cfg.compile, dtype=cfg.dtype)
        rows.append(Row(f"pretrain {who}", *fixed_and_per_step(run), steps))
    return rows


def chunk_rows(name, worker, fn, items):
    """A stage of batched fine-tunes, train.run_stage's way on CUDA: fn(worker, chunk) for each
    chunk of batch_runs items, with the preset's ft_steps; counted on short runs of a chunk of each
    size."""
    cfg = worker.cfg
    chunks = pool.chunked(items, cfg.batch_runs, 1)
    counted = {}   # chunk size -> (fixed, per step): vmap makes chunks of one size count alike
    for chunk in chunks:
        def run(steps):
            # snapshots 1 step apart: as many as the preset's, and within the short run
            short = replace(worker, cfg=replace(cfg, ft_steps=steps, snapshot_gap=1))
            fn(short, chunk)
        if len(chunk) not in counted:
            counted[len(chunk)] = fixed_and_per_step(run, (cfg.n_snapshots, cfg.n_snapshots + 2))
    fixed, per_step = (sum(counted[len(c)][i] for c in chunks) / len(chunks) for i in (0, 1))
    return Row(name, fixed, per_step, cfg.ft_steps, len(chunks))


def shadow_rows(cfg, task, tiny, llm):
    """Stage 2: both models fine-tuned on each shadow subset (train.shadow_runs)."""
    worker = train.Worker(cfg, task, tiny, llm)
    return [chunk_rows("shadow (TinyLM + LLM)", worker, train.shadow_runs,
                       list(range(cfg.n_shadow)))]


def keep_every_example(task, model, examples, generator):
    """eval.relabel, counted, keeping every example: an untrained TinyLM answers too few prompts
    to fine-tune on, and the count does not depend on the labels."""
    RELABEL(task, model, examples, generator)
    return examples


RELABEL = evaluation.relabel


def clients_rows(cfg, task, tiny, llm):
    """Stage 4: the clients' TinyLM fine-tunes (train.client_runs), then the LLM fine-tunes they
    are compared with (train.reference_runs: its weak labels by greedy generation)."""
    worker = train.Worker(cfg, task, tiny, llm)
    clients = task.clients(cfg.n_train, cfg.n_test, cfg.group_size, cfg.skew, cfg.random_clients)
    rows = [chunk_rows("clients (TinyLM)", worker, train.client_runs, clients)]
    for c in clients:   # what the clients stage gives the references stage
        c["floor_update"] = c["upload"] = random_update(tiny, c["index"])
    with mock.patch.object(evaluation, "relabel", keep_every_example):
        rows.append(chunk_rows("references (LLM)", worker, train.reference_runs, clients))
    return rows


def random_update(model, seed):
    """A small random update vector of the model's shape."""
    g = torch.Generator().manual_seed(seed)
    return 1e-3 * torch.randn(tinylm.update_shape(model.cfg, model.lora[0]), generator=g)


def random_shadow(cfg, tiny, llm):
    """{"X", "Y"}: random updates in the shapes of the shadow stage's (n_shadow, S, ...)."""
    g = torch.Generator().manual_seed(cfg.seed)
    return {name: torch.randn(cfg.n_shadow, cfg.n_snapshots,
                              *tinylm.update_shape(model.cfg, cfg.lora_rank), generator=g)
            for name, model in (("X", tiny), ("Y", llm))}


class FitInputs:
    """What train.fit_translator prepares for a fit at one upload (m = 1, no DP): the folds, the
    shadow pairs by run, the translator's train and validation pairs, the functional criterion."""

    def __init__(self, cfg, task, llm, shadow, few=8):
        n_runs = cfg.fit_shadow or cfg.n_shadow
        folds = data.split_runs(n_runs, cfg.val_frac, cfg.seed, cfg.gt_select_folds)
        self.folds = folds if cfg.gt_select_folds > 1 else [folds]
        self.train_runs, self.val_runs = self.folds[0]
        self.X_clean = shadow["X"][:n_runs]
        self.X_all, self.Y_all = data.translator_inputs(cfg, shadow, list(range(n_runs)), 1,
                                                            private=False)
        self.X_train = self.X_all[self.train_runs].flatten(0, 1)
        self.Y_train = self.Y_all[self.train_runs].flatten(0, 1)
        self.X_val, self.Y_val = self.X_all[self.val_runs, -1], self.Y_all[self.val_runs, -1]
        # the criterion scores val_examples of each run; its longest `few` make the same T and,
        # with scoring chunks of few / val_examples the tokens, the same chunks of runs
        examples = [sorted(data.shadow_examples(cfg, task, k)[:cfg.val_examples], key=len)[-few:]
                    for k in range(n_runs)]
        self.score_tokens = (1 << 16) * few // cfg.val_examples
        self.criterion = train.functional_criterion(llm, [task.encode(e) for e in examples],
                                                    cfg.gt_select)


def new_translator(cfg, inputs, linear):
    """An untrained Grad-Transformer over the linear map, as train.fit_translator builds it (no DP:
    the shadow pairs alone, no gate)."""
    pairs = train.Pairs(inputs.X_train, inputs.Y_train, len(inputs.X_train), gate=None, signal=None)
    return train.new_translator(cfg, pairs, linear, "cpu")


def fit_rows(cfg, task, tiny, llm):
    """Stage 3: the linear map's selection, then the Grad-Transformer's fit (gradtx.fit)."""
    inputs = FitInputs(cfg, task, llm, random_shadow(cfg, tiny, llm))
    with cuda_paths(inputs.score_tokens):
        selection, linear = selection_row(cfg, inputs)
        return [selection] + translator_rows(cfg, inputs, linear)


def selection_row(cfg, inputs):
    """gradtx.select_linear_map: every candidate (k, lambda) fit on each fold's train runs and
    scored by the LLM on its held-out runs. -> (its Row, the map chosen)"""
    scored = []

    def criterion(pred, runs):   # counts the candidates scored: one call per fold scores them all
        scored.append(len(runs))
        return inputs.criterion(pred, runs)
    held_out = sum(len(runs) for _, runs in inputs.folds)   # a candidate's runs, over the folds

    def select(lams):   # -> (launches, candidates scored, the map)
        scored.clear()
        with LaunchCount() as count:
            linear = gradtx.select_linear_map(inputs.X_clean, inputs.X_all, inputs.Y_all,
                                              criterion, inputs.folds, ks=ks, lams=lams,
                                              rule="one_se")
        return count.launches, sum(scored) / held_out, linear
    # every lambda of a subspace size costs alike: count 1 and 2 of them, extrapolate to all
    ks = SUBSPACE_SIZES if cfg.gt_project else (0,)
    c1, n1, _ = select(RIDGE_LAMBDAS[:1])
    c2, n2, linear = select(RIDGE_LAMBDAS[:2])
    per_candidate = (c2 - c1) / (n2 - n1)
    return Row("map selection (per candidate)", c1 - n1 * per_candidate, per_candidate,
               round(n1 * len(RIDGE_LAMBDAS))), linear


def translator_rows(cfg, inputs, linear):
    """gradtx.fit: its steps, and its evaluations (generation, then the LLM's scoring of the
    held-out runs), from fits of 2 and 4 steps with 2 and 3 evaluations."""
    val_criterion = functools.partial(inputs.criterion, runs=inputs.val_runs)

    def fit_launches(steps, eval_every):
        return launches_of(gradtx.fit, new_translator(cfg, inputs, linear), inputs.X_train,
                           inputs.Y_train, inputs.X_val, inputs.Y_val, steps=steps, lr=cfg.gt_lr,
                           weight_decay=cfg.gt_weight_decay, batch_size=cfg.gt_batch,
                           eval_every=eval_every, val_criterion=val_criterion, seed=cfg.seed,
                           compile=cfg.compile, dtype=cfg.dtype)
    two_evals, more_steps, three_evals = fit_launches(2, 2), fit_launches(4, 4), fit_launches(4, 2)
    per_step, per_eval = (more_steps - two_evals) / 2, three_evals - more_steps
    evals = len([s for s in range(cfg.gt_steps + 1)
                 if s % cfg.gt_eval_every == 0 or s == cfg.gt_steps])
    return [Row("translator steps", two_evals - 2 * per_step - 2 * per_eval, per_step,
                cfg.gt_steps),
            Row("translator evals", 0, per_eval, evals)]


def eval_rows(cfg, task, tiny, llm):
    """Stage 5 (eval.evaluate): the LLM fine-tuned on the public half (tinylm.finetune), then every
    client's methods scored by greedy generation on its test split, each translated upload made
    by the Grad-Transformer (a linear map k = 4 or the raw input, lambda = 1)."""
    public = task.encode(task.public_examples(None, data.stream(cfg.seed, "public examples")))

    def public_llm(steps):
        tinylm.finetune(llm, *public, recipe(replace(cfg, ft_steps=steps)), cfg.seed)
    rows = [Row("eval: public LLM fine-tune", *fixed_and_per_step(public_llm), cfg.ft_steps)]
    inputs = FitInputs(cfg, task, llm, random_shadow(cfg, tiny, llm))
    k = 4 if cfg.gt_project else 0
    X_clean = inputs.X_clean[inputs.train_runs].flatten(0, 1)
    (basis, ridge), = gradtx.linear_candidates(X_clean, inputs.X_train, inputs.Y_train, (k,),
                                               (1.0,)).values()
    linear = gradtx.LinearMap(basis, ridge, k, 1.0, {})
    model = new_translator(cfg, inputs, linear).eval()
    provider = evaluation.Provider({1: gradtx.Translator(model, dict(basis=basis, ridge=ridge))},
                                   torch.zeros(tinylm.update_shape(llm.cfg, cfg.lora_rank)))
    # a test split is one generation batch (<= 1000 prompts, all PROMPT_LEN tokens): 16 count alike
    clients = task.clients(cfg.n_train, min(cfg.n_test, 16), cfg.group_size, cfg.skew,
                           cfg.random_clients)
    with LaunchCount() as count:
        score_clients(cfg, task, tiny, llm, clients, provider)
    return rows + [Row("eval: scoring (per client)", 0, count.launches / len(clients),
                       len(clients))]


def score_clients(cfg, task, tiny, llm, clients, provider):
    """eval.evaluate's scoring of every client, each method's update a distinct random one (eval
    scores an update equal to one already scored once)."""
    shared = {"llm_base": torch.zeros(provider.llm_shape),
              "mean_shadow": random_update(llm, -1), "public_llm": random_update(llm, -2)}
    methods = ("llm_ft", "w2s", "w2s_conf", "vissup", "kd") if cfg.weak_baselines else ("llm_ft",)
    groups = {}
    for c in clients:
        c["floor_update"], c["upload"] = random_update(tiny, c["index"]), random_update(tiny, -3)
        weak = c["kind"] != "random"
        c["references"] = {m: random_update(llm, 100 * c["index"] + i)
                           for i, m in enumerate(methods if weak else methods[:1])}
        groups.setdefault(c["group"], []).append(c)
    curves = {name: evaluation.pooling_updates(members, provider)
              for name, members in groups.items()}
    for c in clients:
        sent = provider.updates(c)
        evaluation.score_client(cfg, task, tiny, llm, c, dict(shared, **sent.updates),
                                curves[c["group"]], provider.gate)


STAGE_ROWS = {"pretrain": pretrain_rows, "shadow": shadow_rows, "fit": fit_rows,
              "clients": clients_rows, "eval": eval_rows}


# -----------------------------------------------------------------------------
# the table


def preset_rows(name, stage_names):
    """The rows of one preset's stages, counted along the CUDA path."""
    cfg = PRESETS[name]
    task = data.make_task(cfg.task, cfg.seed)
    tiny, llm = base_models(cfg, task)
    rows = []
    # no progress bars inside: the table is the output
    with cuda_paths(), mock.patch.object(tqdm, "__init__",
                                         functools.partialmethod(tqdm.__init__, disable=True)):
        for stage in stage_names:
            t0 = time.time()
            rows += STAGE_ROWS[stage](cfg, task, tiny, llm)
            print(f"counted   : {name} {stage}, {time.time() - t0:.1f}s", file=sys.stderr,
                  flush=True)
    return rows


def markdown(rows_by_preset, launch_us):
    """One markdown table: per preset each stage and the preset's total."""
    lines = [f"| preset | stage | launches per step | steps | launches | GPU time at "
             f"{launch_us:g} µs/launch |", "|---|---|---:|---:|---:|---:|"]
    for name, rows in rows_by_preset.items():
        for r in rows:
            steps = f"{r.chunks} × {r.steps:,}" if r.chunks > 1 else f"{r.steps:,}"
            lines.append(f"| {name} | {r.stage} | {r.per_step:,.0f} | {steps} | "
                         f"{r.launches:,.0f} | {r.launches * launch_us * 1e-6:,.1f} s |")
        total = sum(r.launches for r in rows)
        lines.append(f"| {name} | **total** | | | **{total:,.0f}** | "
                     f"**{total * launch_us * 1e-6:,.1f} s** |")
    return "\n".join(lines)


@dataclass
class BenchOptions:
    preset: str = "cpu,gpu"              # comma-separated: config/presets.py's PRESETS
    stages: str = ",".join(STAGES)       # comma-separated, of these
    launch_us: float = 5.0               # GPU time per kernel launch: launch-bound, H100-class
    threads: int = 1                     # torch CPU threads for the short runs


def main(argv):
    o = parse_options(BenchOptions(), argv, __doc__)
    presets, stage_names = o.preset.split(","), o.stages.split(",")
    unknown = [p for p in presets if p not in PRESETS] + [s for s in stage_names
                                                          if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown preset or stage {unknown}: presets {', '.join(PRESETS)}; "
                         f"stages {', '.join(STAGES)}")
    torch.set_num_threads(o.threads)
    t0 = time.time()
    table = markdown({p: preset_rows(p, stage_names) for p in presets}, o.launch_us)
    print(table)
    print(f"\ncounted on the CPU in {time.time() - t0:.0f}s (torch {torch.__version__}); launches "
          "= chunks x (fixed + per step x steps): tools/bench_ops.py's docstring")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
