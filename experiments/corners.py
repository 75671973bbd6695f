"""
experiments/corners.py -- does the provider's choice see every convention? It scores its candidates
on the translator's held-out shadow runs (train.held_out_uploads): a dozen subsets drawn from the
provider's shadow design, mostly near the task's mixture, so that a corner of the simplex may have
no held-out run at all. Here the provider adds held-out runs of its own until each convention
(the operator a subset's mixture favours most) leads at least --per_convention of them: fresh
subsets of the same shadow design (indices past the curated ones: no map or translator trained
on them), each with its DP draws made with the clients' published recipe at the point's privacy
level. No LLM fine-tune is needed: the choice scores an update by the LLM's accuracy on fresh
records of the run. Public data only; no client is read until the choice is made.

    python experiments/corners.py --out=out_frontier        # every single-upload point
    python experiments/corners.py --out=out_frontier --points=n8192_eps0.03_sgd
    python experiments/corners.py --help

About a minute a point (the extra runs' DP fine-tunes and scoring). For each point: the held-out
runs per convention before and after, the choice on the run's own held-out runs (what it sent)
and on all of them, and what the run's clients get under each. corners.md and corners.json into
--out. It reads the frontier's cached stages (experiments/kd_candidate.py's `provider_at`, driven
by its `score_frontier`): run it after the frontier.
"""
import json
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import eval as evaluation
import gradtx
import train
from config.presets import CHOICE_EXAMPLES, parse_options
from experiments.kd_candidate import provider_at, score_frontier


@dataclass
class CornersConfig:
    out: str = "out_frontier"   # a finished frontier: one run folder (results.json) per point
    points: str = ""            # run folders to score, comma-separated ("" = every single-upload)
    per_convention: int = 6     # held-out runs each convention should lead, at least
    threads: int = 0            # torch threads (0: torch's default)
    draws: int = 0              # (kd_candidate's driver reads it; every DP draw is scored here)


def parse_args(argv):
    """--key=value (or --key value) over CornersConfig's fields; --help lists them."""
    return parse_options(CornersConfig(), argv, __doc__)


def leading(cfg, task, k):
    """The convention shadow subset k's mixture favours most (an index into its mixture)."""
    subset = task.shadow_subset(k, 1, cfg.shadow_alpha, cfg.shadow_near_mean)
    return int(np.argmax(subset.mixture))


def runs_per_convention(cfg, task, runs):
    """(conventions,) how many of `runs` each convention leads."""
    n = len(task.shadow_subset(0, 1, cfg.shadow_alpha, cfg.shadow_near_mean).mixture)
    return np.bincount([leading(cfg, task, k) for k in runs], minlength=n)


def extra_runs(cfg, task, held_out, per_convention, limit=1000):
    """Fresh shadow subsets k = n_shadow, n_shadow + 1, ... (never curated: no map or translator
    saw them), each kept while the convention it leads has fewer than `per_convention` held-out
    runs, the run's own (`held_out`) counted first. Their indices."""
    counts = runs_per_convention(cfg, task, held_out)
    extra = []
    for k in range(cfg.n_shadow, cfg.n_shadow + limit):
        if (counts >= per_convention).all():
            break
        c = leading(cfg, task, k)
        if counts[c] < per_convention:
            extra.append(k)
            counts[c] += 1
    return extra


def extra_uploads(cfg, provider, extra):
    """The extra runs' DP draws, made as the shadow stage makes the curated runs' (the clients'
    DP recipe, the same seeds' rule): (len(extra), R, n_src, d_src)."""
    worker = train.Worker(cfg, provider.task, provider.tiny, provider.llm)
    items = [(k, r) for k in extra for r in range(cfg.shadow_dp_draws)]
    draws = train.shadow_dp_runs(worker, items)
    return torch.stack(draws).view(len(extra), cfg.shadow_dp_draws, *draws[0].shape)


class HeldOut(NamedTuple):
    """Held-out uploads and how each candidate gains on them (as train.HeldOut)."""
    uploads: torch.Tensor     # (U, n_src, d_src)
    runs: np.ndarray          # (U,) which held-out run each came from: 0, 1, ...
    gain: object              # updates (U, n_tgt, d_tgt) -> (U,) gains over the mean update


def held_out_with(cfg, provider, extra, uploads_extra):
    """The run's own held-out uploads (train.held_out_uploads') followed by the extra runs', each
    scored on CHOICE_EXAMPLES fresh records of its own run."""
    _, val_runs = train.fit_runs(cfg)
    X, _ = data.translator_inputs(cfg, provider.shadow, val_runs, 1, private=True)   # (V, R, n, d)
    runs_uploads = torch.cat([X, uploads_extra.to(X.dtype)]) if extra else X
    R = runs_uploads.shape[1]
    uploads = runs_uploads.flatten(0, 1)
    runs = np.repeat(np.arange(len(runs_uploads)), R)
    task = provider.task
    records = [task.encode(data.held_out_examples(cfg, task, k, CHOICE_EXAMPLES))
               for k in list(val_runs) + list(extra)]
    error = train.functional_criterion(provider.llm, records, "exact_match")
    baseline = error(provider.fallback.expand(len(uploads), -1, -1), runs)
    return HeldOut(uploads, runs, lambda updates: baseline - error(updates, runs))


def choice_on(cfg, provider, held):
    """gradtx.choose on these held-out uploads, as train.choose_fallback makes it."""
    gains = {c: held.gain(gradtx.candidate_update(provider.model, held.uploads, c,
                                                  provider.log["ridge"], provider.fallback))
             for c in gradtx.CANDIDATES}
    return gradtx.choose(gains, held.runs, cfg.choice_budget)


def client_outcome(cfg, provider, candidate):
    """What the run's clients get under `candidate`: [skewed clients' gain of means, worst client
    vs its mean update], each client's update scored on its own test split, summarised as the run
    summarises its methods (eval.summarise_by_kind), its other scores the run's own."""
    clients = train.clients_stage(cfg, provider.task, provider.tiny, provider.llm,
                                  provider.paths, "cpu")
    with open(os.path.join(cfg.out, "results.json")) as f:
        results = json.load(f)
    rows = results["clients"]
    label = f"choice:{candidate}"
    for client, row in zip(clients, rows):
        assert client["name"] == row["name"], "the run's clients, in the run's order"
        update = gradtx.provide(provider.model, client["upload"][None].float(),
                                gradtx.Choice(candidate, 0.0, 0.0, {}), provider.log["ridge"],
                                provider.fallback)[0]
        scores = row["scores"]
        scores[label] = evaluation.score_updates(provider.task, provider.llm, {label: update},
                                                 client["test"])[label]
        row["gain_recovered"][label] = evaluation.gain_recovered(scores[label],
                                                                 scores["llm_base"],
                                                                 scores["llm_ft"])
        row["pgr"][label] = evaluation.pgr(scores[label], scores["tinylm_ft"], scores["llm_ft"])
    summary = evaluation.summarise_by_kind(rows, results["higher_is_better"])
    return [summary["by_kind"]["skewed"]["gain_of_means"][label],
            summary["worst_vs_mean_shadow"][label]]


def score_point(name, cfg, per_convention):
    """One line of the table (module docstring)."""
    p = provider_at(cfg)
    _, val_runs = train.fit_runs(cfg)
    extra = extra_runs(cfg, p.task, val_runs, per_convention)
    own = choice_on(cfg, p, held_out_with(cfg, p, [], None))
    wider = choice_on(cfg, p, held_out_with(cfg, p, extra, extra_uploads(cfg, p, extra)))
    outcomes = {c: client_outcome(cfg, p, c) for c in dict.fromkeys([own.candidate,
                                                                     wider.candidate])}
    return {"point": name, "n_train": cfg.n_train, "epsilon": cfg.dp_epsilon,
            "before": runs_per_convention(cfg, p.task, val_runs).tolist(),
            "after": runs_per_convention(cfg, p.task, list(val_runs) + extra).tolist(),
            "extra": extra, "own": own._asdict(), "wider": wider._asdict(),
            "clients": {"own": outcomes[own.candidate], "wider": outcomes[wider.candidate]}}


def clients_cell(outcome):
    """skewed gain / worst client, two decimals."""
    return f"{evaluation.fmt(outcome[0])} / {outcome[1]:+.2f}"


def table(rows):
    """Markdown, one line per point in the order of N * epsilon."""
    head = ["N", "epsilon", "held-out runs per convention", "with extra runs",
            "choice on the run's own (clients: skewed gain / worst)", "choice on all of them"]
    lines = [[str(r["n_train"]), f"{r['epsilon']:g}", " ".join(map(str, r["before"])),
              " ".join(map(str, r["after"])),
              f"{r['own']['candidate']}: {clients_cell(r['clients']['own'])}",
              f"{r['wider']['candidate']}: {clients_cell(r['clients']['wider'])}"]
             for r in sorted(rows, key=lambda r: r["n_train"] * r["epsilon"])]
    return evaluation.markdown_table(head, lines)


def describe(r):
    """A point's line: the two choices and the clients under each."""
    return (f"{len(r['extra'])} extra runs; choice {r['own']['candidate']} "
            f"{clients_cell(r['clients']['own'])} -> {r['wider']['candidate']} "
            f"{clients_cell(r['clients']['wider'])}")


def main(argv):
    ccfg = parse_args(argv)
    score_frontier(ccfg, "corners", lambda name, cfg: score_point(name, cfg, ccfg.per_convention),
                   describe, table)


if __name__ == "__main__":
    main(sys.argv[1:])
