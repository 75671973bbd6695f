"""
experiments/shrinkage.py -- would shrinking each public direction by its signal-to-noise serve the
provider better than its gate? The gate (gradtx.gate_weight) ends in one weight per upload. A
Wiener estimate instead moves each of the upload's coordinates along the directions the linear map
reads towards their centre, by what the noise leaves of that direction:

    c_j  ->  centre_j + (c_j - centre_j) * s_j / (s_j + n_j)

with the signal and noise variances s_j, n_j measured exactly as the gate's are (gradtx.fit_gate:
the provider's DP shadow copies at the point's privacy level, shadow runs only). The map and the
translator (the map plus its residual) then translate the shrunk upload, with no gate (the shrinkage
stands in for it) and behind the deciding gate. Each is scored on the held-out shadow runs exactly
as the provider's choice scores its candidates (train.held_out_uploads), and gradtx.choose decides
again with them among the candidates.

    python experiments/shrinkage.py --out=out_frontier        # every single-upload point
    python experiments/shrinkage.py --out=out_frontier --points=n2048_eps0.1_sgd
    python experiments/shrinkage.py --help

Half a minute a point: a few translations and LLM evaluations, on the held-out runs and on the
run's own clients (what each shrunk candidate would have given them, beside what the provider sent).
Writes shrinkage.md and shrinkage.json into --out. It reads the frontier's cached stages
(experiments/kd_candidate.py's `provider_at`, driven by its `score_frontier`) and fits nothing:
run it after the frontier.
"""
import math
import os
import sys

import numpy as np
import torch

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import eval as evaluation
import gradtx
import train
from config.presets import parse_options
from experiments.kd_candidate import (PointsConfig, clients_cell, clients_under, gain_loss,
                                      points_table, provider_at, score_frontier)

SHRUNK = ("translator_shrunk_hard", "ridge_shrunk_hard", "translator_shrunk", "ridge_shrunk")


def parse_args(argv):
    """--key=value (or --key value) over kd_candidate.PointsConfig's fields; --help lists them."""
    return parse_options(PointsConfig(), argv, __doc__)


def shrinkage_statistics(cfg, provider):
    """The signal and noise variance of each direction the linear map reads (its public basis; the
    gate's directions where the map reads the raw upload), from the train runs' noisy inputs and
    draws of the noise alone at the point's level: gradtx.fit_gate's statistics, on that basis."""
    train_runs, _ = train.fit_runs(cfg)
    X, _ = data.translator_inputs(cfg, provider.shadow, train_runs, 1, private=True)
    noise = data.dp_noise(cfg, provider.shadow, train_runs, 1)
    gate = provider.model.gate
    basis = provider.log["basis"] or {"mean": gate["mean"], "U": gate["U"]}
    return gradtx.fit_gate(X.flatten(0, 1), noise, basis, provider.fallback)


def shrink(stats, uploads):
    """Uploads (U, n, d) with their coordinates c along the statistics' directions moved towards
    the centre, c - centre kept in the share s / (s + n) (the Wiener estimate of the signal);
    what lies off those directions unchanged."""
    X = uploads.flatten(1).float()
    c = (X - stats["mean"]) @ stats["U"] - stats["center"]                          # (U, k)
    kept = stats["signal_var"] / (stats["signal_var"] + stats["noise_var"])        # (k,)
    return (X - (c * (1 - kept)) @ stats["U"].T).view(uploads.shape)


@torch.no_grad()
def shrunk_updates(provider, stats, uploads):
    """{name of SHRUNK: LLM updates (U, n_tgt, d_tgt)}: the map and the translator on the shrunk
    uploads; "_hard": then the deciding gate, which reads the upload as it came."""
    shrunk = shrink(stats, uploads)
    updates = {}
    for method, linear in (("ridge", provider.log["ridge"]), ("translator", None)):
        update = gradtx.translate(provider.model, shrunk, linear=linear, gate="none")
        updates[f"{method}_shrunk"] = update
        updates[f"{method}_shrunk_hard"] = gradtx.do_no_harm(provider.model.gate, update, uploads,
                                                             hard=True)
    return updates


def score_point(cfg, draws):
    """Every candidate's and the shrunk candidates' held-out gains over the mean update at one
    frontier point, on the first `draws` DP draws of each held-out run. {"gains": {name: (U,)},
    "runs": (U,), "kept": (k,) the share of each direction the shrinkage keeps, "weight": (U,) the
    gate's weight of each upload, "clients": `client_outcomes`}."""
    p = provider_at(cfg)
    stats = shrinkage_statistics(cfg, p)
    # the uploads, held-out records and mean update the run's choice was scored on
    held = train.held_out_uploads(cfg, p.task, p.llm, p.shadow, p.fallback, 1, draws)
    updates = {c: gradtx.candidate_update(p.model, held.uploads, c, p.log["ridge"], p.fallback,
                                          p.check)
               for c in gradtx.CANDIDATES}
    updates.update(shrunk_updates(p, stats, held.uploads))
    kept = stats["signal_var"] / (stats["signal_var"] + stats["noise_var"])
    weight = gradtx.gate_weight(p.model.gate, held.uploads).numpy()
    return {"gains": {name: held.gain(u) for name, u in updates.items()}, "runs": held.runs,
            "kept": kept.tolist(), "weight": weight, "clients": client_outcomes(cfg, p, stats)}


def client_outcomes(cfg, provider, stats):
    """What the run's clients would get from each shrunk candidate, beside what the provider sent
    them: kd_candidate.clients_under, {name: [skewed clients' gain of means, worst client vs its
    mean update]}."""
    def shrunk_scores(clients, rows):
        uploads = torch.stack([c["upload"] for c in clients]).float()
        updates = shrunk_updates(provider, stats, uploads)
        return [evaluation.score_updates(provider.task, provider.llm,
                                         {name: update[i] for name, update in updates.items()},
                                         client["test"])
                for i, client in enumerate(clients)]
    return clients_under(cfg, provider, shrunk_scores)


def point_row(name, cfg, scored, budget):
    """One line of the table: the choice among the candidates alone, the best shrunk candidate's
    held-out scores, the choice with the shrunk candidates (last in the order, then first), and
    the clients under what the provider sent and under each shrunk candidate."""
    gains, runs = scored["gains"], scored["runs"]
    alone = gradtx.choose({c: gains[c] for c in gradtx.CANDIDATES}, runs, budget)
    orders = {"last": gradtx.CANDIDATES + SHRUNK, "first": SHRUNK + gradtx.CANDIDATES}
    choose_with = {where: gradtx.choose(gains, runs, budget, order).candidate
                   for where, order in orders.items()}
    score = {name: [float(np.mean(g)), float(np.maximum(-g, 0).mean())]
             for name, g in gains.items()}
    best_shrunk = max(SHRUNK, key=lambda c: score[c][0])
    return {"point": name, "n_train": cfg.n_train, "epsilon": cfg.dp_epsilon,
            "chosen": alone.candidate, "chosen_score": score.get(alone.candidate, [0.0, 0.0]),
            "best_shrunk": best_shrunk, "kept": scored["kept"],
            "with_shrunk_last": choose_with["last"], "with_shrunk_first": choose_with["first"],
            "scores": score, "clients": scored["clients"]}


def best_for_clients(outcomes):
    """The shrunk candidate with the highest skewed gain for the run's clients, and its cell."""
    name = max(SHRUNK, key=lambda c: -math.inf if outcomes[c][0] is None else outcomes[c][0])
    return f"{name} {clients_cell(outcomes[name])}"


def table(rows):
    """Markdown, one line per point in the order of N * epsilon."""
    head = ["share kept (min-max)", "choice (gain / loss)", "best shrunk (gain / loss)",
            "choice with shrunk last", "with shrunk first",
            "clients: gradtx (skewed gain / worst)", "best shrunk for the clients"]
    return points_table(head, rows, lambda r: [
        f"{min(r['kept']):.2f}-{max(r['kept']):.2f}",
        f"{r['chosen']} {gain_loss(r['chosen_score'])}",
        f"{r['best_shrunk']} {gain_loss(r['scores'][r['best_shrunk']])}",
        r["with_shrunk_last"], r["with_shrunk_first"], clients_cell(r["clients"]["gradtx"]),
        best_for_clients(r["clients"])])


def describe(r):
    """A point's line: the choice and the best shrunk candidate on held-out runs, the choice with
    the shrunk candidates."""
    return (f"choice {r['chosen']} {gain_loss(r['chosen_score'])}, best shrunk "
            f"{r['best_shrunk']} {gain_loss(r['scores'][r['best_shrunk']])}; with shrunk: "
            f"{r['with_shrunk_last']} (last), {r['with_shrunk_first']} (first)")


def main(argv):
    scfg = parse_args(argv)
    score_frontier(scfg, "shrinkage", lambda name, cfg: point_row(
        name, cfg, score_point(cfg, scfg.draws), cfg.choice_budget), describe, table)


if __name__ == "__main__":
    main(sys.argv[1:])
