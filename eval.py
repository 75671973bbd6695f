"""
eval.py -- scoring: accuracy, PGR and gain recovered, honest baselines, the results table.

    python train.py                 # runs everything and calls evaluate() at the end
    python eval.py --out=out        # re-score a finished run from its out directory

Every method gives the LLM (or, for the floor, the TinyLM) one update vector, scored on each
client's own test split by exact match of the parsed answer:

    llm_base     the LLM with no update
    tinylm_ft    TinyLM fine-tuned on the client's private data            P_S, the floor
    llm_ft       LLM fine-tuned on the client's private data               P_T, the ceiling
    gradtx       the Grad-Transformer's translation of the client's upload
    gradtx_pooled  one translation of the mean of all clients' uploads (the paper's multi-client)
    mean_shadow  the mean shadow LLM update: what the provider has with no client signal
    ridge        a linear map TinyLM update -> LLM update (ridge regression on the shadow pairs)
    public_llm   LLM fine-tuned on the whole public half
    w2s          LLM fine-tuned on the client's private inputs labelled by its TinyLM
    w2s_conf     the same with the auxiliary confidence loss (Burns et al. 2023)
    kd           data-free distillation: LLM fine-tuned on public prompts labelled by the client's
                 TinyLM (rebuilt from the upload: public base + update)

    PGR            = (P_method - P_S) / (P_T - P_S)
    gain recovered = (P_method - P_llm_base) / (P_T - P_llm_base)
"""
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import gradtx
import tinylm
import train

METHODS = ["llm_base", "tinylm_ft", "llm_ft", "gradtx", "gradtx_pooled", "mean_shadow", "ridge",
           "public_llm", "w2s", "w2s_conf", "kd"]

# -----------------------------------------------------------------------------
# metrics


@torch.no_grad()
def accuracy(model, lines):
    """Share of lines whose greedy answer, parsed after '=', equals the true answer."""
    answers = generate_answers(model, lines)
    return float(np.mean([a == data.parse_answer(line) for a, line in zip(answers, lines)]))


@torch.no_grad()
def generate_answers(model, lines):
    """The model's parsed answer (or None) to the question part of each line."""
    return [data.parse_answer(text) for text in completions(model, lines)]


@torch.no_grad()
def completions(model, lines, batch=1000):
    """The model's greedy continuation of each line's question '37@52', as text: '=>52\\n...'."""
    enc = data.get_tokenizer()
    prompts, _ = data.encode_prompts(lines, enc)
    out = []
    for i in range(0, len(lines), batch):
        gen = model.generate(prompts[i:i + batch].to(model.wte.weight.device), data.ANSWER_LEN)
        out += [enc.decode([t for t in row if t < 256]) for row in gen[:, data.PROMPT_LEN:].tolist()]
    return out


def pgr(p_method, p_floor, p_ceiling):
    """Performance gap recovered; None when floor and ceiling coincide (undefined), never clipped."""
    gap = p_ceiling - p_floor
    return None if abs(gap) < 1e-12 else (p_method - p_floor) / gap


def mean_defined(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# -----------------------------------------------------------------------------
# baselines that need a fit or extra data


def fit_ridge(X, Y, lam):
    """Ridge regression Y ~ X on z-scored, flattened updates, solved in the dual (N << dims)."""
    X, Y = X.flatten(1).double(), Y.flatten(1).double()
    stats = (X.mean(0), X.std(0) + 1e-8, Y.mean(0), Y.std(0) + 1e-8)
    Xz, Yz = (X - stats[0]) / stats[1], (Y - stats[2]) / stats[3]
    W = Xz.T @ torch.linalg.solve(Xz @ Xz.T + lam * torch.eye(len(X), dtype=X.dtype), Yz)
    return W, stats


def ridge_predict(ridge, X, out_shape):
    W, (xm, xs, ym, ys) = ridge
    pred = ((X.flatten(1).double() - xm) / xs) @ W * ys + ym
    return pred.float().view(len(X), *out_shape)


def select_ridge(X_train, Y_train, X_val, criterion, grid=(1e0, 1e1, 1e2, 1e3, 1e4, 1e5)):
    """Choose lambda by the same functional criterion as the translator's checkpoint."""
    scores = {lam: criterion(ridge_predict(fit_ridge(X_train, Y_train, lam), X_val, Y_train.shape[1:]))
              for lam in grid}
    lam = min(scores, key=scores.get)
    return fit_ridge(X_train, Y_train, lam), lam, scores


def relabel(model, lines):
    """Replace each line's answer by `model`'s greedy answer (lines it cannot answer are dropped)."""
    return [line[:data.PROMPT_LEN] + text.split("\n")[0] + "\n"
            for line, text in zip(lines, completions(model, lines)) if data.parse_answer(text) is not None]


# -----------------------------------------------------------------------------
# the evaluation


def evaluate(cfg, tiny, llm, translator, shadow, clients):
    t0, seconds = time.time(), {}

    def timed(name, fn, *args):  # what the provider's side costs: generating vs fine-tuning the LLM
        start = time.perf_counter()
        result = fn(*args)
        seconds.setdefault(name, []).append(time.perf_counter() - start)
        return result

    public_pairs, private_pairs = data.split_pairs(cfg.seed)
    train_runs, val_runs = train.split_runs(cfg)
    X_train, Y_train = shadow["X"][train_runs].flatten(0, 1), shadow["Y"][train_runs].flatten(0, 1)
    llm_shape = tuple(Y_train.shape[1:])
    criterion = train.functional_criterion(cfg, llm, public_pairs, val_runs)
    ridge, lam, _ = select_ridge(X_train, Y_train, shadow["X"][val_runs, -1], criterion)
    mean_update = Y_train.mean(0)
    rng = np.random.default_rng([cfg.seed, 4])
    public_lines = data.lines_from(public_pairs, data.TASK_MIXTURE, len(public_pairs), rng)
    public_update = train.finetune(llm, public_lines, cfg, seed=cfg.seed)[-1]
    pooled_update = gradtx.generate(translator, torch.stack([c["upload"] for c in clients]).mean(0))

    results = []
    for c in tqdm(clients, desc="evaluate clients", leave=False):
        train_lines, test_lines = data.client_data(private_pairs, c["mixture"].numpy(), cfg.n_train,
                                                   cfg.n_test, cfg.seed, c["index"])
        seed = 2_000_003 * cfg.seed + c["index"]
        # the floor is always the non-private TinyLM; with DP the client's own model is scored too
        floor_update = c["update"] if cfg.dp_epsilon <= 0 else train.finetune(tiny, train_lines, cfg, seed)[-1]
        tinylm.set_update(tiny, floor_update)
        scores = {"tinylm_ft": accuracy(tiny, test_lines)}
        weak_lines = relabel(tiny, train_lines)                                   # w2s data
        kd_lines = relabel(tiny, data.lines_from(public_pairs, data.TASK_MIXTURE, cfg.n_train, rng))
        if cfg.dp_epsilon > 0:
            tinylm.set_update(tiny, c["update"])
            scores["tinylm_dp"] = accuracy(tiny, test_lines)
        updates = {
            "llm_base": torch.zeros(llm_shape),
            "llm_ft": timed("finetune", train.finetune, llm, train_lines, cfg, seed)[-1],
            "gradtx": timed("generate", gradtx.generate, translator, c["upload"]),
            "gradtx_pooled": pooled_update,
            "mean_shadow": mean_update,
            "ridge": ridge_predict(ridge, c["upload"][None], llm_shape)[0],
            "public_llm": public_update,
            "w2s": train.finetune(llm, weak_lines, cfg, seed)[-1],
            "w2s_conf": train.finetune(llm, weak_lines, cfg, seed, conf_weight=0.5)[-1],
            "kd": train.finetune(llm, kd_lines, cfg, seed)[-1],
        }
        for name, update in updates.items():
            tinylm.set_update(llm, update)
            scores[name] = accuracy(llm, test_lines)
        floor, ceiling, base = scores["tinylm_ft"], scores["llm_ft"], scores["llm_base"]
        results.append({
            "name": c["name"], "kind": c["kind"], "mixture": [round(float(m), 4) for m in c["mixture"]],
            "scores": scores,
            "pgr": {k: pgr(v, floor, ceiling) for k, v in scores.items()},
            "gain_recovered": {k: pgr(v, base, ceiling) for k, v in scores.items()},
        })

    def summarise(rows):
        out = {key: {m: mean_defined([r[key][m] for r in rows]) for m in rows[0][key]}
               for key in ("scores", "pgr", "gain_recovered")}
        # the same ratios of the mean scores: robust where one client's gap is close to zero
        mean = out["scores"]
        out["pgr_of_means"] = {m: pgr(v, mean["tinylm_ft"], mean["llm_ft"]) for m, v in mean.items()}
        out["gain_of_means"] = {m: pgr(v, mean["llm_base"], mean["llm_ft"]) for m, v in mean.items()}
        return out

    summary = summarise(results)
    summary["by_kind"] = {kind: summarise([r for r in results if r["kind"] == kind])
                          for kind in sorted({r["kind"] for r in results})}
    summary["ridge_lambda"] = lam
    stage_seconds = train.stage_seconds(cfg)
    stage_seconds["eval"] = time.time() - t0
    stage_seconds["total"] = sum(stage_seconds.values())
    stage_seconds["gradtx_generate_per_update"] = float(np.mean(seconds["generate"]))
    stage_seconds["llm_finetune_per_run"] = float(np.mean(seconds["finetune"]))
    sigma = train.privacy(cfg)
    out = {
        "task": "arith", "metric": "accuracy", "higher_is_better": True,
        "config": train.asdict(cfg),
        "clients": results,
        "summary": summary,
        "privacy": {"epsilon": cfg.dp_epsilon if cfg.dp_epsilon > 0 else None, "delta": cfg.dp_delta,
                    "noise_multiplier": sigma if sigma is not None else 0.0, "clip": cfg.dp_clip,
                    "output_epsilon": cfg.out_epsilon if cfg.out_epsilon > 0 else None,
                    "output_clip": cfg.out_clip},
        "timing_s": stage_seconds,
    }
    path = os.path.join(cfg.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"eval      : {len(results)} clients x {len(METHODS)} methods, {stage_seconds['eval']:.1f}s -> {path}\n")
    print(results_table(out))
    return out


# -----------------------------------------------------------------------------
# the table a person reads


def results_table(results):
    """Markdown: one row per method, accuracy per client, then PGR and gain recovered, both as
    the mean of the per-client ratios and as the ratio of the mean scores ("of means")."""
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    clients, summary = results["clients"], results["summary"]
    skewed = summary["by_kind"].get("skewed", summary)
    head = ([m for m in ["method"]] + [c["name"] for c in clients]
            + ["mean PGR", "mean gain", "PGR of means", "gain of means", "skewed: gain of means"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in sorted(clients[0]["scores"], key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS)):
        row = ([m] + [fmt(c["scores"][m]) for c in clients]
               + [fmt(summary["pgr"][m]), fmt(summary["gain_recovered"][m]),
                  fmt(summary["pgr_of_means"][m]), fmt(summary["gain_of_means"][m]),
                  fmt(skewed["gain_of_means"][m])])
        lines.append("| " + " | ".join(row) + " |")
    t = results["timing_s"]
    lines.append("\ntime (s): " + ", ".join(f"{k} {t[k]:.0f}" for k in ("pretrain", "shadow", "fit", "clients", "eval", "total"))
                 + f"; one translation {1e3 * t['gradtx_generate_per_update']:.1f} ms vs one LLM "
                 f"fine-tune {t['llm_finetune_per_run']:.2f} s")
    return "\n".join(lines)


def rescore(out):
    """Re-run the evaluation of a finished run from its out directory (every stage is cached)."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: expected the --out directory of a train.py run")
    with open(path) as f:
        saved = json.load(f)
    return train.main([f"--{k}={v}" for k, v in saved.items()])


if __name__ == "__main__":
    outs = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")]
    if len(outs) != 1 or len(sys.argv) != 2:
        raise SystemExit("usage: python eval.py --out=DIR   (DIR: the --out of a train.py run)")
    rescore(outs[0])
