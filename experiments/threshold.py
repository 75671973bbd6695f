"""
experiments/threshold.py -- where should the deciding gate draw its line? Behind the deciding gate
(gradtx.do_no_harm, hard=True) an upload gets its translation where the gate's weight is at least
1/2, the mean update elsewhere: Bayes' rule with a prior of 1/2 that an upload carries a convention
of its own. A threshold tau is the same rule with another prior p (logit p = -logit tau): how many
uploads at this privacy level carry a convention worth translating. The provider can learn it per
privacy level from the held-out shadow runs its choice already scores. Behind the gate at tau an
upload's gain over the mean update is its ungated translation's where its weight is at least tau,
else 0, so every threshold is scored without one more LLM evaluation.

    python experiments/threshold.py --out=out_frontier        # every single-upload point
    python experiments/threshold.py --out=out_frontier --points=n8192_eps0.03_sgd
    python experiments/threshold.py --help

For the translator and for the map alone, two thresholds from the held-out runs (thresholds whose
held-out loss is within the choice's budget and whose mean gain is above 0, as gradtx.choose
asks of a candidate): the BEST one, the highest mean gain, and the CAUTIOUS one, the nearest to
1/2 within one standard error of the best (over the runs, as gradtx.choose's rule), which moves
the line only where the held-out runs say so clearly. Then what the run's own clients would have
got behind each, beside what the provider sent them. Half a minute a point; threshold.md and
threshold.json into --out. It reads the frontier's cached stages (experiments/kd_candidate.py's
`provider_at`, driven by its `score_frontier`) and fits nothing: run it after the frontier.
"""
import json
import math
import os
import sys
from typing import NamedTuple

import numpy as np
import torch

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval as evaluation
import gradtx
import train
from config.presets import parse_options
from experiments.kd_candidate import (PointsConfig, clients_cell, clients_under, points_table,
                                      provider_at, score_frontier)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)   # 0.5: the gate as it decides today
METHODS = ("translator", "ridge")   # the map plus the translator's residual; the map alone


def parse_args(argv):
    """--key=value (or --key value) over kd_candidate.PointsConfig's fields; --help lists them."""
    return parse_options(PointsConfig(), argv, __doc__)


def gains_at(ungated, weight, tau):
    """Held-out gains (U,) behind the gate deciding at `tau`: the ungated translation's gain where
    the upload's weight is at least tau, else the mean update's own (0)."""
    return np.where(np.asarray(weight) >= tau, np.asarray(ungated, dtype=float), 0.0)


class Learned(NamedTuple):
    """The thresholds one method's held-out gains pick (None: none qualifies, the mean update)."""
    best: float | None       # the highest mean gain
    cautious: float | None   # the nearest to 1/2 within one standard error of the best
    scores: dict             # {tau: [mean gain, loss]} for every threshold tried


def learn_threshold(ungated, weight, runs, budget, thresholds=THRESHOLDS):
    """The thresholds the held-out runs pick (module docstring): of those whose loss (the mean of
    max(0, -gain), gradtx.choose's) is at most `budget` and whose mean gain is above 0, the best
    mean gain, and the nearest to 1/2 within one standard error of the best's mean over the runs.
    None where no threshold qualifies (the mean update)."""
    runs = np.asarray(runs)
    scores, per_run = {}, {}
    for tau in thresholds:
        g = gains_at(ungated, weight, tau)
        scores[tau] = [float(g.mean()), float(np.maximum(-g, 0).mean())]
        if scores[tau][1] <= budget and scores[tau][0] > 0:
            per_run[tau] = np.array([g[runs == r].mean() for r in np.unique(runs)])
    if not per_run:
        return Learned(None, None, scores)
    best = max(per_run, key=lambda t: per_run[t].mean())
    error = per_run[best].std(ddof=1) / math.sqrt(len(per_run[best]))
    near = [t for t in per_run if per_run[t].mean() >= per_run[best].mean() - error]
    cautious = min(near, key=lambda t: (abs(t - 0.5), t))
    return Learned(best, cautious, scores)


def score_point(cfg, draws):
    """At one frontier point, on the first `draws` DP draws of each held-out run: {"ungated":
    {method: (U,) held-out gains of its ungated translation}, "weight": (U,) the gate's weight of
    each upload, "runs": (U,), "learned": {method: Learned}, "clients": `client_outcomes`}."""
    p = provider_at(cfg)
    # the uploads, held-out records and mean update the run's choice was scored on
    held = train.held_out_uploads(cfg, p.task, p.llm, p.shadow, p.fallback, 1, draws)
    weight = gradtx.gate_weight(p.model.gate, held.uploads).cpu().numpy()
    ungated = {m: held.gain(gradtx.candidate_update(p.model, held.uploads, f"{m}_ungated",
                                                    p.log["ridge"], p.fallback))
               for m in METHODS}
    learned = {m: learn_threshold(ungated[m], weight, held.runs, cfg.choice_budget)
               for m in METHODS}
    return {"learned": learned, "ungated": ungated, "weight": weight, "runs": held.runs,
            "clients": client_outcomes(cfg, p, learned)}


def client_outcomes(cfg, provider, learned):
    """What the run's clients would get behind the gate at each learned threshold, beside what the
    provider sent them: kd_candidate.clients_under, labels "gradtx", "<method>@best",
    "<method>@cautious". A client's score behind the gate at tau is its ungated translation's where
    its upload's weight is at least tau, else its mean update's (the run's `mean_shadow` score: the
    same update); no threshold at all (None) is the mean update."""
    def thresholded_scores(clients, rows):
        uploads = torch.stack([c["upload"] for c in clients]).float()
        weight = gradtx.gate_weight(provider.model.gate, uploads).cpu().numpy()
        out = []
        for i, (client, row) in enumerate(zip(clients, rows)):
            ungated = {m: gradtx.candidate_update(provider.model, uploads[i:i + 1], f"{m}_ungated",
                                                  provider.log["ridge"], provider.fallback)[0]
                       for m in METHODS}
            ungated = evaluation.score_updates(provider.task, provider.llm, ungated, client["test"])
            mean_update = row["scores"]["mean_shadow"]
            out.append({f"{m}@{which}": ungated[m] if tau is not None and weight[i] >= tau
                        else mean_update
                        for m in METHODS for which, tau in (("best", learned[m].best),
                                                            ("cautious", learned[m].cautious))})
        return out
    return clients_under(cfg, provider, thresholded_scores)


def point_row(name, cfg, scored):
    """One line of the table: the run's choice, each method's learned thresholds (with their
    held-out gain and loss), and the clients under each."""
    with open(os.path.join(cfg.out, "results.json")) as f:
        chosen = json.load(f)["provider_choice"]["1"]["candidate"]
    learned = scored["learned"]
    return {"point": name, "n_train": cfg.n_train, "epsilon": cfg.dp_epsilon, "chosen": chosen,
            "thresholds": {m: {"best": learned[m].best, "cautious": learned[m].cautious,
                               "scores": {f"{t:g}": s for t, s in learned[m].scores.items()}}
                           for m in METHODS},
            "clients": scored["clients"]}


def tau_cell(row, method, which):
    """'tau: skewed gain / worst' for one learned threshold (none: the mean update)."""
    tau = row["thresholds"][method][which]
    return (f"{'none' if tau is None else f'{tau:g}'}: "
            f"{clients_cell(row['clients'][f'{method}@{which}'])}")


def table(rows):
    """Markdown, one line per point in the order of N * epsilon."""
    head = ["provider's choice: clients (skewed gain / worst)", "translator, best threshold",
            "cautious", "map, best threshold", "cautious"]
    return points_table(head, rows, lambda r: [
        f"{r['chosen']}: {clients_cell(r['clients']['gradtx'])}",
        tau_cell(r, "translator", "best"), tau_cell(r, "translator", "cautious"),
        tau_cell(r, "ridge", "best"), tau_cell(r, "ridge", "cautious")])


def describe(r):
    """A point's line: the learned thresholds and the clients under the provider's choice."""
    taus = ", ".join(f"{m} {r['thresholds'][m]['best']} / {r['thresholds'][m]['cautious']}"
                     for m in METHODS)
    return f"thresholds (best / cautious): {taus}; clients under the choice " + clients_cell(
        r["clients"]["gradtx"])


def main(argv):
    tcfg = parse_args(argv)
    score_frontier(tcfg, "threshold", lambda name, cfg: point_row(
        name, cfg, score_point(cfg, tcfg.draws)), describe, table)


if __name__ == "__main__":
    main(sys.argv[1:])
