"""
eval.py -- scoring: the task's metric, PGR and gain recovered, honest baselines, the tables.

    python train.py                 # runs everything and calls evaluate() at the end
    python eval.py --out=out        # print the tables of a finished run (or experiment) again

Every method gives the LLM (or, for the floor, the TinyLM) one update vector, scored on each
client's own test split (arith: accuracy of the parsed answer; text: bits per byte, lower is
better):

    llm_base      the LLM with no update
    tinylm_ft     TinyLM fine-tuned on the client's private data, no DP          P_S, the floor
    tinylm_dp     (DP runs) the client's own DP TinyLM: the model behind its upload
    llm_ft        LLM fine-tuned on the client's private data, no DP             P_T, the ceiling
    gradtx        the Grad-Transformer's translation of the client's upload
    gradtx_group  (groups) one translation of the mean upload of the client's convention group
    ridge         the linear map alone (public subspace + ridge regression on the same shadow pairs)
    ridge_group   (groups) the linear map on the group's mean upload
    mean_shadow   the mean shadow LLM update: what the provider has with no client signal
    public_llm    LLM fine-tuned on the whole public half
    w2s           LLM fine-tuned on the client's private inputs labelled by the client's TinyLM
    w2s_conf      the same with the auxiliary confidence loss (Burns et al. 2023)
    kd            data-free distillation: LLM fine-tuned on public prompts labelled by the client's
                  TinyLM (the provider can rebuild it from the upload: public base + update)
    (w2s, w2s_conf and kd use the client's own TinyLM: the DP one in DP runs.)

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
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import data
import gradtx
import tinylm

METHODS = ["llm_base", "tinylm_ft", "tinylm_dp", "llm_ft", "gradtx", "gradtx_group", "ridge",
           "ridge_group", "mean_shadow", "public_llm", "w2s", "w2s_conf", "kd"]

# -----------------------------------------------------------------------------
# metrics


@torch.no_grad()
def completions(task, model, prompts, n_tokens, temperature=0.0, generator=None, batch=1000):
    """The model's continuation (n_tokens, greedy at temperature 0) of each prompt, as text."""
    enc, out = task.enc, [None] * len(prompts)
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
    """Held-out cross-entropy in bits per byte: the tokenizer is byte-level, so one token = one
    byte."""
    return tinylm.loss_of(model, *task.encode(examples)) / math.log(2)


def score(task, model, examples):
    if task.metric == "accuracy":
        return accuracy(task, model, examples)
    return bits_per_byte(task, model, examples)


def pgr(p_method, p_floor, p_ceiling):
    """Performance gap recovered; None when floor and ceiling coincide (undefined), never
    clipped."""
    gap = p_ceiling - p_floor
    return None if abs(gap) < 1e-12 else (p_method - p_floor) / gap


def mean_defined(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def relabel(task, model, examples, generator):
    """Each example's prompt completed by `model` (arith: its greedy answer; text: a sampled
    continuation); examples it gives no usable answer to are dropped."""
    prompts = [task.prompt(e) for e in examples]
    texts = completions(task, model, prompts, task.completion_len, task.label_temperature,
                        generator)
    return [r for r in (task.relabelled(p, t) for p, t in zip(prompts, texts)) if r is not None]


def reference_updates(task, tiny, llm, train, own_update, recipe, seed, rng):
    """The LLM fine-tunes a client's results are compared with; they use data the provider never
    sees. llm_ft: the client's private data (the ceiling). Given own_update, the client's TinyLM
    update (the DP one under DP-SGD; None: skip them): w2s / w2s_conf, the client's inputs labelled
    by its TinyLM, and kd, public prompts labelled by it. Also the seconds llm_ft took."""
    g = torch.Generator().manual_seed(seed)

    def finetune_llm(examples, conf_weight=0.0):
        # a weak model that answers nothing teaches nothing: the LLM stays as it is
        if not examples:
            return torch.zeros(tinylm.update_shape(llm.cfg, llm.lora[0]))
        return tinylm.finetune(llm, *task.encode(examples), recipe, seed,
                               conf_weight=conf_weight)[-1]

    t0 = time.perf_counter()
    out = {"llm_ft": finetune_llm(train), "seconds": time.perf_counter() - t0}
    if own_update is not None:
        tinylm.set_update(tiny, own_update)
        weak = relabel(task, tiny, train, g)
        kd = relabel(task, tiny, task.public_examples(len(train), rng), g)
        out.update(w2s=finetune_llm(weak), w2s_conf=finetune_llm(weak, 0.5), kd=finetune_llm(kd))
    return out


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
            "threads": torch.get_num_threads()}


# -----------------------------------------------------------------------------
# the evaluation


def fit_runs(cfg):
    """(train, validation) shadow runs of a configuration's fit: the first fit_shadow of the
    n_shadow curated subsets (all of them by default), split by run (gradtx.split_runs)."""
    return gradtx.split_runs(cfg.fit_shadow or cfg.n_shadow, cfg.val_frac, cfg.seed)


def evaluate(cfg, task, tiny, llm, translators, shadow, clients, recipe, stage_seconds, privacy):
    """Score every method on every client; write results.json into cfg.out and print the tables.

    translators: {m: gradtx.Translator(model, log)} for inputs that average m uploads; the fit log
    holds the selected linear map (basis, ridge) that is the `ridge` baseline."""
    t0, seconds = time.time(), {"generate": [], "finetune": []}
    llm_shape = tuple(shadow["Y"].shape[2:])
    train_runs, _ = fit_runs(cfg)
    mean_update = shadow["Y"][train_runs].flatten(0, 1).mean(0)
    rng = data.stream(cfg.seed, "public examples")

    # the Grad-Transformer trained for inputs that average m uploads
    def translate(upload, m=1):
        start = time.perf_counter()
        update = gradtx.generate(translators[m].model, upload)
        seconds["generate"].append(time.perf_counter() - start)
        return update

    def linear(upload, m=1):           # the selected linear map alone
        log = translators[m].log
        return gradtx.ridge_predict(log["ridge"],
                                    gradtx.project(upload[None], log["basis"])).view(llm_shape)

    shared = {"llm_base": torch.zeros(llm_shape), "mean_shadow": mean_update,
              "public_llm": tinylm.finetune(llm, *task.encode(task.public_examples(None, rng)),
                                            recipe, cfg.seed)[-1]}
    groups = {}
    for c in clients:
        groups.setdefault(c["group"], []).append(c)
    pooled = {name: pooling_updates(members, translators, translate, linear)
              for name, members in groups.items()}

    results = []
    for c in tqdm(clients, desc="evaluate clients", leave=False):
        test = c["test"]
        scores = {"tinylm_ft": score(task, tinylm.set_update(tiny, c["floor_update"]), test)}
        if cfg.dp_epsilon > 0:
            scores["tinylm_dp"] = score(task, tinylm.set_update(tiny, c["upload"]), test)
        seconds["finetune"].append(c["references"]["seconds"])
        updates = dict(shared, gradtx=translate(c["upload"]), ridge=linear(c["upload"]),
                       **{k: v for k, v in c["references"].items() if k != "seconds"})
        curve = pooled[c["group"]]
        if len(groups[c["group"]]) > 1:
            M = max(curve)
            updates.update(gradtx_group=curve[M]["gradtx"], ridge_group=curve[M]["ridge"])
        # many methods give the same update (a translator at its linear map, m = M): score it once
        memo = {}

        def score_update(update):
            key = update.numpy().tobytes()
            if key not in memo:
                memo[key] = score(task, tinylm.set_update(llm, update), test)
            return memo[key]

        scores.update({name: score_update(update) for name, update in updates.items()})
        pooling = {m: {variant: score_update(u) for variant, u in point.items()}
                   for m, point in curve.items()} if len(groups[c["group"]]) > 1 else {}
        floor, ceiling, base = scores["tinylm_ft"], scores["llm_ft"], scores["llm_base"]
        # with DP: how far the translator trusted this upload (1: fully)
        gate = translators[1].model.gate
        results.append({
            "name": c["name"], "group": c["group"], "kind": c["kind"], "mixture": c["mixture"],
            "gate_weight": (None if gate is None
                            else gradtx.gate_weight(gate, c["upload"][None].float()).item()),
            "scores": scores, "pooling": pooling,
            "pgr": {k: pgr(v, floor, ceiling) for k, v in scores.items()},
            "gain_recovered": {k: pgr(v, base, ceiling) for k, v in scores.items()},
        })

    summary = summarise(results, task.higher_is_better)
    summary["by_kind"] = {kind: summarise([r for r in results if r["kind"] == kind],
                                          task.higher_is_better)
                          for kind in sorted({r["kind"] for r in results})}
    timing = dict(stage_seconds, eval=time.time() - t0)
    timing["total"] = sum(timing.values())
    timing["gradtx_generate_per_update"] = float(np.mean(seconds["generate"]))
    timing["llm_finetune_per_run"] = float(np.mean(seconds["finetune"]))
    out = {
        "task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
        "config": asdict(cfg), "provenance": provenance(llm.wte.weight.device),
        "clients": results, "summary": summary, "privacy": privacy,
        "translators": {m: translator_summary(t.log) for m, t in translators.items()},
        "timing_s": timing,
    }
    path = os.path.join(cfg.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"eval      : {len(results)} clients, {time.time() - t0:.1f}s -> {path}\n", flush=True)
    print(report(out))
    return out


def translator_summary(log):
    """What results.json keeps of a fit log: the selection, the losses and the fit curve."""
    keys = ("k", "ridge_lambda", "ridge_loss", "best_step", "val_loss", "mean_shadow_loss",
            "true_update_loss", "seconds")
    return {**{k: log[k] for k in keys}, "linear_seconds": log.get("linear_seconds"),
            "upload_signal": log.get("upload_signal"),   # absent from fit logs made before it
            "history": log["history"]}                   # the fit curve (tools/plots.py)


def pooling_updates(members, translators, translate, linear):
    """The paper's multi-organization setting: the element-wise mean of the first m uploads of a
    convention group, translated once, for m = 1, 2, 4, ..., M. Each member keeps its own (eps,
    delta) guarantee: the mean is post-processing of the members' DP releases and touches no private
    data.

    "gradtx"/"ridge" use the map trained for inputs that average m uploads (their noise level);
    "gradtx_single_map" uses the map for one upload, to measure whether matching the level
    matters."""
    curve = {}
    for m in pool_sizes(len(members)) if len(members) > 1 else []:
        mean_upload = torch.stack([c["upload"] for c in members[:m]]).mean(0)
        level = m if m in translators else 1
        curve[m] = {"gradtx": translate(mean_upload, level), "ridge": linear(mean_upload, level)}
        if level != 1:
            curve[m]["gradtx_single_map"] = translate(mean_upload, 1)
    return curve


def pool_sizes(M):
    """How many uploads are pooled along a group's curve: 1, 2, 4, ... and M itself."""
    return tuple(sorted({*(2 ** i for i in range(int(math.log2(M)) + 1)), M}))


def summarise(rows, higher_is_better=True):
    out = {key: {m: mean_defined([r[key].get(m) for r in rows]) for m in rows[0][key]}
           for key in ("scores", "pgr", "gain_recovered")}
    # do no harm: the worst client's score against the mean shadow update, which the provider always
    # has (in the metric's units, positive = better than the mean update, whatever the metric's
    # direction)
    sign = 1 if higher_is_better else -1
    out["worst_vs_mean_shadow"] = {m: min(sign * (r["scores"][m] - r["scores"]["mean_shadow"])
                                          for r in rows)
                                   for m in rows[0]["scores"]}
    # the same ratios of the mean scores: robust where one client's gap is close to zero
    mean = out["scores"]
    out["pgr_of_means"] = {m: pgr(v, mean["tinylm_ft"], mean["llm_ft"]) for m, v in mean.items()}
    out["gain_of_means"] = {m: pgr(v, mean["llm_base"], mean["llm_ft"]) for m, v in mean.items()}
    if rows[0]["pooling"]:
        out["pooling_gain_of_means"] = {
            m: {variant: pgr(float(np.mean([r["pooling"][m][variant] for r in rows])),
                             mean["llm_base"], mean["llm_ft"])
                for variant in point} for m, point in rows[0]["pooling"].items()}
    return out


# -----------------------------------------------------------------------------
# the tables a person reads

fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731


def ordered(methods):
    return sorted(methods, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))


def results_table(results):
    """Markdown: one row per method, the score per convention group (mean over its members), then
    PGR and gain recovered as the mean of per-client ratios and as the ratio of the mean scores."""
    clients, summary = results["clients"], results["summary"]
    # arith's skewed clients: where the upload must speak
    skewed = summary["by_kind"].get("skewed")
    groups = list(dict.fromkeys(c["group"] for c in clients))
    if skewed is None:
        return gain_first_table(results, groups)
    head = (["method"] + groups + ["mean PGR", "mean gain", "PGR of means", "gain of means"]
            + (["skewed: gain of means"] if skewed else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ordered(clients[0]["scores"]):
        per_group = [mean_defined([c["scores"][m] for c in clients if c["group"] == g])
                     for g in groups]
        row = ([m] + [fmt(v) for v in per_group]
               + [fmt(summary["pgr"][m]), fmt(summary["gain_recovered"][m]),
                  fmt(summary["pgr_of_means"][m]), fmt(summary["gain_of_means"][m])]
               + ([fmt(skewed["gain_of_means"][m])] if skewed else []))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gain_first_table(results, groups):
    """The text task's table: every client's upload must speak, and PGR is ~1 for every LLM method
    (the bare LLM already beats the fine-tuned TinyLM), so gain recovered leads -- of the mean
    scores, then per client -- and the scores (bits per byte) follow."""
    clients, summary = results["clients"], results["summary"]
    unit = "bpb" if results["metric"] == "bits_per_byte" else results["metric"]
    head = (["method", "gain of means"] + [f"{g}: gain" for g in groups]
            + [f"{g}: {unit}" for g in groups] + ["PGR of means"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ordered(clients[0]["scores"]):
        members = [[c for c in clients if c["group"] == g] for g in groups]
        row = ([m, fmt(summary["gain_of_means"][m])]
               + [fmt(mean_defined([c["gain_recovered"][m] for c in cs])) for cs in members]
               + [f"{mean_defined([c['scores'][m] for c in cs]):.3f}" for cs in members]
               + [fmt(summary["pgr_of_means"][m])])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pooling_table(results):
    """Gain recovered (of means) against the number m of pooled uploads, per kind of group."""
    by_kind = results["summary"]["by_kind"]
    if not all("pooling_gain_of_means" in s for s in by_kind.values()):
        return ""
    sizes = list(next(iter(by_kind.values()))["pooling_gain_of_means"])
    lines = ["| kind | map | " + " | ".join(f"m={m}" for m in sizes) + " |", "|---|---|"
             + "---|" * len(sizes)]
    for kind, s in by_kind.items():
        curve = s["pooling_gain_of_means"]
        for variant in ("gradtx", "ridge", "gradtx_single_map"):
            if any(variant in curve[m] for m in sizes):
                lines.append(f"| {kind} | {variant} | "
                             + " | ".join(fmt(curve[m].get(variant)) for m in sizes) + " |")
    return "\n".join(lines)


def report(results):
    t = results["timing_s"]
    text = results_table(results)
    if pooling := pooling_table(results):
        text += ("\n\npooling curve: gain recovered (of means) vs number of pooled uploads m\n\n"
                 + pooling)
    unit = "" if results["metric"] == "accuracy" else f" ({results['metric']}, lower is better)"
    return (text + f"\n\nscores: {results['metric']}{unit}; time (s): "
            + ", ".join(f"{k} {t[k]:.0f}"
                        for k in ("pretrain", "shadow", "fit", "clients", "references", "eval",
                                                     "total") if k in t)
            + f"; one translation {1e3 * t['gradtx_generate_per_update']:.1f} ms vs one LLM "
            f"fine-tune {t['llm_finetune_per_run']:.2f} s")


FRONTIER_METHODS = ["gradtx", "ridge", "tinylm_dp", "w2s", "kd", "mean_shadow"]


def frontier_points(runs):
    """The privacy-utility frontier, one point per (N, epsilon, m): the skewed clients' gain
    recovered (of means) per method and the worst client against the mean shadow update, at x = N *
    epsilon * sqrt(m), the upload's signal-to-noise axis (pooling m uploads divides the noise by
    about sqrt(m)). A run with groups gives one point per pooled size m, its translator for that
    noise level (gradtx, ridge) against the same mean shadow update."""
    points = []
    for r in runs:
        N, eps = r["config"]["n_train"], r["privacy"]["epsilon"]
        sigma = r["privacy"]["noise_multiplier"]
        skewed, clients = r["summary"]["by_kind"]["skewed"], r["clients"]
        sign = 1 if r["higher_is_better"] else -1
        pooled = skewed.get("pooling_gain_of_means")
        for m in (pooled or {1: None}):
            m = int(m)
            if pooled:
                curve = pooled[m] if m in pooled else pooled[str(m)]
                gain = {k: curve[k] for k in ("gradtx", "ridge")}
                worst = {k: min(sign * (c["pooling"][m if m in c["pooling"] else str(m)][k]
                                        - c["scores"]["mean_shadow"]) for c in clients)
                         for k in gain}
                gain["mean_shadow"] = skewed["gain_of_means"]["mean_shadow"]
                worst["mean_shadow"] = 0.0
            else:
                gain = {k: skewed["gain_of_means"][k]
                        for k in FRONTIER_METHODS if k in skewed["gain_of_means"]}
                worst = {k: r["summary"]["worst_vs_mean_shadow"][k] for k in gain}
            points.append({"n_train": N, "epsilon": eps, "m": m, "nem": N * eps * math.sqrt(m),
                           "group_size": r["config"]["group_size"],
                           "sigma": sigma, "gain": gain, "worst_vs_mean_shadow": worst})
    return points


def frontier_table(runs):
    points = sorted(frontier_points(runs), key=lambda p: p["nem"])
    head = (["N", "epsilon", "m", "N·ε·√m", "sigma"] + FRONTIER_METHODS
            + ["worst client vs mean_shadow (gradtx)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        row = ([str(p["n_train"]), f"{p['epsilon']:g}", str(p["m"]), f"{p['nem']:.0f}",
                f"{p['sigma']:.2f}"] + [fmt(p["gain"].get(k)) for k in FRONTIER_METHODS]
               + [f"{p['worst_vs_mean_shadow']['gradtx']:+.2f}"])
        lines.append("| " + " | ".join(row) + " |")
    return ("skewed clients: gain recovered of means, against each client's NON-private llm_ft; "
            "worst client: the\n"
            "lowest score minus the mean shadow update's score over every client, the IID one "
            "included\n\n"
            + "\n".join(lines))


SHADOW_COUNT_METHODS = ["gradtx_paper", "gradtx", "ridge", "mean_shadow"]


def shadow_count_rows(runs):
    """The shadow-count curve, one row per (privacy level, K, method[, init]): the skewed clients'
    gain recovered (of means), per client too, and the provider's bill for it -- its shadow
    fine-tunes and seconds: this prefix's share of the curation (K of the n_shadow subsets) plus the
    fit. A run fits one translator on the first K subsets: the paper's (gt_skip off) or this
    project's (with its linear map, `ridge`, and `mean_shadow`, reported from init 0). Where several
    inits were fitted, "gradtx_best_init" is the one the held-out criterion picks, billed for all of
    them."""
    rows = []
    for r in runs:
        c, eps, timing = r["config"], r["privacy"]["epsilon"], r["timing_s"]
        K = c["fit_shadow"] or c["n_shadow"]
        fit = next(iter(r["translators"].values()))     # one noise level: single uploads
        curation = timing["shadow"] * K / c["n_shadow"]
        skewed = [cl for cl in r["clients"] if cl["kind"] == "skewed"]
        level = {"K": K, "epsilon": eps, "n_train": c["n_train"],
                 "shadow_finetunes": K * (2 + (c["shadow_dp_draws"] if eps else 0)),
                 "llm_finetune_seconds": timing["llm_finetune_per_run"]}
        paper = not c["gt_skip"]
        methods = {("gradtx_paper" if paper else "gradtx"): ("gradtx", fit["seconds"])}
        if not paper and c["gt_init"] == 0:
            methods.update(ridge=("ridge", fit["linear_seconds"]), mean_shadow=("mean_shadow", 0.0))
        for method, (key, fit_seconds) in methods.items():
            rows.append(dict(level, method=method, init=c["gt_init"] if key == "gradtx" else None,
                             val_loss=fit["val_loss"] if key == "gradtx" else None,
                             skewed_gain=r["summary"]["by_kind"]["skewed"]["gain_of_means"][key],
                             clients={cl["name"]: cl["gain_recovered"][key] for cl in skewed},
                             curation_seconds=curation, fit_seconds=fit_seconds,
                             seconds=curation + fit_seconds))
    inits = {}
    for row in rows:
        if row["method"] == "gradtx":
            inits.setdefault((row["n_train"], row["epsilon"], row["K"]), []).append(row)
    for tried in (t for t in inits.values() if len(t) > 1):
        best = min(tried, key=lambda row: row["val_loss"])
        fit_seconds = sum(row["fit_seconds"] for row in tried)
        rows.append(dict(best, method="gradtx_best_init", fit_seconds=fit_seconds,
                         seconds=best["curation_seconds"] + fit_seconds))
    return rows


def shadow_count_table(rows):
    """Markdown: per privacy level, one line per K: each method's skewed gain, the spread over the
    translator's inits, and the provider's bill (gradtx) in seconds and in LLM fine-tunes."""
    lines = []
    levels = sorted({(r["n_train"], r["epsilon"]) for r in rows},   # no DP first, then by epsilon
                    key=lambda level: (level[1] is not None, -(level[1] or 0), level[0]))
    for n_train, eps in levels:
        level = [r for r in rows if (r["n_train"], r["epsilon"]) == (n_train, eps)]
        Ks = sorted({r["K"] for r in level})
        multi = any(r["method"] == "gradtx_best_init" for r in level)
        head = (["K", "shadow fine-tunes"] + SHADOW_COUNT_METHODS
                + (["gradtx over inits (min-max)", "gradtx_best_init"] if multi else [])
                + ["provider s (gradtx)", "= LLM fine-tunes"])
        lines += [f"\n{'no DP' if eps is None else f'DP-SGD eps = {eps:g}'}, clients of "
                  f"{n_train} records:\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for K in Ks:
            at = {r["method"]: r for r in level if r["K"] == K and r["init"] in (0, None)}
            ours = at["gradtx"]
            row = ([str(K), str(ours["shadow_finetunes"])]
                   + [fmt(at[m]["skewed_gain"] if m in at else None) for m in SHADOW_COUNT_METHODS])
            if multi:
                spread = [r["skewed_gain"] for r in level if r["K"] == K and r["method"] == "gradtx"
                          and r["skewed_gain"] is not None]
                best = next(r for r in level if r["K"] == K and r["method"] == "gradtx_best_init")
                row += [f"{fmt(min(spread, default=None))}-{fmt(max(spread, default=None))}",
                        fmt(best["skewed_gain"])]
            bill = ours["seconds"]
            row += [f"{bill:.0f}", f"{bill / ours['llm_finetune_seconds']:.0f}"]
            lines.append("| " + " | ".join(row) + " |")
    return ("skewed clients: gain recovered of means; the provider's bill: its share of the "
            "shadow curation\n(K of the curated subsets) plus the fit, in seconds and in LLM "
            "fine-tunes of one client's size\n" + "\n".join(lines))


def upload_signal(translator):
    """The mean correlation of a translator's inputs with the clean updates along the top public
    directions (train.fit_stage); 1 without DP, where the inputs are the clean updates."""
    signal = translator.get("upload_signal")
    return 1.0 if signal is None else float(np.mean(signal))


def experiment_table(name, runs):
    """One row per run of an experiment: the privacy setting, then skewed clients' gain recovered
    (and PGR) of means per method; the collaboration experiment adds the pooling curve."""
    if name == "frontier":
        return frontier_table(runs)
    if name == "shadow_count":
        return shadow_count_table(shadow_count_rows(runs))
    methods = ["tinylm_dp", "gradtx", "ridge", "gradtx_group", "ridge_group", "mean_shadow", "w2s",
               "kd"]
    methods = [m for m in methods if any(m in r["summary"]["scores"] for r in runs)]
    head = ["epsilon", "mechanism", "sigma", "k", "signal"] + [f"{m} gain (PGR)" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        p, s = r["privacy"], r["summary"]["by_kind"].get("skewed", r["summary"])
        row = ["inf" if p["epsilon"] is None else f"{p['epsilon']:g}", p["mechanism"] or "-",
               f"{p['noise_multiplier']:.2f}", "/".join(str(k) for k in p["subspace_k"].values()),
               "/".join(fmt(upload_signal(t)) for t in r["translators"].values())]
        row += [f"{fmt(s['gain_of_means'].get(m))} ({fmt(s['pgr_of_means'].get(m))})"
                for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    text = ("skewed clients: gain recovered of means (PGR of means), against the NON-private floor "
            "and ceiling;\n"
            "signal: how much the uploads say about the data (correlation with the clean update "
            "along the\n"
            f"top {gradtx.SIGNAL_DIRECTIONS} public directions, their mean; 1: the noise does not "
            "matter, 0: nothing to translate)\n\n")
    text += "\n".join(lines)
    for r in runs:
        if pooling := pooling_table(r):
            eps = r["privacy"]["epsilon"]
            text += f"\n\npooling curve at epsilon = {'inf' if eps is None else eps}:\n\n" + pooling
    return text


def write_experiment(name, runs, out):
    """An experiment's table into `out/<name>.md` (and the frontier's points into `frontier.json`,
    which tools/plots.py draws); returns the table."""
    table = experiment_table(name, runs)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    points = {"frontier": frontier_points, "shadow_count": shadow_count_rows}
    if name in points:   # the figure's data (tools/plots.py)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"rows": points[name](runs)}, f, indent=1)
    return table


def load_runs(out):
    """The results of an experiment's runs: one subfolder of `out` each, in name order."""
    paths = sorted(os.path.join(out, d, "results.json") for d in os.listdir(out))
    runs = []
    for path in (p for p in paths if os.path.exists(p)):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


if __name__ == "__main__":
    outs = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")]
    if len(outs) != 1 or len(sys.argv) != 2:
        raise SystemExit("usage: python eval.py --out=DIR   (DIR: the --out of a train.py run or "
                         "experiment)")
    path = os.path.join(outs[0], "results.json")
    experiments = [n for n in ("dp", "collab", "frontier", "shadow_count")
                   if os.path.exists(os.path.join(outs[0], f"{n}.md"))]
    if os.path.exists(path):
        with open(path) as f:
            print(report(json.load(f)))
    elif experiments:   # an experiment: its table (and the frontier's points) again, from its runs
        print(write_experiment(experiments[0], load_runs(outs[0]), outs[0]))
    else:
        raise SystemExit(f"{path} not found: expected the --out directory of a finished train.py "
                         "run or experiment")
