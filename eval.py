"""
eval.py -- scoring: the task's metric, PGR and gain recovered, honest baselines, the tables.

    python train.py                 # runs everything and calls evaluate() at the end
    python eval.py --out out        # print the tables of a finished run again (--out=out alike)

Every method gives the LLM (or, for the floor, the TinyLM) one update vector, scored on each
client's own test split (arith: accuracy of the parsed answer; text: bits per byte, lower better):

    llm_base      the LLM with no update
    tinylm_ft     TinyLM fine-tuned on the client's private data, no DP          P_S, the floor
    tinylm_dp     (DP runs) the client's own DP TinyLM: the model behind its upload
    llm_ft        LLM fine-tuned on the client's private data, no DP             P_T, the ceiling
    gradtx        the Grad-Transformer's translation of the client's upload; with DP, what the
                  provider chooses to send for it (the translation or a simpler fallback,
                  gradtx.choose), the candidate named in the client's "provider_choice"
                  (under the check: "checked:" and the update it picked for the upload)
    translator    (DP runs) the translation itself, behind the do-no-harm gate (blending)
    gradtx_group  (groups) one translation of the mean upload of the client's convention group
    ridge         the linear map alone (public subspace + ridge regression on the same shadow pairs;
                  with DP behind the translator's do-no-harm gate)
    ridge_ungated (DP runs) the same map without the gate
    ridge_group   (groups) the linear map on the group's mean upload
    mean_shadow   the mean shadow LLM update: what the provider has with no client signal
    public_llm    LLM fine-tuned on the whole public half
    w2s           LLM fine-tuned on the client's private inputs labelled by the client's TinyLM
    w2s_conf      the same with the auxiliary confidence loss (Burns et al. 2023)
    vissup        the same with adaptive, per-token confidence (Guo et al. 2024)
    kd            data-free distillation: LLM fine-tuned on public prompts labelled by the client's
                  TinyLM (the provider can rebuild it from the upload: public base + update)
    (w2s, w2s_conf, vissup and kd use the client's own TinyLM: the DP one in DP runs.)

    PGR            = (P_method - P_S) / (P_T - P_S)
    gain recovered = (P_method - P_llm_base) / (P_T - P_llm_base)
Both hold for lower-is-better metrics too (numerator and denominator change sign together).
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import data
import dp
import gradtx
import tinylm
from config.presets import ANSWER_PROMPTS, CHECK_PROMPTS, parse_options

METHODS = ["llm_base", "tinylm_ft", "tinylm_dp", "llm_ft", "gradtx", "gradtx_group", "translator",
           "ridge",
           "ridge_ungated", "ridge_group", "mean_shadow", "public_llm", "w2s", "w2s_conf",
           "vissup", "kd"]

# -----------------------------------------------------------------------------
# metrics


@torch.no_grad()
def completions(task, model, prompts, n_tokens, temperature=0.0, generator=None, batch=1000):
    """The model's continuation (n_tokens, greedy at temperature 0) of each prompt, as text."""
    enc = task.enc
    out = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):   # generate prompts of equal length together
        by_length.setdefault(len(enc.encode_ordinary(p)), []).append(i)
    for length, rows in by_length.items():
        for j in range(0, len(rows), batch):
            chunk = rows[j:j + batch]
            idx = torch.tensor([enc.encode_ordinary(prompts[i]) for i in chunk],
                               device=model.wte.weight.device)
            gen = model.generate(idx, n_tokens, temperature, generator)[:, length:].tolist()
            for i, row in zip(chunk, gen):
                out[i] = enc.decode([t for t in row if t < 256])
    return out


def accuracy(task, model, examples):
    """Share of examples whose greedy completion of the prompt gives the right answer."""
    texts = completions(task, model, [task.prompt(e) for e in examples], task.completion_len)
    return float(np.mean([task.is_correct(e, t) for e, t in zip(examples, texts)]))


def bits_per_byte(task, model, examples):
    """Held-out cross-entropy in bits per byte (a byte-level tokenizer: one token, one byte)."""
    return tinylm.loss_of(model, *task.encode(examples)) / math.log(2)


@torch.no_grad()
def exact_match_of(model, x, y, mask, batch=1024):
    """Share of examples (N, T) whose every masked target is the model's argmax under teacher
    forcing: the examples greedy decoding completes right, in one forward pass."""
    hits = torch.zeros((), dtype=torch.long, device=model.wte.weight.device)
    for i in range(0, len(x), batch):   # counted on the device: one host sync, at the end
        xb, yb, mb = (t[i:i + batch].to(model.wte.weight.device) for t in (x, y, mask))
        hits += ((model(xb)[0].argmax(-1) == yb) | (mb == 0)).all(dim=1).sum()
    return hits.item() / max(len(x), 1)


def score(task, model, examples):
    """The task's metric of `model` on the examples: accuracy (arith) or bits per byte (text)."""
    return (accuracy if task.metric == "accuracy" else bits_per_byte)(task, model, examples)


def share_recovered(p_method, p_start, p_end):
    """How much of the way from p_start to p_end a method's score covers: 0 at the start, 1 at the
    end, never clipped; None when the two coincide (undefined). Holds for lower-is-better metrics
    too: numerator and denominator change sign together."""
    gap = p_end - p_start
    return None if abs(gap) < 1e-12 else (p_method - p_start) / gap


def pgr(p_method, p_floor, p_ceiling):
    """Performance gap recovered: from the fine-tuned TinyLM (floor) to the fine-tuned LLM."""
    return share_recovered(p_method, p_floor, p_ceiling)


def gain_recovered(p_method, p_base, p_ceiling):
    """The share of the LLM's own fine-tuning gain: from the bare LLM to the fine-tuned LLM."""
    return share_recovered(p_method, p_base, p_ceiling)


def mean_defined(values):
    """The mean of the values that are not None (an undefined PGR is left out); None if none are."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def relabel(task, model, examples, generator):
    """Each example's prompt completed by `model` (arith: its greedy answer; text: a sampled
    continuation); examples it gives no usable answer to are dropped."""
    prompts = [task.prompt(e) for e in examples]
    texts = completions(task, model, prompts, task.completion_len, task.label_temperature,
                        generator)
    return [r for r in (task.relabelled(p, t) for p, t in zip(prompts, texts)) if r is not None]


def reference_sets(task, tiny, train, own_update, seed, rng):
    """What the LLM fine-tunes a client's results are compared with learn from: data the provider
    never sees. {method: (examples, confidence)}: llm_ft, the client's private data (the ceiling);
    given own_update, the client's TinyLM update (the DP one under DP-SGD; None: skip them), w2s /
    w2s_conf / vissup, the client's inputs labelled by its TinyLM (tinylm.with_confidence), and kd,
    public prompts labelled by it."""
    sets = {"llm_ft": (train, 0.0)}
    if own_update is not None:
        g = torch.Generator().manual_seed(seed)
        tinylm.set_update(tiny, own_update)
        weak = relabel(task, tiny, train, g)
        kd = relabel(task, tiny, task.public_examples(len(train), rng), g)
        sets.update(w2s=(weak, 0.0), w2s_conf=(weak, 0.5), vissup=(weak, "adaptive"), kd=(kd, 0.0))
    return sets


def tinylm_check(task, tiny, llm, n_prompts, seed):
    """The provider's check (gradtx.check_uploads): check(uploads (B, n_src, d_src), options (C, B,
    n_tgt, d_tgt)) -> B tensors (C, P_b), for each upload the LLM's loss under each option on each
    of the P_b answers the client's TinyLM, rebuilt from the upload (the public TinyLM plus it),
    gives to n_prompts public prompts (the same prompts for every upload; a prompt it answers with
    no usable answer is dropped, as `relabel` does). Public models and public prompts only: what it
    reads of a client is its upload, as every candidate does. Both models are left as they were."""
    prompts = task.public_examples(n_prompts, data.stream(seed, "check prompts"))

    @torch.no_grad()
    def check(uploads, options):
        held = tinylm.get_update(tiny), tinylm.get_update(llm)   # put back at the end
        try:
            return [answer_losses(upload, options[:, i]) for i, upload in enumerate(uploads)]
        finally:
            tinylm.set_update(tiny, held[0])
            tinylm.set_update(llm, held[1])

    def answer_losses(upload, options):   # options (C, n_tgt, d_tgt) -> (C, P_b)
        tinylm.set_update(tiny, upload.to(tiny.wte.weight.device))
        answers = relabel(task, tiny, prompts, torch.Generator().manual_seed(seed))
        if not answers:   # nothing usable: no evidence (check_uploads sends the mean update)
            return torch.zeros(len(options), 0)
        x, y, mask = (t.to(llm.wte.weight.device) for t in task.encode(answers))
        return torch.stack([dp.per_example_losses(
            tinylm.set_update(llm, option, check_finite=False)(x)[0], y, mask).cpu()
            for option in options])
    return check


class AnswerShifts(NamedTuple):
    """What the answer test (gradtx.answer_test) reads of a model's next token after a public
    prompt's '=', which names the convention of its answer (task.conventions: arith, the four
    operators '@' may stand for), mean over the prompts."""
    tiny: Callable   # uploads (B, n_src, d_src) -> (B, A): the rebuilt TinyLM's log-probability of
                     #   each convention, minus the public TinyLM's (how far the upload moved it)
    llm: Callable    # updates (C, B, n_tgt, d_tgt) -> (C, B, A): the LLM's probability of each
                     #   convention under each update (the most probable: what it answers)
    default: int     # the convention the LLM answers under the mean shadow update


def convention_prompts(task, n_prompts, seed):
    """n_prompts public prompts up to the token that names their answer's convention ('37@52='),
    encoded in one batch (P, T), and the token of each of the task's conventions (A,)."""
    examples = task.public_examples(n_prompts, data.stream(seed, "check prompts"))
    prompts = [task.enc.encode_ordinary(task.convention_prompt(e)) for e in examples]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError(f"answer_shifts: the {task.name} task's convention prompts differ in "
                         f"length; expected one length (they are read in one batch)")
    return torch.tensor(prompts), [task.enc.encode_ordinary(c)[0] for c in task.conventions]


def answer_shifts(task, tiny, llm, mean_shadow, n_prompts, seed):
    """AnswerShifts on n_prompts public prompts (the check's, and more), for a task with
    conventions (None for one without: the text task). Public models and prompts only.

    Why log-probabilities for the TinyLM: under DP noise its greedy answers stay the public
    TinyLM's, while the log-probability of the client's operator moves by a few hundredths, which
    the test compares with the moves noise alone makes. Why probabilities for the LLM: the test
    asks which operator an LLM update makes the LLM answer, and a log-probability moves most for an
    operator the LLM almost never answers (from 0.001 to 0.01 is as far as from 0.1 to 1)."""
    if not getattr(task, "conventions", None):
        return None
    prompts, ids = convention_prompts(task, n_prompts, seed)

    @torch.no_grad()
    def next_token(model, updates, log):
        """(B, ...) updates -> (B, A): each convention's mean (log-)probability."""
        held = tinylm.get_update(model)   # put back at the end
        x = prompts.to(model.wte.weight.device)                                       # (P, T)
        normalise = torch.log_softmax if log else torch.softmax
        try:
            out = []
            for u in updates:
                logits = tinylm.set_update(model, u.to(x.device), check_finite=False)(x)[0]
                out.append(normalise(logits[:, -1].float(), -1)[:, ids].mean(0))   # (P, A) -> (A,)
            return torch.stack(out).cpu()
        finally:
            tinylm.set_update(model, held)

    public_tiny = next_token(tiny, torch.zeros(1, *tinylm.get_update(tiny).shape), log=True)[0]

    def tiny_shifts(uploads):   # (B, n_src, d_src) -> (B, A)
        return next_token(tiny, uploads, log=True) - public_tiny

    def llm_probabilities(updates):   # (C, B, n_tgt, d_tgt) -> (C, B, A)
        return torch.stack([next_token(llm, u, log=False) for u in updates])
    default = llm_probabilities(mean_shadow[None, None])[0, 0].argmax().item()
    return AnswerShifts(tiny_shifts, llm_probabilities, default)


def provenance(device="cpu"):
    """The commit (when run from a git checkout), the versions and the machine behind a result.
    Float kernels differ between devices, and between CPUs (the vector instructions torch uses, its
    thread count): a score may move in its last digits from one machine to another."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=here).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.device(device)
    return {"commit": commit, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            # this process's peak, at the end of the run (pool workers not counted); None on CPU
            "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                                  if device.type == "cuda" else None)}


# -----------------------------------------------------------------------------
# the evaluation


def evaluate(cfg, task, tiny, llm, *, translators, mean_shadow, clients, recipe, stage_seconds,
             privacy, choices=None, answer_tests=None):
    """Score every method on every client; write results.json into cfg.out and print the tables.

    translators: {m: gradtx.Translator(model, log)} for inputs that average m uploads; the fit log
    holds the selected linear map (basis, ridge) of the `ridge` baselines. choices: {m:
    gradtx.Choice}, what the provider sends for uploads at each level (with DP; None: the
    translation), and answer_tests {m: gradtx.AnswerTest or None}, the answer test on top of it
    at each level (None: no test). mean_shadow: the mean LLM update of the shadow runs the maps
    were fitted on."""
    t0 = time.time()
    check = tinylm_check(task, tiny, llm, CHECK_PROMPTS, cfg.seed) if choices else None
    tests = {m: t for m, t in (answer_tests or {}).items() if t is not None}
    answers = (answer_shifts(task, tiny, llm, mean_shadow, ANSWER_PROMPTS, cfg.seed)
               if tests else None)
    provider = Provider(translators, mean_shadow, choices, check, answers, tests)
    public_llm = public_finetune(cfg, task, llm, recipe)
    shared = {"llm_base": torch.zeros(provider.llm_shape), "mean_shadow": mean_shadow,
              "public_llm": public_llm}
    groups = {}
    for c in clients:
        groups.setdefault(c["group"], []).append(c)
    curves = {}
    for name, members in groups.items():   # each group's mean uploads, translated
        curves[name] = pooling_updates(members, provider)
    results = []
    for c in tqdm(clients, desc="evaluate clients", leave=False):
        sent = provider.updates(c)   # with DP, sent.chosen: what gradtx sent, by name
        results.append(score_client(cfg, task, tiny, llm, c, dict(shared, **sent.updates),
                                    curves[c["group"]], provider.gate, sent.chosen))
    timing = dict(stage_seconds, eval=time.time() - t0)
    timing["total"] = sum(timing.values())
    timing["gradtx_generate_per_update"] = float(np.mean(provider.seconds))
    timing["llm_finetune_per_run"] = float(np.mean([c["references"]["seconds"] for c in clients]))
    out = results_record(cfg, task, llm, results, privacy=privacy, translators=translators,
                         choices=provider.choices, answer_tests=tests, timing=timing)
    path = write_results(out, cfg.out)
    print(f"eval      : {len(results)} clients, {time.time() - t0:.1f}s -> {path}\n", flush=True)
    print(report(out))
    return out


def public_finetune(cfg, task, llm, recipe):
    """The public_llm baseline: the LLM fine-tuned on the whole public half (one example per public
    pair), what the provider can do with public data alone."""
    examples = task.public_examples(None, data.stream(cfg.seed, "public examples"))
    return tinylm.finetune(llm, *task.encode(examples), recipe, cfg.seed)[-1]


def results_record(cfg, task, llm, results, *, privacy, translators, timing, choices=None,
                   answer_tests=None):
    """results.json's contents: the task, the settings and provenance, every client's row, their
    summary, the privacy guarantee, what each translator's fit chose (with DP, and the provider's
    choice and the answer test's calibration at each level), and the time it took."""
    record = {
        "task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
        "config": asdict(cfg), "provenance": provenance(llm.wte.weight.device),
        "clients": results, "summary": summarise_by_kind(results, task.higher_is_better),
        "privacy": privacy,
        "translators": {m: translator_summary(t.log) for m, t in translators.items()},
        "timing_s": timing,
    }
    if choices:
        record["provider_choice"] = {m: c._asdict() for m, c in choices.items()}
    if answer_tests:   # the calibration; of the corners, the shadow run each came from
        record["answer_test"] = {m: dict(centre=t.centre.tolist(), scale=t.scale.tolist(),
                                         threshold=t.threshold,
                                         corner_threshold=t.corner_threshold,
                                         corner_runs=t.corners.runs if t.corners else None)
                                 for m, t in answer_tests.items()}
    return record


def write_results(results, folder):
    """results.json in `folder`, written atomically (a temp file, then a rename); its path."""
    path = os.path.join(folder, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


class ProviderUpdates(NamedTuple):
    """`Provider.updates` for one client: {method: LLM update}, and (with DP) the candidate the
    provider chose to send as gradtx (None without DP)."""
    updates: dict
    chosen: str | None


class Provider:
    """What the provider makes of uploads, each through `gradtx.translate`: the Grad-Transformer
    trained for inputs that average m uploads (`translate`, timed), and the same fit's linear map,
    the same composition with the residual left out (`linear`). With DP, `send`: what the provider
    chooses to send at each level (gradtx.provide; without a choice, the translation)."""

    def __init__(self, translators, mean_shadow, choices=None, check=None, answers=None,
                 tests=None):
        self.translators = translators
        self.check = check   # `tinylm_check`, which the candidate "checked" asks (with DP)
        self.answers = answers            # `answer_shifts`, which the answer test reads (with DP)
        self.tests = tests or {}          # {m: gradtx.AnswerTest}: its calibration at each level
        self.mean_shadow = mean_shadow
        self.llm_shape = tuple(mean_shadow.shape)
        self.choices = choices or {}
        self.seconds = []
        self.gate = translators[1].model.gate   # with DP: the do-no-harm gate, else None

    def translate(self, upload, m=1):
        start = time.perf_counter()
        update = gradtx.generate(self.translators[m].model, upload)
        self.seconds.append(time.perf_counter() - start)
        return update

    def linear(self, upload, m=1, gate="blend"):
        """The linear map's update, behind the translator's do-no-harm gate (with DP; gate: how it
        is applied, gradtx.translate)."""
        model, log = self.translators[m]
        update = gradtx.translate(model, upload[None], linear=log["ridge"], gate=gate)
        return update[0].cpu()

    def send(self, upload, m=1):
        """(the update the provider sends for an upload at level m, what it is: the candidate it
        chose, "checked:<the check's pick>" under the check, "shift:<what>" where the answer test
        sent another)."""
        if m not in self.choices:
            return self.translate(upload, m), "translator"
        model, log = self.translators[m]
        sent = gradtx.provide(model, upload[None].float(), self.choices[m], log["ridge"],
                              self.mean_shadow, self.check, self.answers, self.tests.get(m))
        return sent.updates[0].cpu(), sent.names[0]

    def updates(self, client):
        """{method: LLM update} of the methods reading this client's upload, and its references;
        with DP also the candidate the provider chose for it (`chosen`, None without)."""
        upload = client["upload"]
        methods = dict(gradtx=self.translate(upload), ridge=self.linear(upload))
        chosen = None
        if self.gate is not None:   # with DP: the map without the gate too
            methods["ridge_ungated"] = self.linear(upload, gate="none")
        if self.choices:   # what the provider sends: `gradtx`; the gated translation itself
            methods["translator"] = methods["gradtx"]
            methods["gradtx"], chosen = self.send(upload)
        references = {k: v for k, v in client["references"].items() if k != "seconds"}
        return ProviderUpdates(dict(methods, **references), chosen)


def score_client(cfg, task, tiny, llm, c, updates, curve, gate, chosen=None):
    """One client's row of results.json: every method's score on its test split, PGR and gain
    recovered, and (groups) the pooling curve of its convention group; with DP, the candidate the
    provider chose to send for its upload (`chosen`) and, for a group, for its pooled uploads."""
    test = c["test"]
    scores = {"tinylm_ft": score(task, tinylm.set_update(tiny, c["floor_update"]), test)}
    if cfg.dp_epsilon > 0:
        scores["tinylm_dp"] = score(task, tinylm.set_update(tiny, c["upload"]), test)
    if curve.updates:   # a group: one translation of the mean of all M uploads
        M = max(curve.updates)
        updates.update(gradtx_group=curve.updates[M]["gradtx"],
                       ridge_group=curve.updates[M]["ridge"])
    scores.update(score_updates(task, llm, updates, test))
    pooling = {m: score_updates(task, llm, point, test) for m, point in curve.updates.items()}
    floor = scores["tinylm_ft"]
    ceiling = scores["llm_ft"]
    base = scores["llm_base"]
    row = {"name": c["name"], "group": c["group"], "kind": c["kind"], "mixture": c["mixture"],
           # with DP: how far the translator trusted this upload (1: fully)
           "gate_weight": (None if gate is None
                           else gradtx.gate_weight(gate, c["upload"][None].float()).item()),
           "scores": scores, "pooling": pooling,
           "pgr": {k: pgr(v, floor, ceiling) for k, v in scores.items()},
           "gain_recovered": {k: gain_recovered(v, base, ceiling) for k, v in scores.items()}}
    if chosen is not None:   # with DP
        row["provider_choice"] = chosen
        if curve.chosen:
            row["pooling_choice"] = curve.chosen
    return row


def score_updates(task, llm, updates, examples):
    """{name: score} of the LLM with each update applied, on the examples. An update equal to one
    already scored (a translator that kept its linear map, a pooled mean of every upload) is
    scored once."""
    scored = []   # (update, its score) of the updates scored so far
    out = {}
    for name, update in updates.items():
        known = next((s for u, s in scored if torch.equal(u, update)), None)
        if known is None:   # the code's own updates: no NaN check, no host sync to write one
            known = score(task, tinylm.set_update(llm, update, check_finite=False), examples)
        out[name] = known
        scored.append((update, out[name]))
    return out


def translator_summary(log):
    """What results.json keeps of a fit log: the selection, the losses and the fit curve."""
    keys = ("k", "ridge_lambda", "ridge_loss", "best_step", "val_loss", "mean_shadow_loss",
            "true_update_loss", "seconds", "linear_seconds")
    chosen = ("select_rule", "select_draws")   # how the linear map was chosen (older fits: None)
    return {**{k: log[k] for k in keys}, **{k: log.get(k) for k in chosen},
            "upload_signal": log["upload_signal"],   # None without DP
            "history": log["history"]}               # the fit curve (tools/plots.py)


class PoolingCurve(NamedTuple):
    """A convention group's pooling curve: updates {m: {method: LLM update}} for the mean of its
    first m uploads, and (with DP) chosen {m: the candidate the provider sent as gradtx}."""
    updates: dict
    chosen: dict


def pooling_updates(members, provider):
    """The paper's multi-organization setting: the element-wise mean of the first m uploads of a
    convention group, translated once, for m = 1, 2, 4, ..., M (empty for a client alone). Each
    member keeps its own (eps, delta) guarantee: the mean is post-processing of the members' DP
    releases and touches no private data.

    "gradtx"/"ridge" use the map trained for inputs that average m uploads (their noise level;
    with DP "gradtx" is what the provider sends at that level, "translator" the translation);
    "gradtx_single_map" uses the map for one upload: does matching the level matter?"""
    curve = PoolingCurve({}, {})
    for m in pool_sizes(len(members)) if len(members) > 1 else []:
        mean_upload = torch.stack([c["upload"] for c in members[:m]]).mean(0)
        level = m if m in provider.translators else 1
        point = {"gradtx": provider.translate(mean_upload, level),
                 "ridge": provider.linear(mean_upload, level)}
        if level in provider.choices:   # with DP: what the provider sends, and the translation
            point["translator"] = point["gradtx"]
            point["gradtx"], curve.chosen[m] = provider.send(mean_upload, level)
        if level != 1:
            point["gradtx_single_map"] = provider.translate(mean_upload, 1)
        curve.updates[m] = point
    return curve


def pool_sizes(M):
    """How many uploads are pooled along a group's curve: 1, 2, 4, ... and M itself."""
    return tuple(sorted({*(2 ** i for i in range(int(math.log2(M)) + 1)), M}))


def summarise(rows, higher_is_better=True):
    """Over the clients `rows`: each method's mean score, PGR and gain recovered; the same ratios of
    the mean scores ("of means": robust where one client's gap is close to zero); and do no harm,
    the worst client's score against the mean shadow update. A method some clients lack (the random
    clients have no weak baselines) is summarised over the clients that have it."""
    methods = list(dict.fromkeys(m for r in rows for m in r["scores"]))
    has = {m: [r for r in rows if m in r["scores"]] for m in methods}
    out = {key: {m: mean_defined([r[key][m] for r in has[m]]) for m in methods}
           for key in ("scores", "pgr", "gain_recovered")}
    # do no harm: against the mean shadow update, the provider's without any upload (+: better)
    sign = 1 if higher_is_better else -1
    out["worst_vs_mean_shadow"] = {m: min(sign * (r["scores"][m] - r["scores"]["mean_shadow"])
                                          for r in has[m]) for m in methods}

    def of_means(m, start):   # a ratio of mean scores, over the clients that have m
        start_mean = float(np.mean([r["scores"][start] for r in has[m]]))
        ceiling_mean = float(np.mean([r["scores"]["llm_ft"] for r in has[m]]))
        return share_recovered(out["scores"][m], start_mean, ceiling_mean)

    out["pgr_of_means"] = {m: of_means(m, "tinylm_ft") for m in methods}
    out["gain_of_means"] = {m: of_means(m, "llm_base") for m in methods}
    pooled = [r for r in rows if r["pooling"]]   # the members of convention groups
    if pooled:
        base = float(np.mean([r["scores"]["llm_base"] for r in pooled]))
        ceiling = float(np.mean([r["scores"]["llm_ft"] for r in pooled]))
        out["pooling_gain_of_means"] = {
            m: {variant: gain_recovered(float(np.mean([r["pooling"][m][variant] for r in pooled])),
                                        base, ceiling)
                for variant in point} for m, point in pooled[0]["pooling"].items()}
    return out


def summarise_by_kind(rows, higher_is_better=True):
    """`summarise` over every client, and (by_kind) over each kind of client: skewed, iid, ..."""
    summary = summarise(rows, higher_is_better)
    summary["by_kind"] = {kind: summarise([r for r in rows if r["kind"] == kind], higher_is_better)
                          for kind in sorted({r["kind"] for r in rows})}
    return summary


# -----------------------------------------------------------------------------
# the tables a person reads


def fmt(value):
    """A table cell: the value to two decimals, or n/a where it is undefined (None)."""
    return "n/a" if value is None else f"{value:.2f}"


def markdown_table(head, rows):
    """A markdown table: the header, then one line per row (lists of strings)."""
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    return "\n".join(lines + [markdown_row(row) for row in rows])


def markdown_row(cells):
    """One line of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def ordered(methods):
    """The methods in the order of METHODS (the docstring's list); unknown ones last."""
    return sorted(methods, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))


def results_table(results):
    """Markdown: one row per method. First the verdict, the skewed clients' gain recovered (of
    means: where the upload must carry the convention); then the score per convention group (mean
    over its members; the random clients together), the gain and PGR of means over every client,
    and do no harm: the worst client's score minus the mean shadow update's (below -0.05: someone
    was made worse off by uploading)."""
    clients = results["clients"]
    summary = results["summary"]
    skewed = summary["by_kind"].get("skewed")
    groups = list(dict.fromkeys(c["group"] for c in clients if c["kind"] != "random"))
    if skewed is None:
        return gain_first_table(results, groups)
    columns = [(g, [c for c in clients if c["group"] == g]) for g in groups]
    if randoms := [c for c in clients if c["kind"] == "random"]:
        columns.append((f"random (mean of {len(randoms)})", randoms))
    head = (["method", "skewed: gain recovered"] + [name for name, _ in columns]
            + ["gain of means", "PGR of means", "worst client vs mean_shadow"])
    rows = []
    for m in ordered(summary["scores"]):
        per_column = [mean_defined([c["scores"].get(m) for c in members]) for _, members in columns]
        rows.append([m, fmt(skewed["gain_of_means"][m])] + [fmt(v) for v in per_column]
                    + [fmt(summary["gain_of_means"][m]), fmt(summary["pgr_of_means"][m]),
                       f"{summary['worst_vs_mean_shadow'][m]:+.2f}"])
    return markdown_table(head, rows)


def gain_first_table(results, groups):
    """The text task's table: every client's upload must speak, and PGR is ~1 for every LLM method
    (the bare LLM already beats the fine-tuned TinyLM), so gain recovered leads -- of the mean
    scores, then per client -- and the scores (bits per byte) follow."""
    clients = results["clients"]
    summary = results["summary"]
    unit = "bpb" if results["metric"] == "bits_per_byte" else results["metric"]
    head = (["method", "gain of means"] + [f"{g}: gain" for g in groups]
            + [f"{g}: {unit}" for g in groups] + ["PGR of means", "worst client vs mean_shadow"])
    rows = []
    for m in ordered(clients[0]["scores"]):
        members = [[c for c in clients if c["group"] == g] for g in groups]
        rows.append([m, fmt(summary["gain_of_means"][m])]
                    + [fmt(mean_defined([c["gain_recovered"][m] for c in cs])) for cs in members]
                    + [f"{mean_defined([c['scores'][m] for c in cs]):.3f}" for cs in members]
                    + [fmt(summary["pgr_of_means"][m]),
                       f"{summary['worst_vs_mean_shadow'][m]:+.3f}"])
    return markdown_table(head, rows)


def pooling_table(results):
    """Gain recovered (of means) against the number m of pooled uploads, per kind of group."""
    by_kind = results["summary"]["by_kind"]
    if not all("pooling_gain_of_means" in s for s in by_kind.values()):
        return ""
    sizes = list(next(iter(by_kind.values()))["pooling_gain_of_means"])
    rows = []
    for kind, s in by_kind.items():
        curve = s["pooling_gain_of_means"]
        for variant in ("gradtx", "translator", "ridge", "gradtx_single_map"):
            if any(variant in curve[m] for m in sizes):
                rows.append([kind, variant] + [fmt(curve[m].get(variant)) for m in sizes])
    return markdown_table(["kind", "map"] + [f"m={m}" for m in sizes], rows)


def report(results):
    """What a run prints at its end: the results table, the pooling curve (groups), then one line
    with the metric, each stage's time and the cost of one translation vs one LLM fine-tune."""
    text = results_table(results)
    if chosen := choice_line(results):
        text += "\n\n" + chosen
    if pooling := pooling_table(results):
        text += ("\n\npooling curve: gain recovered (of means) vs number of pooled uploads m\n\n"
                 + pooling)
    return text + "\n\n" + timing_line(results)


def choice_line(results):
    """With DP, what the provider sent (gradtx), counted over the clients, and why: 'provider's
    choice (gradtx): ridge 9 (m=1: ridge, held-out shadow runs +0.178 over the mean update, loss
    0.004)'; "" without."""
    names = [c["provider_choice"] for c in results["clients"] if "provider_choice" in c]
    if not names:
        return ""
    counts = count_names(names)
    levels = []
    for m, choice in results["provider_choice"].items():
        levels.append(f"m={m}: {choice['candidate']}, held-out shadow runs "
                      f"{choice['gain']:+.3f} over the mean update, loss {choice['loss']:.3f}")
    return f"provider's choice (gradtx): {counts} ({'; '.join(levels)})"


def count_names(names):
    """What the provider sent, counted, by name: ["ridge", "mean_shadow", "ridge"] ->
    "mean_shadow 1, ridge 2" ("" for none)."""
    return ", ".join(f"{n} {names.count(n)}" for n in sorted(set(names)))


def timing_line(results):
    """'scores: accuracy; time (s): pretrain 70, ...; one translation 56 ms vs one LLM fine-tune
    0.92 s'."""
    t = results["timing_s"]
    unit = "" if results["metric"] == "accuracy" else f" ({results['metric']}, lower is better)"
    stages = ("pretrain", "shadow", "fit", "clients", "references", "eval", "total")
    seconds = ", ".join(f"{k} {t[k]:.0f}" for k in stages if k in t)
    return (f"scores: {results['metric']}{unit}; time (s): {seconds}; one translation "
            f"{1e3 * t['gradtx_generate_per_update']:.1f} ms vs one LLM fine-tune "
            f"{t['llm_finetune_per_run']:.2f} s")


# -----------------------------------------------------------------------------
# a finished run's tables again: python eval.py --out DIR


@dataclass
class ReportOptions:
    out: str = "out"   # the --out of a finished train.py run (its results.json is read)


def main(argv):
    """Print the tables of the finished run in --out again, from its results.json; returns them."""
    options = parse_options(ReportOptions(), argv, __doc__)
    path = os.path.join(options.out, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: expected the --out directory of a finished train.py "
                         "run (an experiment's tables: python experiments/sweep.py --tables)")
    with open(path) as f:
        text = report(json.load(f))
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
