"""
experiments/sweep.py -- the experiments that run the protocol (train.run) many times, and their
tables. Every run of a sweep shares --cache, so later runs reuse the earlier runs' stages.

    python experiments/sweep.py --experiment=dp --cache=out        # the DP sweep
    python experiments/sweep.py --experiment=collab --cache=out    # groups of 8 pool their uploads
    python experiments/sweep.py --experiment=frontier --cache=out  # N x epsilon x pooling
    python experiments/sweep.py --experiment=shadow_count --cache=out   # K shadow subsets
    python experiments/sweep.py --tables --out=DIR     # an experiment's table again, from its runs
    python experiments/sweep.py --help                 # every option (as train.py's)
    torchrun --standalone --nproc_per_node=8 experiments/sweep.py --experiment=frontier --cache=out

Each run writes DIR/<run name>/results.json; the experiment writes DIR/<experiment>.md (and the
frontier's and shadow count's points, DIR/<experiment>.json, which tools/plots.py draws).
"""
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

import train
from config import dist as distributed
from config.presets import EXPERIMENTS, SIGNAL_DIRECTIONS, parse_args
from eval import count_names, fmt, markdown_table, pooling_table


def main(argv):
    """Run an experiment (--experiment=NAME) and write its table; or, with --tables, rebuild the
    table of a finished one in --out from its runs."""
    if "--tables" in argv:
        argv = [a for a in argv if a != "--tables"]
        out = parse_args(argv, __doc__).out
        found = [n for n in EXPERIMENTS if os.path.exists(os.path.join(out, f"{n}.md"))]
        if not found:
            raise SystemExit(f"no experiment's table in {out}: expected the --out of a finished "
                             "experiment")
        table = write_experiment(found[0], load_runs(out), out)
        print(table)
        return table
    cfg = parse_args(argv, __doc__)
    if not cfg.experiment:
        raise SystemExit(f"expected --experiment=NAME, one of {', '.join(EXPERIMENTS)}")
    points = []
    for o in EXPERIMENTS[cfg.experiment]:   # later runs reuse the earlier runs' stages
        sub = replace(cfg, experiment="", cache=cfg.cache or cfg.out, **o)
        points.append(replace(sub, out=os.path.join(cfg.out, run_name(sub, cfg.experiment))))
    ranks = distributed.setup(cfg)   # None without torchrun
    try:
        rows = run_points(points, ranks)
    finally:
        distributed.finish(ranks)
    if rows is None:   # a rank other than 0: rank 0 writes the table
        return None
    table = write_experiment(cfg.experiment, rows, cfg.out)
    print(f"\n{cfg.experiment} experiment ({len(rows)} runs) -> "
          f"{cfg.out}/{cfg.experiment}.md\n\n{table}")
    return rows


def run_points(points, ranks):
    """Every point's results, in order (None on ranks other than 0). Under torchrun, first the
    stages points share (both base models, the clean shadow runs) are made once by all ranks
    together; then rank r runs points r, r + world, ... on its own, one worker, from the cache."""
    if ranks is None:
        return [train.run(point) for point in points]
    made = set()
    for point in points:   # points that share a shadow stage share the base models too
        made.add(train.shared_stages(point, ranks, skip=made))
    distributed.barrier(ranks, "shared stages")
    mine = [train.run(replace(point, workers=1)) for point in points[ranks.rank::ranks.world]]
    gathered = distributed.gather_to_rank0(ranks, mine, "the points' results")
    if ranks.rank > 0:
        return None
    return [gathered[i % ranks.world][i // ranks.world] for i in range(len(points))]


def run_name(cfg, experiment):
    """The folder of one run of an experiment: its privacy setting (and, in the frontier, N and
    m)."""
    name = f"eps{cfg.dp_epsilon:g}_{cfg.dp_mechanism}" if cfg.dp_epsilon > 0 else "no_dp"
    if experiment == "frontier":
        name = f"n{cfg.n_train}_{name}" + (f"_m{cfg.group_size}" if cfg.group_size > 1 else "")
    if experiment == "shadow_count":
        translator = "paper" if not cfg.gt_skip else f"gradtx_init{cfg.gt_init}"
        name = f"n{cfg.n_train}_{name}_K{cfg.fit_shadow:03d}_{translator}"
    return name


FRONTIER_METHODS = ["gradtx", "translator", "ridge", "ridge_ungated", "tinylm_dp", "w2s", "kd",
                    "mean_shadow"]
# the worst client's columns: gradtx and the map without its gate (the figure draws every method's)
HARM_METHODS = ["gradtx", "ridge_ungated"]
# the knee: gradtx against the best of what needs only the upload (the map without its gate, the DP
# TinyLM, distillation of it) and the paper's stronger baseline (w2s, which reads private inputs)
KNEE_BASELINES = ["ridge_ungated", "tinylm_dp", "w2s", "kd"]


def frontier_points(runs):
    """The privacy-utility frontier, one point per (N, epsilon, m): the skewed clients' gain
    recovered (of means) per method, every client's score against the mean shadow update's
    ("vs_mean_shadow", in accuracy; negative: made worse off by uploading) and the worst of them,
    at x = N * epsilon * sqrt(m), the upload's signal-to-noise axis (pooling m uploads divides the
    noise by about sqrt(m)). A run with groups gives one point per pooled size m, its translator for
    that noise level (gradtx, ridge) against the same mean shadow update, over the group members."""
    points = []
    for r in runs:
        N = r["config"]["n_train"]
        eps = r["privacy"]["epsilon"]
        skewed = r["summary"]["by_kind"]["skewed"]
        sign = 1 if r["higher_is_better"] else -1
        pooled = skewed.get("pooling_gain_of_means")
        for m in (pooled or {1: None}):
            m = int(m)
            if pooled:
                curve = pooled[m] if m in pooled else pooled[str(m)]
                gain = {k: curve[k] for k in ("gradtx", "translator", "ridge") if k in curve}
                scores = {c["name"]: c["pooling"][m if m in c["pooling"] else str(m)]
                          for c in r["clients"] if c["pooling"]}
                gain["mean_shadow"] = skewed["gain_of_means"]["mean_shadow"]
                chosen = {c["name"]: at(c.get("pooling_choice"), m)
                          for c in r["clients"] if c["pooling"]}
            else:
                gain = {k: skewed["gain_of_means"][k]
                        for k in FRONTIER_METHODS if k in skewed["gain_of_means"]}
                scores = {c["name"]: c["scores"] for c in r["clients"]}
                chosen = {c["name"]: c.get("provider_choice") for c in r["clients"]}
            mean_shadow = {c["name"]: c["scores"]["mean_shadow"] for c in r["clients"]}
            versus = {name: {k: sign * (s[k] - mean_shadow[name]) if k != "mean_shadow" else 0.0
                             for k in gain if k in s or k == "mean_shadow"}
                      for name, s in scores.items()}
            worst = {k: min(v[k] for v in versus.values() if k in v) for k in gain}
            points.append({"n_train": N, "epsilon": eps, "m": m, "nem": N * eps * math.sqrt(m),
                           "group_size": r["config"]["group_size"],
                           "sigma": r["privacy"]["noise_multiplier"], "gain": gain,
                           "worst_vs_mean_shadow": worst, "vs_mean_shadow": versus,
                           "clients": {c["name"]: {"group": c["group"], "kind": c["kind"],
                                                   "provider_choice": chosen[c["name"]]}
                                       for c in r["clients"] if c["name"] in versus}})
    return points


def at(by_level, m):
    """by_level[m] of a results.json dict (its keys strings once written), or None."""
    if not by_level:
        return None
    return by_level.get(m, by_level.get(str(m)))


def choice_counts(point):
    """What the provider sent at a frontier point, counted over its clients (`sent_counts`; a
    group's members share their pooled upload's)."""
    return sent_counts([c["provider_choice"] for c in point["clients"].values()])


def sent_counts(names):
    """What the provider sent, counted by name: "mean_shadow 2, translator 7", the check's picks
    as "c:ridge_hard 3", what the answer test sent instead as "s:ridge_ungated 1"; "n/a" before
    the provider chose (older runs)."""
    return count_names([n.replace("checked:", "c:").replace("shift:", "s:")
                        for n in names if n]) or "n/a"


def knee_margin(point):
    """gradtx's skewed gain minus the best of KNEE_BASELINES the point reports (None: none)."""
    rivals = [point["gain"][k] for k in KNEE_BASELINES if point["gain"].get(k) is not None]
    if not rivals or point["gain"].get("gradtx") is None:
        return None
    return point["gain"]["gradtx"] - max(rivals)


def best_unharmed(point, allowed=-0.05):
    """The point's trade-off: of the methods it reports, the highest skewed gain among those that
    leave every client (the ones each was run for) at most 0.05 below its mean shadow update, as
    "0.52 ridge_ungated". The mean update itself always qualifies; "n/a": no gain defined."""
    fine = {k: g for k, g in point["gain"].items()
            if g is not None and point["worst_vs_mean_shadow"].get(k, -math.inf) >= allowed}
    if not fine:
        return "n/a"
    method = max(fine, key=fine.get)
    return f"{fine[method]:.2f} {method}"


def harmed(point, method="gradtx", allowed=-0.05):
    """A frontier point's clients more than 0.05 below their mean shadow update, a group's members
    counted under its name ("iid_0: 6 of 8"), or "none"."""
    groups = {}
    for name, v in point["vs_mean_shadow"].items():
        below = groups.setdefault(point["clients"][name]["group"], [0, 0])
        below[0] = below[0] + (v[method] < allowed)
        below[1] = below[1] + 1
    return ", ".join(g if n == 1 else f"{g}: {k} of {n}"
                     for g, (k, n) in groups.items() if k) or "none"


def signed(value):
    return "n/a" if value is None else f"{value:+.2f}"


def frontier_table(runs):
    points = sorted(frontier_points(runs), key=lambda p: p["nem"])
    head = (["N", "epsilon", "m", "N·ε·√m", "sigma"] + FRONTIER_METHODS
            + ["gradtx - best baseline", "best with nobody harmed",
               "provider's choice (clients; c: checked, s: answer test)"]
            + [f"worst client vs mean_shadow: {HARM_METHODS[0]}"] + HARM_METHODS[1:]
            + ["clients below -0.05 (gradtx)"])
    rows = []
    for p in points:
        group = p.get("group_size", 1)
        row = ([f"{p['n_train']}" + (f" (groups of {group})" if group > 1 else ""),
                f"{p['epsilon']:g}", str(p["m"]), f"{p['nem']:.0f}", f"{p['sigma']:.2f}"]
               + [fmt(p["gain"].get(k)) for k in FRONTIER_METHODS]
               + [signed(knee_margin(p)), best_unharmed(p), choice_counts(p)]
               + [signed(p["worst_vs_mean_shadow"].get(k)) for k in HARM_METHODS]
               + [harmed(p)])
        rows.append(row)
    return ("skewed clients: gain recovered of means, against each client's NON-private llm_ft; "
            "best baseline: the\n"
            f"highest of {', '.join(KNEE_BASELINES)} the row reports; worst client: the lowest "
            "score minus the mean\n"
            "shadow update's score over every client, the IID one included; best with nobody "
            "harmed: the highest\ngain of a method whose worst client (of those it was run for) "
            "is within 0.05\n\n"
            + markdown_table(head, rows))


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
        c = r["config"]
        eps = r["privacy"]["epsilon"]
        timing = r["timing_s"]
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
    return rows + best_init_rows(rows)


def best_init_rows(rows):
    """Where several inits of this project's translator were fitted at one (N, epsilon, K): the
    "gradtx_best_init" row, the init with the lowest held-out criterion, billed for all of them."""
    inits = {}
    for row in rows:
        if row["method"] == "gradtx":
            inits.setdefault((row["n_train"], row["epsilon"], row["K"]), []).append(row)
    best_rows = []
    for tried in (t for t in inits.values() if len(t) > 1):
        best = min(tried, key=lambda row: row["val_loss"])
        fit_seconds = sum(row["fit_seconds"] for row in tried)
        best_rows.append(dict(best, method="gradtx_best_init", fit_seconds=fit_seconds,
                              seconds=best["curation_seconds"] + fit_seconds))
    return best_rows


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
        lines.append(f"\n{'no DP' if eps is None else f'DP-SGD eps = {eps:g}'}, clients of "
                     f"{n_train} records:\n")
        table = []
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
            table.append(row)
        lines.append(markdown_table(head, table))
    return ("skewed clients: gain recovered of means; the provider's bill: its share of the "
            "shadow curation\n(K of the curated subsets) plus the fit, in seconds and in LLM "
            "fine-tunes of one client's size\n" + "\n".join(lines))


def mean_upload_signal(translator):
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
    methods = ["tinylm_dp", "gradtx", "translator", "ridge", "ridge_ungated", "gradtx_group",
               "ridge_group", "mean_shadow", "w2s", "kd"]
    methods = [m for m in methods if any(m in r["summary"]["scores"] for r in runs)]
    chose = any("provider_choice" in c for r in runs for c in r["clients"])
    head = (["epsilon", "mechanism", "sigma", "k", "signal"] + [f"{m} gain (PGR)" for m in methods]
            + (["provider's choice (clients; c: checked, s: answer test)"] if chose else []))
    rows = []
    for r in runs:
        p = r["privacy"]
        s = r["summary"]["by_kind"].get("skewed", r["summary"])
        row = ["inf" if p["epsilon"] is None else f"{p['epsilon']:g}", p["mechanism"] or "-",
               f"{p['noise_multiplier']:.2f}", "/".join(str(k) for k in p["subspace_k"].values()),
               "/".join(fmt(mean_upload_signal(t)) for t in r["translators"].values())]
        row += [f"{fmt(s['gain_of_means'].get(m))} ({fmt(s['pgr_of_means'].get(m))})"
                for m in methods]
        if chose:   # what gradtx sent (no DP: the translation)
            row.append(sent_counts([c.get("provider_choice") for c in r["clients"]]))
        rows.append(row)
    text = ("skewed clients: gain recovered of means (PGR of means), against the NON-private floor "
            "and ceiling;\n"
            "signal: how much the uploads say about the data (correlation with the clean update "
            "along the\n"
            f"top {SIGNAL_DIRECTIONS} public directions, their mean; 1: the noise does not "
            "matter, 0: nothing to translate)\n\n")
    text += markdown_table(head, rows)
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
    main(sys.argv[1:])
