"""
experiments/kd_candidate.py -- would the provider ever send distillation? At each point of a
finished frontier, `kd` (the LLM fine-tuned on public prompts labelled by the TinyLM the provider
rebuilds from an upload: post-processing of the same DP output, at no privacy cost) is scored on
the held-out shadow runs exactly as the provider's choice scores its candidates (train.py,
`held_out_uploads`): the LLM's accuracy with each update on fresh records of the run's mixture,
minus the mean update's. Then `gradtx.choose` decides again with kd among the candidates.

    python experiments/kd_candidate.py --out=out_frontier         # every single-upload point
    python experiments/kd_candidate.py --out=out_frontier --points=n2048_eps0.1_sgd
    python experiments/kd_candidate.py --help

kd costs an LLM fine-tune per upload where every other candidate costs a translation: a minute a
point for the choice's 48 held-out uploads (12 runs x 4 DP draws; --draws=1 scores the first draw
of each run, every candidate on those same uploads). Writes kd_candidate.md and kd_candidate.json
into --out. It reads the frontier's cached stages (its runs' --cache) and fits nothing: run it
after the frontier.
"""
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import eval as evaluation
import gradtx
import tinylm
import train
from config import stages
from config.presets import CHECK_PROMPTS, Config, parse_options, recipe


@dataclass
class PointsConfig:
    """The options of an experiment that scores a finished frontier's points (this one,
    experiments/shrinkage.py, threshold.py, corners.py)."""
    out: str = "out_frontier"   # a finished frontier: one run folder (results.json) per point
    points: str = ""            # run folders to score, comma-separated ("" = every single-upload)
    draws: int = 0              # DP draws per held-out run scored (0: all, as the choice does)
    threads: int = 0            # torch threads (0: torch's default)


def parse_args(argv):
    """--key=value (or --key value) over PointsConfig's fields; --help lists them."""
    return parse_options(PointsConfig(), argv, __doc__)


def point_names(out, points=""):
    """The run folders of a finished frontier in `out` to score: `points` (comma-separated), or
    every single-upload point (a run with groups has "_m" in its name)."""
    if not os.path.isdir(out):
        raise SystemExit(f"--out={out}: no such folder (expected a finished frontier)")
    return [p for p in points.split(",") if p] or sorted(
        d for d in os.listdir(out)
        if os.path.exists(os.path.join(out, d, "results.json")) and "_m" not in d)


def run_config(folder):
    """The Config a finished run was made with (its results.json), pointed at its folder."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{folder}: no results.json (expected a finished frontier run)")
    with open(path) as f:
        saved = json.load(f)["config"]
    cfg = Config(**{k: v for k, v in saved.items() if k in Config.__dataclass_fields__})
    if cfg.dp_epsilon <= 0 or cfg.group_size > 1:
        raise SystemExit(f"{folder}: expected a DP run of single uploads (a frontier point)")
    return replace(cfg, out=folder, workers=1)


def kd_updates(cfg, task, tiny, llm, uploads, runs):
    """kd for each raw upload (U, n_src, d_src): the TinyLM rebuilt from it labels cfg.n_train
    public prompts (as eval.reference_sets does for a client), the LLM fine-tunes on them with the
    published recipe. (U, n_tgt, d_tgt)."""
    datasets, seeds = [], []
    for upload, k in zip(uploads, runs):
        seed = data.run_seed(cfg.seed, "kd candidate", int(k))
        prompts = task.public_examples(cfg.n_train, data.stream(cfg.seed, "kd prompts", int(k)))
        tinylm.set_update(tiny, upload)
        labelled = evaluation.relabel(task, tiny, prompts, torch.Generator().manual_seed(seed))
        datasets.append(task.encode(labelled) if labelled else None)
        seeds.append(seed)
    fine_tuned = train.fine_tunes(cfg, llm, datasets, recipe(cfg), seeds)
    return torch.stack([run[-1] for run in fine_tuned])


class Provider(NamedTuple):
    """What the provider holds at one finished frontier point, read from the run's cache."""
    task: object
    tiny: torch.nn.Module     # the public TinyLM
    llm: torch.nn.Module      # the public LLM
    shadow: dict              # the shadow stages (train.shadow_stages)
    model: torch.nn.Module    # the translator, with its basis, skip path and gate in its buffers
    log: dict                 # its fit log (the linear map: log["ridge"])
    fallback: torch.Tensor    # the mean shadow update (n_tgt, d_tgt)
    paths: dict               # the run's stage paths (config/stages.py), its clients' among them
    check: object             # the provider's check (eval.tinylm_check), for "checked"


def provider_at(cfg):
    """The run's cached stages at one frontier point; refuses a point whose translator is not in
    the cache (this reads the run's stages, it fits nothing)."""
    task = data.make_task(cfg.task, cfg.seed)
    paths = stages.stage_paths(cfg, task, (1,), "cpu")
    if not os.path.exists(paths["fit_1"]):   # this code's cache keys: the run's stages, or none
        raise SystemExit(f"{cfg.out}: its translator is not in the cache ({paths['fit_1']}): run "
                         "the frontier at this commit first (this scores it, it fits nothing)")
    tiny, llm = train.base_models(cfg, task, paths, "cpu")
    shadow = train.shadow_stages(cfg, task, tiny, llm, paths, "cpu")
    model, log = train.fit_stage(cfg, task, tiny, llm, shadow, paths["fit_1"], 1)
    return Provider(task, tiny, llm, shadow, model, log, train.mean_shadow_update(cfg, shadow),
                    paths, evaluation.tinylm_check(task, tiny, llm, CHECK_PROMPTS, cfg.seed))


def score_point(cfg, draws):
    """Every candidate's and kd's held-out gains over the mean update at one frontier point, on
    the first `draws` DP draws of each held-out run. {"gains": {name: (U,)}, "runs": (U,),
    "weight": (U,) the gate's weight of each upload}."""
    p = provider_at(cfg)
    # the uploads, held-out records and mean update the run's choice was scored on
    held = train.held_out_uploads(cfg, p.task, p.llm, p.shadow, p.fallback, 1, draws)
    updates = {c: gradtx.candidate_update(p.model, held.uploads, c, p.log["ridge"], p.fallback,
                                          p.check)
               for c in gradtx.CANDIDATES}
    updates["kd"] = kd_updates(cfg, p.task, p.tiny, p.llm, held.uploads, held.shadow_runs)
    updates["kd_hard"] = gradtx.do_no_harm(p.model.gate, updates["kd"], held.uploads, hard=True)
    weight = gradtx.gate_weight(p.model.gate, held.uploads).numpy()
    return {"gains": {name: held.gain(u) for name, u in updates.items()}, "runs": held.runs,
            "weight": weight}


def point_row(name, cfg, scored, budget):
    """One line of the table: the choice among the candidates alone, kd's and kd_hard's scores,
    and the choice with kd (last in the order, then first)."""
    gains, runs = scored["gains"], scored["runs"]
    alone = gradtx.choose({c: gains[c] for c in gradtx.CANDIDATES}, runs, budget)
    kd = ("kd_hard", "kd")
    orders = {"last": gradtx.CANDIDATES + kd, "first": kd + gradtx.CANDIDATES}
    choose_with = {where: gradtx.choose(gains, runs, budget, order).candidate
                   for where, order in orders.items()}
    score = {name: [float(np.mean(g)), float(np.maximum(-g, 0).mean())]
             for name, g in gains.items()}
    return {"point": name, "n_train": cfg.n_train, "epsilon": cfg.dp_epsilon,
            "chosen": alone.candidate, "chosen_score": score.get(alone.candidate, [0.0, 0.0]),
            "kd": score["kd"], "kd_hard": score["kd_hard"], "with_kd_last": choose_with["last"],
            "with_kd_first": choose_with["first"], "scores": score}


def gain_loss(score):
    return f"{score[0]:+.3f} / {score[1]:.3f}"


def clients_cell(outcome):
    """[skewed gain, worst client] -> "skewed gain / worst client", two decimals."""
    return f"{evaluation.fmt(outcome[0])} / {outcome[1]:+.2f}"


def clients_under(cfg, provider, scores_for):
    """What the run's clients would get under other updates, beside what the provider sent them
    (gradtx): scores_for(clients, rows) gives one {label: score} per client (the run's clients and
    their results.json rows, in the run's order), each client's update scored on its own test
    split. Summarised as the run summarises its methods (eval.summarise_by_kind), the clients'
    other scores the run's own: {label: [skewed clients' gain of means, worst client vs its mean
    update]}, "gradtx" first."""
    clients = train.clients_stage(cfg, provider.task, provider.tiny, provider.llm, provider.paths,
                                  "cpu")
    with open(os.path.join(cfg.out, "results.json")) as f:
        results = json.load(f)
    rows = results["clients"]
    assert [c["name"] for c in clients] == [r["name"] for r in rows], "the run's clients, in order"
    labels = ["gradtx"]
    for row, new in zip(rows, scores_for(clients, rows)):
        scores = row["scores"]
        for label, value in new.items():
            scores[label] = value
            row["pgr"][label] = evaluation.pgr(value, scores["tinylm_ft"], scores["llm_ft"])
            row["gain_recovered"][label] = evaluation.gain_recovered(value, scores["llm_base"],
                                                                     scores["llm_ft"])
            labels += [label] if label not in labels else []
    summary = evaluation.summarise_by_kind(rows, results["higher_is_better"])
    skewed = summary["by_kind"]["skewed"]["gain_of_means"]
    worst = summary["worst_vs_mean_shadow"]
    return {label: [skewed[label], worst[label]] for label in labels}


def points_table(head, rows, cells):
    """Markdown of a frontier experiment's rows, one line per point in the order of N * epsilon:
    the columns N and epsilon, then `head` with cells(row) (this one and experiments/shrinkage.py,
    threshold.py, corners.py)."""
    lines = [[str(r["n_train"]), f"{r['epsilon']:g}", *cells(r)]
             for r in sorted(rows, key=lambda r: r["n_train"] * r["epsilon"])]
    return evaluation.markdown_table(["N", "epsilon", *head], lines)


def table(rows):
    """Markdown, one line per point in the order of N * epsilon."""
    head = ["choice (gain / loss)", "kd (gain / loss)", "kd_hard (gain / loss)",
            "choice with kd last", "with kd first"]
    return points_table(head, rows, lambda r: [
        f"{r['chosen']} {gain_loss(r['chosen_score'])}", gain_loss(r["kd"]),
        gain_loss(r["kd_hard"]), r["with_kd_last"], r["with_kd_first"]])


def describe(r):
    """A point's line: the choice, kd's and kd_hard's held-out scores, the choice with kd."""
    return (f"choice {r['chosen']}, kd gain {r['kd'][0]:+.3f} loss {r['kd'][1]:.3f}, kd_hard "
            f"{r['kd_hard'][0]:+.3f} / {r['kd_hard'][1]:.3f}; with kd: {r['with_kd_last']} "
            f"(last), {r['with_kd_first']} (first)")


def score_frontier(ecfg, stem, score_row, describe, table):
    """Score the points of a finished frontier (ecfg.out: ecfg.points, or every single-upload
    point): row = score_row(name, cfg) for each, its line describe(row) printed with its time;
    then table(rows) into <stem>.md and the rows into <stem>.json in ecfg.out. The driver of
    this experiment and experiments/shrinkage.py."""
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    rows = []
    for name in tqdm(point_names(ecfg.out, ecfg.points), desc="frontier points"):
        t0 = time.time()
        rows.append(score_row(name, run_config(os.path.join(ecfg.out, name))))
        print(f"{name}: {describe(rows[-1])}, {time.time() - t0:.0f}s", flush=True)
    text = table(rows)
    with open(os.path.join(ecfg.out, f"{stem}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(ecfg.out, f"{stem}.json"), "w") as f:
        json.dump({"draws": ecfg.draws, "rows": rows}, f, indent=1)
    print(text)


def main(argv):
    kcfg = parse_args(argv)
    score_frontier(kcfg, "kd_candidate", lambda name, cfg: point_row(
        name, cfg, score_point(cfg, kcfg.draws), cfg.choice_budget), describe, table)


if __name__ == "__main__":
    main(sys.argv[1:])
