"""
tools/plots.py -- the figures: PNG files drawn from the JSON files that finished runs leave behind.

    python tools/plots.py --out=out                          # a run's figures, into out/figures/
    python tools/plots.py --out=out_dp --figures=figures     # an experiment's, into figures/

It draws whatever it finds in --out:
  results.json        fit.png: the translator's training curve, the functional criterion on held-out
                      shadow runs vs step, against its linear map (ridge), the mean shadow update
                      and the true update. An experiment's runs (subfolders) each get fit_<run>.png.
  dp.md               dp.png: gain recovered on the skewed clients vs epsilon, one line per method,
                      one panel per DP mechanism; no DP is the dashed line (train.py
                      --experiment=dp)
  collab.md           pooling.png: gain recovered vs the number m of pooled uploads, with and
                      without DP, one panel per kind of client (train.py --experiment=collab)
  frontier.json       frontier.png: gain vs N·ε·√m (examples x epsilon x sqrt(pooled uploads)), one
                      line per method; pooled points (m > 1) are squares. frontier_by_size.png: gain
                      vs epsilon, a panel per client size N (the DP sweep at each size);
                      frontier_harm.png: every client's score minus its mean shadow update's vs
                      N·ε·√m (do no harm); and pooling.png from its runs with groups
  shadow_count.json   shadow_count.png: gain vs the number K of shadow subsets, one panel per
                      privacy level, and the provider's bill (seconds, shadow fine-tunes) below it
                      (train.py --experiment=shadow_count)

matplotlib is an optional extra (pip install matplotlib): nothing else in gradtx imports it, and
this file imports it only inside main(). Otherwise standard library only.
"""
import argparse
import json
import os
import sys

METHODS = ["gradtx", "translator", "ridge", "ridge_ungated", "mean_shadow", "tinylm_dp", "w2s",
           "kd"]   # lines
COLORS = {"gradtx": "C0", "ridge": "C1", "ridge_ungated": "C8", "mean_shadow": "C7",
          "tinylm_dp": "C2", "w2s": "C3", "kd": "C4", "gradtx_single_map": "C5",
          "gradtx_paper": "C6", "gradtx_best_init": "C9", "translator": "navy"}
FRONTIER_LINES = ["gradtx", "translator", "ridge", "ridge_ungated", "tinylm_dp", "w2s", "kd",
                  "mean_shadow"]
# the provider's choice at a frontier point, as the letter drawn above its gradtx point
CHOICE_LETTERS = {"translator": "T", "translator_hard": "Th", "translator_ungated": "T*",
                  "ridge": "R", "ridge_hard": "Rh", "ridge_ungated": "R*", "mean_shadow": "M",
                  "corner": "C"}   # the answer test's corner: a shadow fine-tune of the LLM
SIZE = (6, 4)
DPI = 100


def load(path):
    with open(path) as f:
        return json.load(f)


def runs_of(folder):
    """{subfolder name: results} for the runs of an experiment (train.py writes one folder per
    run)."""
    runs = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "results.json")
        if os.path.isfile(path):
            runs[name] = load(path)
    return runs


def skewed(results):
    """The summary of the skewed clients, where the upload must speak (text runs: all clients)."""
    return results["summary"]["by_kind"].get("skewed", results["summary"])


def eps_label(eps):
    return "no DP" if eps is None else f"ε = {eps:g}"


def log_x(ax, ticks=None, base=10):
    """A log x axis with plain numbers (1, 8, 100) instead of powers, at `ticks` if given."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.set_xscale("log", base=base)
    if ticks:
        ax.set_xticks(sorted(set(ticks)))
    else:
        ax.xaxis.set_major_locator(LogLocator(base=base, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


# -----------------------------------------------------------------------------
# one figure each


def plot_fit(plt, results, title):
    """The functional criterion of each translator vs its training step, with the levels it is
    judged by."""
    fig, ax = plt.subplots(figsize=SIZE)
    for i, (m, t) in enumerate(sorted(results["translators"].items(), key=lambda kv: int(kv[0]))):
        color = f"C{i}"
        tag = "" if len(results["translators"]) == 1 else f" (m = {m})"
        steps = [h["step"] for h in t["history"]]
        ax.plot(steps, [h["criterion"] for h in t["history"]], "o-", color=color,
                label="translator" + tag)
        ax.axhline(t["ridge_loss"], color=color, ls="--", label=f"ridge map, k = {t['k']}" + tag)
    t = next(iter(results["translators"].values()))
    ax.axhline(t["mean_shadow_loss"], color="gray", ls=":", label="mean shadow update")
    ax.axhline(t["true_update_loss"], color="black", ls="-.", label="true update")
    ax.set(xlabel="translator training step",
           ylabel="criterion: LLM loss on held-out runs (lower is better)", title=title)
    ax.legend(fontsize=7)
    return fig


def plot_dp(plt, runs):
    """Skewed clients' gain recovered (of means) vs epsilon, a panel per mechanism; no DP dashed."""
    mechanisms = sorted({r["privacy"]["mechanism"]
                         for r in runs.values() if r["privacy"]["epsilon"]}, reverse=True)
    fig, axes = plt.subplots(1, len(mechanisms), figsize=(SIZE[0] * 1.5, SIZE[1]), sharey=True,
                             squeeze=False)
    no_dp = [r for r in runs.values() if r["privacy"]["epsilon"] is None]
    for ax, mech in zip(axes[0], mechanisms):
        rows = sorted((r for r in runs.values() if r["privacy"]["mechanism"] == mech
                       and r["privacy"]["epsilon"]),
                      key=lambda r: r["privacy"]["epsilon"])
        for method in METHODS:
            points = [(r["privacy"]["epsilon"], skewed(r)["gain_of_means"].get(method))
                      for r in rows]
            points = [(e, g) for e, g in points if g is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=COLORS[method], label=method)
            if no_dp and skewed(no_dp[0])["gain_of_means"].get(method) is not None:
                ax.axhline(skewed(no_dp[0])["gain_of_means"][method], color=COLORS[method], ls="--",
                           lw=0.8)
        log_x(ax, [r["privacy"]["epsilon"] for r in rows])
        ax.set(xlabel="ε (δ = 1e-5)",
               title={"sgd": "DP-SGD", "output": "output perturbation"}.get(mech, mech))
    axes[0][0].set_ylabel("gain recovered, skewed clients\n(dashed: no DP)")
    axes[0][0].legend(fontsize=7)
    return fig


def plot_pooling(plt, runs):
    """Gain recovered (of means) vs the number m of pooled uploads, a panel per kind of client."""
    kinds = sorted({k for r in runs.values() for k, s in r["summary"]["by_kind"].items()
                    if "pooling_gain_of_means" in s})
    fig, axes = plt.subplots(1, len(kinds), figsize=(SIZE[0] * 1.5, SIZE[1]), sharey=True,
                             squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sizes = []
        for r in sorted(runs.values(), key=lambda r: r["privacy"]["epsilon"] or 0):
            curve = r["summary"]["by_kind"][kind].get("pooling_gain_of_means", {})
            style = "-" if r["privacy"]["epsilon"] is None else "--"
            for variant in ("gradtx", "ridge", "gradtx_single_map"):
                points = [(int(m), p[variant]) for m, p in curve.items()
                          if p.get(variant) is not None]
                sizes += [m for m, _ in points]
                if points:
                    ax.plot(*zip(*sorted(points)), "o" + style, color=COLORS[variant],
                            label=f"{variant}, {eps_label(r['privacy']['epsilon'])}")
        log_x(ax, sizes, base=2)
        ax.set(xlabel="pooled uploads m", title=f"{kind} clients")
    axes[0][0].set_ylabel("gain recovered (of means)")
    axes[0][0].legend(fontsize=7)
    return fig


def plot_frontier(plt, frontier):
    """Gain vs N·ε·√m on a log axis, one line per method; points of groups drawn as squares."""
    fig, ax = plt.subplots(figsize=SIZE)
    rows = sorted(frontier["rows"], key=lambda r: r["nem"])
    for method in FRONTIER_LINES:
        points = [(r["nem"], r["gain"][method], r.get("group_size", r["m"]))
                  for r in rows if r["gain"].get(method) is not None]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", color=COLORS[method],
                label=method)
        for marker, pooled in (("o", False), ("s", True)):
            chosen = [p for p in points if (p[2] > 1) == pooled]
            if chosen:
                ax.plot([p[0] for p in chosen], [p[1] for p in chosen], marker,
                        color=COLORS[method], mfc="none" if pooled else COLORS[method], ls="none")
    for r in rows:   # what the provider sent there: its choice for most of the point's clients
        if (letter := choice_letter(r)) and r["gain"].get("gradtx") is not None:
            ax.annotate(letter, (r["nem"], r["gain"]["gradtx"]), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7, color=COLORS["gradtx"])
    ax.axhline(0.5, color="black", ls=":", lw=0.8)
    log_x(ax)
    ax.set(xlabel="N·ε·√m  (examples per client x epsilon x sqrt(pooled uploads))",
           ylabel="gain recovered, skewed clients")
    ax.set_title("the privacy frontier (squares: groups pooling m uploads)\nletters: what gradtx "
                 "sent most clients (c: the check picked it, s: the answer test\nsent it; "
                 "T translator, R linear map, M mean update, C corner; h: the gate decides, "
                 "*: no gate)",
                 fontsize=8)
    ax.legend(fontsize=7)
    return fig


def choice_letter(row):
    """The letter of what the provider sent most of a frontier point's clients ("" before the
    provider chose: older runs)."""
    names = [c.get("provider_choice") for c in row["clients"].values()]
    names = [n for n in names if n]
    if not names:
        return ""
    name = max(set(names), key=names.count)
    for prefix, mark in (("checked:", "c"), ("shift:", "s")):   # the check, the answer test:
        if name.startswith(prefix):                              # c or s, then what it sent
            return mark + CHOICE_LETTERS.get(name.removeprefix(prefix), "?")
    return CHOICE_LETTERS.get(name, "?")


def plot_frontier_by_size(plt, frontier):
    """The DP sweep at each client size: gain vs epsilon (log axis), one panel per N, m = 1."""
    single = [r for r in frontier["rows"] if r.get("group_size", 1) == 1]   # no pooled runs
    sizes = sorted({r["n_train"] for r in single})
    fig, axes = plt.subplots(1, len(sizes), figsize=(min(4 * len(sizes), 12), SIZE[1]),
                             sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sizes):
        rows = sorted((r for r in single if r["n_train"] == n), key=lambda r: r["epsilon"])
        for method in FRONTIER_LINES:
            points = [(r["epsilon"], r["gain"][method]) for r in rows
                      if r["gain"].get(method) is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=COLORS[method], label=method)
        log_x(ax, [r["epsilon"] for r in rows])
        ax.set(xlabel="ε (δ = 1e-5)", title=f"clients of N = {n:,} records")
    axes[0][0].set_ylabel("gain recovered, skewed clients")
    axes[0][0].legend(fontsize=7)
    return fig


def plot_frontier_harm(plt, frontier):
    """Do no harm at every point: each client's score minus its mean shadow update's (accuracy)
    against N·ε·√m, a panel per method (gradtx, the translator, ridge and the ungated ridge, each
    where measured), a
    dot per client coloured by its kind; below the red line (-0.05): made worse off."""
    rows = sorted(frontier["rows"], key=lambda r: r["nem"])
    methods = [m for m in ("gradtx", "translator", "ridge", "ridge_ungated")
               if any(m in v for r in rows for v in r["vs_mean_shadow"].values())]
    fig, axes = plt.subplots(1, len(methods), figsize=(len(methods) * SIZE[0], SIZE[1]),
                             sharey=True, squeeze=False)
    axes = axes[0]
    colors = {"skewed": "C0", "iid": "C3", "random": "C2"}
    for ax, method in zip(axes, methods):
        for kind, color in colors.items():
            for marker, pooled in (("o", False), ("s", True)):
                points = [(r["nem"], v[method]) for r in rows for name, v in
                          r["vs_mean_shadow"].items() if r["clients"][name]["kind"] == kind
                          and method in v and (r.get("group_size", 1) > 1) == pooled]
                if points:
                    ax.plot(*zip(*points), marker, color=color, ls="none", alpha=0.7,
                            mfc="none" if pooled else color,
                            label=f"{kind} clients" + (", pooled in groups" if pooled else ""))
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axhline(-0.05, color="red", ls="--", lw=0.8)
        log_x(ax)
        ax.set(xlabel="N·ε·√m", title=f"{method}: every client against the mean update")
    axes[0].set_ylabel("score − mean_shadow's score (accuracy)")
    axes[0].legend(fontsize=7)
    return fig


def plot_shadow_count(plt, data):
    """Top: gain vs the number K of shadow subsets, one panel per privacy level, one line per method
    (a translator fitted from several inits: its first init, and the band they span). Bottom: the
    provider's bill on the same axis, seconds for curation and fit (and, dotted on the right axis,
    its shadow fine-tunes)."""
    rows = [r for r in data["rows"] if r["skewed_gain"] is not None]
    levels = list(dict.fromkeys((r.get("n_train"), r["epsilon"]) for r in rows))
    fig, axes = plt.subplots(2, len(levels), figsize=(min(4.5 * len(levels), 13), 6.5),
                             sharex=True, sharey="row", squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    for (n_train, eps), top, bottom in zip(levels, axes[0], axes[1]):
        at = [r for r in rows if (r.get("n_train"), r["epsilon"]) == (n_train, eps)]
        for method in dict.fromkeys(r["method"] for r in at):
            mine = [r for r in at if r["method"] == method]
            first = sorted((r["K"], r["skewed_gain"], r["seconds"]) for r in mine
                           if r.get("init") in (0, None))
            Ks, gains, seconds = zip(*first)
            style = "s--" if method == "gradtx_best_init" else "o-"
            top.plot(Ks, gains, style, color=COLORS.get(method), label=method)
            if len({r.get("init") for r in mine}) > 1:      # the spread over inits
                spread = [[r["skewed_gain"] for r in mine if r["K"] == K] for K in Ks]
                top.fill_between(Ks, [min(g) for g in spread], [max(g) for g in spread],
                                 color=COLORS.get(method), alpha=0.2, label=f"{method}, inits")
            if method in ("gradtx", "gradtx_paper", "ridge"):
                bottom.plot(Ks, seconds, style, color=COLORS.get(method), label=method)
        finetunes = sorted({(r["K"], r["shadow_finetunes"]) for r in at if "shadow_finetunes" in r})
        if finetunes:
            twin = bottom.twinx()
            twin.plot(*zip(*finetunes), "k:", label="shadow fine-tunes")
            twin.set_ylabel("shadow fine-tunes", fontsize=8)
        if any(r["method"] == "gradtx_best_init" for r in at):   # lines the first panel lacks
            top.legend(fontsize=7)
        top.set(title=eps_label(eps) + (f", N = {n_train:,}" if n_train else ""))
        top.set_xscale("log", base=2)
        Ks = sorted({r["K"] for r in at})
        bottom.set(xlabel="shadow subsets K", xticks=Ks, xticklabels=[str(K) for K in Ks])
    axes[0][0].set_ylabel("gain recovered, skewed clients")
    axes[1][0].set_ylabel("provider's seconds")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    return fig


# -----------------------------------------------------------------------------
# what is in the folder, and the command


def figures_for(out):
    """[(file name, draw(plt) -> figure)] for everything drawable in `out`."""
    found = []
    if os.path.isfile(os.path.join(out, "results.json")):
        results = load(os.path.join(out, "results.json"))
        title = f"translator fit: {os.path.basename(os.path.normpath(out))}"
        found.append(("fit.png", lambda plt: plot_fit(plt, results, title)))
    runs = runs_of(out)
    # (the shadow-count experiment's dozens of runs: its one figure says it)
    for name, r in ({} if os.path.isfile(os.path.join(out, "shadow_count.json")) else runs).items():
        found.append((f"fit_{name}.png", lambda plt, r=r,
                      name=name: plot_fit(plt, r, f"translator fit: {name}")))
    if os.path.isfile(os.path.join(out, "dp.md")) and runs:
        found.append(("dp.png", lambda plt: plot_dp(plt, runs)))
    if os.path.isfile(os.path.join(out, "collab.md")) and runs:
        found.append(("pooling.png", lambda plt: plot_pooling(plt, runs)))
    for name, source, draw in (("frontier", "frontier", plot_frontier),
                               ("frontier_by_size", "frontier", plot_frontier_by_size),
                               ("frontier_harm", "frontier", plot_frontier_harm),
                               ("shadow_count", "shadow_count", plot_shadow_count)):
        path = os.path.join(out, f"{source}.json")
        if os.path.isfile(path):
            found.append((f"{name}.png", lambda plt, path=path, draw=draw: draw(plt, load(path))))
    pooled = {name: r for name, r in runs.items() if "pooling_gain_of_means" in skewed(r)}
    if os.path.isfile(os.path.join(out, "frontier.json")) and pooled:   # its runs with groups
        found.append(("pooling.png", lambda plt: plot_pooling(plt, pooled)))
    return found


def import_pyplot():
    """matplotlib's pyplot on a file-only backend, or exit 2 with one line saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tools/plots.py needs matplotlib, an optional extra of gradtx: "
              "pip install matplotlib", file=sys.stderr)
        raise SystemExit(2)
    return plt


def main(argv):
    parser = argparse.ArgumentParser(description="PNG figures from finished gradtx runs.")
    parser.add_argument("--out", required=True, help="a run's or an experiment's --out folder")
    parser.add_argument("--figures", default="",
                        help="where the PNG files go (default: OUT/figures)")
    args = parser.parse_args(argv)
    plt = import_pyplot()
    if not os.path.isdir(args.out):
        raise SystemExit(f"{args.out} is not a folder: expected the --out of a finished train.py "
                         "run")
    found = figures_for(args.out)
    if not found:
        raise SystemExit(f"nothing to draw in {args.out}: expected results.json, an experiment's "
                         "dp.md or collab.md with its runs' folders, frontier.json or "
                         "shadow_count.json")
    folder = args.figures or os.path.join(args.out, "figures")
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, draw in found:
        try:
            fig = draw(plt)
        # e.g. a results.json made before it kept the fit history
        except (KeyError, TypeError, ValueError) as e:
            print(f"{name}: skipped, its JSON lacks what it needs ({type(e).__name__}: {e})")
            continue
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=DPI)
        plt.close(fig)
        written.append(name)
    print(f"plots: {len(written)} figures -> {folder}: {', '.join(written)}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
