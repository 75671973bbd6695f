"""
tools/check_run.py -- did my run work? Compares a finished run's results.json with the shipped
reference run (runs/default_seed0.json, the README's table) method by method, and says whether the
headline numbers are within the bands below. Exit code 0: every check holds; 1: one does not.

    python train.py --out=out
    python tools/check_run.py out/results.json
    python tools/check_run.py out/results.json --reference=runs/default_seed0.json

Why bands, not equality: on one machine a run is deterministic, but another CPU's float kernels
give other numbers, and pretraining amplifies the difference (single accuracies have moved by up
to 14 points between two 2-core machines while the conclusions held). The bands are the spread
the docs report over seeds, rounded up: seeds 0 and 1 in RESULTS.md ("The protocol without
privacy"), seeds 0, 1 and 2 in HISTORY.md ("The protocol on three seeds"):

- `skewed gain`, the skewed clients' gain recovered of means (the table's second column):
  within 0.10 of the reference for every method, 0.15 for the weak baselines (w2s, w2s_conf,
  vissup, kd) and the client's TinyLM (tinylm_ft), whose seed-to-seed spread is wider
  (w2s 0.62-0.70 over three seeds, gradtx 0.99-1.02).
- `gain of means`, the gain recovered of the mean scores over every client: the same bands.
- `worst client`, the worst client's score minus its mean shadow update's: within 0.10 of the
  reference, and for the provider's methods (gradtx, ridge) never below -0.05 (do no harm: no
  client made worse off by uploading), whatever the reference says.

llm_base (0) and llm_ft (1) define the gain, so their gain checks always hold. A method missing
from either file is reported and skipped, not failed: a run with `--weak_baselines=false` still
checks. Reads the two JSON files only; imports nothing of the method.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "runs", "default_seed0.json")
BAND = 0.10            # skewed gain and gain of means, most methods
WIDE_BAND = 0.15       # the same for the weak baselines and the client's own TinyLM
WIDE = ("w2s", "w2s_conf", "vissup", "kd", "tinylm_ft")
WORST_BAND = 0.10      # worst client vs mean_shadow
HARM_FLOOR = -0.05     # do no harm, for the provider's methods
PROVIDER = ("gradtx", "ridge")


def headline(results):
    """{method: {"skewed gain", "gain of means", "worst client"}} of one results.json."""
    summary = results["summary"]
    skewed = summary["by_kind"].get("skewed", {}).get("gain_of_means", {})
    return {m: {"skewed gain": skewed.get(m),
                "gain of means": summary["gain_of_means"].get(m),
                "worst client": summary["worst_vs_mean_shadow"].get(m)}
            for m in summary["scores"]}


def check(run, reference):
    """[(method, what, value, reference value, ok, why)] for every headline number of every method
    both runs have; a method only one of them has gives one row with ok None."""
    mine, theirs = headline(run), headline(reference)
    rows = []
    for method in list(theirs) + [m for m in mine if m not in theirs]:
        if method not in mine or method not in theirs:
            where = "the reference" if method not in theirs else "this run"
            rows.append((method, "-", None, None, None, f"not in {where}: skipped"))
            continue
        band = WIDE_BAND if method in WIDE else BAND
        for what in ("skewed gain", "gain of means", "worst client"):
            value, ref = mine[method][what], theirs[method][what]
            if value is None or ref is None:
                rows.append((method, what, value, ref, None, "undefined: skipped"))
                continue
            limit = WORST_BAND if what == "worst client" else band
            ok = abs(value - ref) <= limit + 1e-9
            why = f"within {limit:.2f}" if ok else f"off by {value - ref:+.2f} (band {limit:.2f})"
            if what == "worst client" and method in PROVIDER and value < HARM_FLOOR:
                ok, why = False, f"below {HARM_FLOOR:+.2f}: a client was made worse off"
            rows.append((method, what, value, ref, ok, why))
    return rows


def fmt(value):
    return "n/a" if value is None else f"{value:+.2f}"


def report(rows):
    """One line per check, then a verdict; returns True when no check failed."""
    for method, what, value, ref, ok, why in rows:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[ok]
        print(f"{mark} {method:<12} {what:<14} {fmt(value):>6} (reference {fmt(ref):>6})  {why}")
    failed = [r for r in rows if r[4] is False]
    print(f"\n{len(failed)} of {sum(r[4] is not None for r in rows)} checks outside their bands: "
          + ("your run agrees with the reference." if not failed else "see the FAIL lines."))
    return not failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a finished run's results.json")
    parser.add_argument("--reference", default=REFERENCE, help="the run to compare with")
    args = parser.parse_args(argv)
    with open(args.results, encoding="utf-8") as f:
        run = json.load(f)
    with open(args.reference, encoding="utf-8") as f:
        reference = json.load(f)
    if "skewed" not in run["summary"]["by_kind"]:
        print(f"{args.results}: no skewed clients (the text task?): this compares arith runs only")
        return 1
    return 0 if report(check(run, reference)) else 1


if __name__ == "__main__":
    sys.exit(main())
