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
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import eval as evaluation
import gradtx
import train
from config.presets import parse_options
from experiments.kd_candidate import (PointsConfig, clients_cell, clients_under, points_table,
                                      provider_at, score_frontier)


@dataclass
class CornersConfig(PointsConfig):
    """PointsConfig's options (every DP draw is scored here, whatever --draws says), and:"""
    per_convention: int = 6     # held-out runs each convention should lead, at least


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


def held_out_with(cfg, provider, extra, uploads_extra):
    """train.HeldOut for the run's own held-out runs (train.held_out_uploads') followed by the
    extra runs (`extra_uploads`), each upload scored on fresh records of its own run."""
    _, val_runs = train.fit_runs(cfg)
    X, _ = data.translator_inputs(cfg, provider.shadow, val_runs, 1, private=True)   # (V, R, n, d)
    uploads = torch.cat([X, uploads_extra.to(X.dtype)]) if extra else X
    return train.held_out_of(cfg, provider.task, provider.llm, provider.fallback,
                             list(val_runs) + list(extra), uploads)


def choice_on(cfg, provider, held):
    """The provider's choice on these held-out uploads (train.choose_on, as the run makes it)."""
    return train.choose_on(held, (provider.model, provider.log), provider.fallback,
                           cfg.choice_budget, provider.check)


def client_outcome(cfg, provider, candidate):
    """What the run's clients get under `candidate` (kd_candidate.clients_under):
    [skewed clients' gain of means, worst client vs its mean update]."""
    label = f"choice:{candidate}"

    def candidate_scores(clients, rows):
        choice = gradtx.Choice(candidate, 0.0, 0.0, {})
        return [{label: evaluation.score_updates(
            provider.task, provider.llm,
            {label: gradtx.provide(provider.model, c["upload"][None].float(), choice,
                                   provider.log["ridge"], provider.fallback,
                                   provider.check).updates[0]},
            c["test"])[label]} for c in clients]
    return clients_under(cfg, provider, candidate_scores)[label]


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


def table(rows):
    """Markdown, one line per point in the order of N * epsilon."""
    head = ["held-out runs per convention", "with extra runs",
            "choice on the run's own (clients: skewed gain / worst)", "choice on all of them"]
    return points_table(head, rows, lambda r: [
        " ".join(map(str, r["before"])), " ".join(map(str, r["after"])),
        f"{r['own']['candidate']}: {clients_cell(r['clients']['own'])}",
        f"{r['wider']['candidate']}: {clients_cell(r['clients']['wider'])}"])


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
