"""
tools/exercises.py -- the core pieces of gradtx as exercises, each checked by its own tests.

Inside a few function bodies the solution to an exercise sits between two marker lines, as in
nbgrader:

    ### BEGIN SOLUTION <name>
    ...
    ### END SOLUTION

A student copy of the repository replaces each such block, at its indentation, with one line

    raise NotImplementedError("exercise <name>: <hint> -- check with: python -m pytest -m <name>")

Each exercise has a pytest marker (pytest.ini) and tests that check it against an oracle that
needs no other exercise; a test that runs into ANOTHER exercise's blank code is skipped
(tests/conftest.py). So the exercises can be done in any order. EXERCISES.md is the guide.

Beside this tool, tools/exercise_mistakes.py keeps plausible wrong solutions, at least two per
exercise; --mistakes plants each one into a copy of the repository and shows that the exercise's
own tests catch it. A student copy leaves that file (and its tests) out: it quotes the solutions.

    python tools/exercises.py --list                          # the exercises, easiest first
    python tools/exercises.py --out ../student                # a student copy, every exercise blank
    python tools/exercises.py --out ../student --only rdp_step,lora_forward
    python tools/exercises.py --check                         # prove that every exercise works
    python tools/exercises.py --mistakes --list               # the known wrong solutions
    python tools/exercises.py --mistakes                      # prove that the tests catch them

Standard library only.
"""
import argparse
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (difficulty, the one-line hint the student sees), easiest first
EXERCISES = {
    "masked_cross_entropy": ("easy", "mean token cross-entropy over the positions where mask is 1 "
                                     "(every position when mask is None; an empty mask gives 0)"),
    "lora_forward": ("easy",
                     "the low-rank delta (alpha/r) * x (A0 + dA)^T B^T, shape (B, T, n_out)"),
    "rdp_to_epsilon": ("easy",
                       "the docstring's conversion at every order, then the smallest epsilon "
                               "and its order"),
    "one_se_rule": ("easy", "the first candidate whose mean paired difference to the best "
                            "candidate (per run) is at most one standard error of that "
                            "difference (std ddof=1 / sqrt(runs); a scalar: 0)"),
    "teacher_forcing": ("easy", "the model reads (src, tgt shifted right behind the zero start "
                                "token, base); return the mean squared error of its output "
                                "against tgt itself"),
    "update_vector": ("medium", "one token per layer: q.dA, q.B, v.dA, v.B flattened side by side "
                                "(get_update), and cut back into those shapes (split_update)"),
    "causal_attention": ("medium", "split q, k, v into heads, softmax(q k^T / sqrt(head_dim)) with "
                                   "future positions masked, att @ v, heads merged back into "
                                   "y (B, T, C)"),
    "autoregressive_decoding": ("medium",
                                "shift_right: an all-zero token, then y[:, :-1]; decode: tgt "
                                "starts as that token, then append the model's last output "
                                "n_tgt times"),
    "public_subspace": ("medium",
                        "public_basis: the mean and the top-k right singular vectors of the "
                                  "centred flat updates; project: mean + U U^T (x - mean)"),
    "ridge_dual": ("medium", "ridge_factors: z-score X and Y (std + 1e-8), keys = z(X), eigh of "
                             "keys keys^T keeping eigenvalues > 1e-9 * the largest, Qt_y = Q^T "
                             "z(Y); ridge_at: values = Q (Qt_y / (e + lam))"),
    "clip_and_noise": ("medium",
                       "norms (B,) of the rows of flat; g (D,): the rows clipped to norm <= clip, "
                                 "summed, plus Gaussian noise of std sigma*clip (once), over the "
                       "expected batch size"),
    "audit_bound": ("medium", "audit_p_value: beta + 2 m delta alpha from the log pmf of "
                              "Binomial(r, p = e^eps / (1 + e^eps)); epsilon_lower_bound: the "
                              "largest eps whose p-value is < 1 - confidence (double, bisect)"),
    "per_example_grads": ("hard", "per example, sum over its tokens: dA = s (B^T g_t) x_t^T, "
                                  "B = s g_t h_t^T with h_t = A x_t; one batched matmul each"),
    "rdp_step": ("hard",
                 "log of sum_i binom(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2)), "
                         "in log space (_log_add): the terms overflow a float"),
}

# the answer key's own files, left out of every copy: the known mistakes quote the solutions
ANSWER_KEY_ONLY = ("tools/exercise_mistakes.py", "tests/test_exercise_mistakes.py")

BEGIN = re.compile(r"^(\s*)### BEGIN SOLUTION (\w+)\s*$")
END = re.compile(r"^(\s*)### END SOLUTION\s*$")
# a block already blank (student copy)
BLANK = re.compile(r'^(\s+)raise NotImplementedError\("exercise (\w+):')


def blank_line(name, indent):
    hint = EXERCISES[name][1]
    message = f"exercise {name}: {hint} -- check with: python -m pytest -m {name}"
    return f'{indent}raise NotImplementedError("{message}")\n'


# -----------------------------------------------------------------------------
# finding the marked blocks


def repo_files(root):
    """The repository's files, relative to root: tracked and untracked-but-not-ignored (git), or,
    outside git, everything except .git, caches and out*/ run folders."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        files = sorted({f for f in out.split("\0") if f})
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in (".git", "__pycache__", ".pytest_cache")
                             and not (d == root and x.startswith("out")))
            files += [os.path.relpath(os.path.join(d, n), root)
                      for n in sorted(names) if not n.endswith(".pyc")]
    return [f for f in files if os.path.isfile(os.path.join(root, f))]


def find_blocks(path, lines):
    """[(name, first line, last line, indent)] of the marked blocks in one file (0-based,
    inclusive)."""
    blocks = []
    open_block = None
    for i, line in enumerate(lines):
        where = f"{path}:{i + 1}"
        if m := BEGIN.match(line):
            if open_block:
                raise SystemExit(f"{where}: BEGIN SOLUTION inside the block opened at line "
                                 f"{open_block[1] + 1}")
            if m.group(2) not in EXERCISES:
                raise SystemExit(f"{where}: unknown exercise {m.group(2)!r}; add it to EXERCISES "
                                 f"in {__file__}")
            if not m.group(1):
                raise SystemExit(f"{where}: markers go inside function bodies, not at module level")
            open_block = (m.group(2), i, m.group(1))
        elif (m := BLANK.match(line)) and not open_block and m.group(2) in EXERCISES:
            blocks.append((m.group(2), i, i, m.group(1)))
        elif m := END.match(line):
            if not open_block or m.group(1) != open_block[2]:
                raise SystemExit(f"{where}: END SOLUTION without a BEGIN SOLUTION at the same "
                                 "indentation")
            blocks.append((open_block[0], open_block[1], i, open_block[2]))
            open_block = None
    if open_block:
        raise SystemExit(f"{path}:{open_block[1] + 1}: BEGIN SOLUTION {open_block[0]} is never "
                         "closed")
    return blocks


def scan(root):
    """{path: (lines, blocks)} for every Python file with marked blocks (this tool excepted)."""
    found = {}
    for path in repo_files(root):
        full = os.path.join(root, path)
        if path.endswith(".py") and os.path.abspath(full) != os.path.abspath(__file__):
            with open(os.path.join(root, path), encoding="utf-8") as f:
                lines = f.readlines()
            if blocks := find_blocks(path, lines):
                found[path] = (lines, blocks)
    missing = set(EXERCISES) - {b[0] for _, blocks in found.values() for b in blocks}
    if missing:
        raise SystemExit(f"exercises without a marked block: {', '.join(sorted(missing))}")
    return found


def enclosing_function(lines, i):
    """'Class.method' or 'function' around line i, from the nearest less-indented def/class
    lines."""
    names = []
    indent = len(lines[i]) - len(lines[i].lstrip())
    for line in reversed(lines[:i]):
        m = re.match(r"(\s*)(?:async\s+)?(def|class)\s+(\w+)", line)
        if m and len(m.group(1)) < indent and (m.group(2) == "class" or not names):
            names.insert(0, m.group(3))
            indent = len(m.group(1))
    return ".".join(names)


def blanked(lines, blocks, names):
    """The file's text with the blocks of the exercises in `names` replaced by a raise."""
    out = []
    last = 0
    for name, first, end, indent in blocks:
        if name in names:
            out += lines[last:first] + [blank_line(name, indent)]
            last = end + 1
    return "".join(out + lines[last:])


# -----------------------------------------------------------------------------
# the student copy


def write_copy(root, out, names, found=None):
    """Copy the repository to `out` with the exercises in `names` blank, less ANSWER_KEY_ONLY;
    refuse to write in the repo."""
    root = os.path.realpath(root)
    out = os.path.realpath(out)
    if out == root or out.startswith(root + os.sep):
        raise SystemExit(f"refusing to write into the repository itself: {out}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SystemExit(f"{out} exists and is not an empty folder")
    found = scan(root) if found is None else found
    for path in (p for p in repo_files(root) if p not in ANSWER_KEY_ONLY):
        target = os.path.join(out, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if path in found:
            text = blanked(*found[path], names)
            compile(text, target, "exec")  # a student copy that does not even import helps no one
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            shutil.copy2(os.path.join(root, path), target)
    return out


def list_exercises(found):
    where = {}  # name -> {file: [function, ...]}
    for path, (lines, blocks) in found.items():
        for name, first, _, _ in blocks:
            functions = where.setdefault(name, {}).setdefault(path, [])
            if (f := enclosing_function(lines, first)) not in functions:
                functions.append(f)
    width = max(map(len, EXERCISES))
    for name, (difficulty, hint) in EXERCISES.items():
        places = "; ".join(f"{path}: {', '.join(fs)}" for path, fs in where[name].items())
        print(f"{name:<{width}}  {difficulty:<6}  {places}")
        print(f"{'':<{width}}  {'':<6}  {hint}")
        print(f"{'':<{width}}  {'':<6}  check: python -m pytest -m {name}")


# -----------------------------------------------------------------------------
# --check: each exercise's tests pass on the original, pass on a copy where ONLY that exercise is
# filled in (any order works), and fail on the student copy with that exercise's own
# NotImplementedError; every other test passes on the student copy or skips "needs exercise <name>"
# (or "needs a CUDA GPU" on a machine without one)


# why a test may skip on a student copy without it being a problem: a blank exercise it needs, or
# what this machine lacks (tests/test_cuda.py, tests/test_plots.py give these reasons)
ALLOWED_SKIPS = ("needs exercise ", "needs a CUDA GPU", "optional extra:")


def skip_is_allowed(message):
    """True for a skip that is no problem on a student copy (see ALLOWED_SKIPS)."""
    return message.startswith(ALLOWED_SKIPS)


def run_pytest(cwd, xml, marker_expr=None, paths=(), options=()):
    """{test id: (outcome, message)} of one pytest run; outcome is passed, failed or skipped."""
    # pytest's own plugins only: the tests use no others, and a third-party one loaded in every
    # run (hypothesis: ~1 s) costs more than most exercises' tests take
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *options, *paths]
    cmd += ["-m", marker_expr] if marker_expr else []
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1, 5) or not os.path.exists(xml):  # 5: no test selected
        raise SystemExit(f"pytest did not run in {cwd} (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    results = {}
    for case in ET.parse(xml).iter("testcase"):
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = f"{child.get('message', '')}\n{child.text or ''}".strip()
                break
        results[f"{case.get('classname')}::{case.get('name')}"] = (outcome, message)
    return results


def test_files_marked(root, name):
    """The test files that mention the marker: a run of `-m name` needs to collect only these."""
    tests = os.path.join(root, "tests")
    files = sorted(f for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py"))
    return [os.path.join("tests", f) for f in files
            if f"mark.{name}" in open(os.path.join(tests, f), encoding="utf-8").read()]


def node_id(root, test):
    """'tests.test_x::test_y[1]' (a junit test id) -> 'tests/test_x.py::test_y[1]' (pytest's)."""
    classname, _, name = test.partition("::")
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if os.path.exists(os.path.join(root, path)):
            return "::".join([path, *parts[i:], name])
    return test


def describe(outcome, message):
    return f"{outcome}: {message.splitlines()[0]}" if message else outcome


def run_everything(root, names):
    """Build the copies in a temp dir and run pytest on each, two processes at a time.
    Returns {"original": ..., "student": ..., name: ...} of run_pytest results, where runs[name] is
    the copy with only `name` filled in, running the tests marked `name` (so: the list of them)."""
    found = scan(root)
    files = {n: test_files_marked(root, n) for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        student = write_copy(root, os.path.join(tmp, "student"), set(names), found)
        jobs = [("student", student, None, []),   # (what, folder, marker expression, test files)
                ("original", root, " or ".join(names),
                 sorted({f for fs in files.values() for f in fs}))]
        jobs += [(n, write_copy(root, os.path.join(tmp, n), set(names) - {n}, found), n, files[n])
                 for n in names]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {what: pool.submit(run_pytest, cwd, os.path.join(tmp, f"{what}.xml"), expr,
                                         paths)
                       for what, cwd, expr, paths in jobs}
            return {what: f.result() for what, f in futures.items()}


def check(root):
    t0 = time.time()
    with open(os.path.join(root, "pytest.ini"), encoding="utf-8") as f:
        ini = f.read()
    unregistered = [n for n in EXERCISES if not re.search(rf"^\s+{n}:", ini, re.M)]
    if unregistered or "--strict-markers" not in ini:
        raise SystemExit(f"pytest.ini must register every exercise marker and use --strict-markers "
                         f"(missing: {', '.join(unregistered) or 'none'})")
    names = list(EXERCISES)
    problems = []
    runs = run_everything(root, names)
    student = runs["student"]
    original = runs["original"]
    passes = {t for t, (o, _) in original.items() if o == "passed"}

    print(f"{'exercise':<24} {'tests':>5}  pass on the original  pass alone  fail on the student "
          "copy")
    for n in names:
        alone = runs[n]
        fails = {t for t, (o, msg) in student.items() if o == "failed" and f"exercise {n}:" in msg}
        if not alone:
            problems.append(f"{n}: no test is marked with it")
        for t, (o, msg) in alone.items():
            if t not in passes:
                problems.append(f"{n}: {t} does not pass on the original "
                                f"({describe(*original.get(t, ('missing', '')))})")
            if o != "passed":
                problems.append(f"{n}: with only {n} filled in, {t} does not pass "
                                f"({describe(o, msg)})")
            if t not in fails:
                problems.append(f"{n}: {t} does not fail with exercise {n}'s error on the student "
                                f"copy ({describe(*student.get(t, ('missing', '')))})")
        print(f"{n:<24} {len(alone):>5}  {len(set(alone) & passes):>20}  "
              f"{sum(o == 'passed' for o, _ in alone.values()):>10}  {len(set(alone) & fails):>24}")

    marked = {t for n in names for t in runs[n]}
    others = {t: r for t, r in student.items() if t not in marked}
    skips = {t: msg for t, (o, msg) in others.items() if o == "skipped"}
    # a skip for what this machine lacks (an optional extra, a GPU) is not the student copy's doing
    bad = {t: r for t, r in others.items()
           if r[0] == "failed" or (r[0] == "skipped" and not skip_is_allowed(r[1]))}
    on_original = {}
    if bad:   # the same tests on the original: is it the student copy's doing at all?
        with tempfile.TemporaryDirectory() as tmp:
            on_original = run_pytest(root, os.path.join(tmp, "again.xml"),
                                     paths=[node_id(root, t) for t in bad])
    for t, (o, msg) in bad.items():
        if on_original.get(t, ("missing", ""))[0] == o:
            problems.append(f"{t} {o} on the original too, so not because of the student copy "
                            f"({describe(o, msg)})")
        else:
            problems.append(f"the student copy breaks {t}, which no exercise marks "
                            f"({describe(o, msg)})")
    reasons = sorted({msg.splitlines()[0] for msg in skips.values()})
    print(f"\nthe other tests on the student copy (every exercise blank): "
          f"{len(others) - len(skips)} pass, {len(skips)} skip ({'; '.join(reasons) or 'none'})")
    for p in problems:
        print(f"FAIL {p}")
    print(f"\n--check: {len(names)} exercises, {len(problems)} problems, {time.time() - t0:.0f}s")
    return not problems


# -----------------------------------------------------------------------------
# --mistakes: plausible wrong solutions (tools/exercise_mistakes.py), each planted into a copy of
# the repository; the exercise's own tests must fail on every one of them


def load_mistakes():
    """{exercise: [mistake, ...]} from tools/exercise_mistakes.py (data: standard library only)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exercise_mistakes.py")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is not here: a student copy leaves it out (it quotes the "
                         "solutions); the repository itself has it")
    spec = importlib.util.spec_from_file_location("exercise_mistakes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MISTAKES


def plant(found, exercise, mistake):
    """{path: text} of the files that `mistake` changes: each (old, new) edit must occur exactly
    once in the bodies of the exercise's blocks (only those in mistake["function"], if given),
    wherever in the repository they now are. Raises ValueError when an edit no longer applies."""
    texts = {path: "".join(lines) for path, (lines, blocks) in found.items()
             if any(b[0] == exercise for b in blocks)}
    changed = set()
    for old, new in mistake["edits"]:
        hits = []   # (path, start, end) of each occurrence, as character offsets
        for path, text in texts.items():
            lines = text.splitlines(keepends=True)
            offsets = [0]
            for line in lines:
                offsets.append(offsets[-1] + len(line))
            for name, first, end, _ in find_blocks(path, lines):
                where = enclosing_function(lines, first).split(".")[-1]
                if name != exercise or mistake.get("function", where) != where:
                    continue
                body = text[offsets[first + 1]:offsets[end]]
                at = body.find(old)
                while at >= 0:
                    hits.append((path, offsets[first + 1] + at, offsets[first + 1] + at + len(old)))
                    at = body.find(old, at + 1)
        if len(hits) != 1:
            raise ValueError(f"{len(hits)} matches (not 1) of {old!r} in the blocks of "
                             f"{exercise} {mistake.get('function', '')}".rstrip())
        path, start, end = hits[0]
        texts[path] = texts[path][:start] + new + texts[path][end:]
        changed.add(path)
    for path in changed:
        compile(texts[path], path, "exec")   # a mistake that does not even parse shows nothing
    return {path: texts[path] for path in changed}


# the first failure of a planted mistake must be the mistake's doing, not a mistake that cannot run
BROKEN = ("NameError", "UnboundLocalError", "AttributeError", "ImportError", "ModuleNotFoundError",
          "SyntaxError", "IndentationError")


def try_mistake(root, found, tmp, exercise, mistake, files):
    """(verdict, seconds, what failed first) for one mistake: caught, NOT CAUGHT, broken or
    stale."""
    t0 = time.time()
    try:
        changed = plant(found, exercise, mistake)
    except ValueError as e:     # the code it edits has changed
        return "stale", 0.0, str(e)
    except SyntaxError as e:    # the mistake itself does not parse
        return "broken", 0.0, f"SyntaxError: {e}"
    folder = os.path.join(tmp, f"{exercise}.{mistake['name']}")
    write_copy(root, folder, set(), found)
    for path, text in changed.items():
        with open(os.path.join(folder, path), "w", encoding="utf-8") as f:
            f.write(text)
    # -x: the first failure is enough to show that the mistake is caught
    try:
        results = run_pytest(folder, folder + ".xml", exercise, files, options=["-x"])
    except SystemExit as e:   # e.g. the planted code fails as the test files are collected
        return "broken", time.time() - t0, str(e).splitlines()[0]
    finally:
        shutil.rmtree(folder)
    failed = [(t, msg) for t, (o, msg) in results.items() if o == "failed"]
    if not failed:
        skipped = sum(o == "skipped" for o, _ in results.values())
        return "NOT CAUGHT", time.time() - t0, f"{len(results) - skipped} pass, {skipped} skip"
    test, message = failed[0]
    first = message.splitlines()[0] if message else "failed"
    verdict = "broken" if first.startswith(BROKEN) else "caught"
    module, _, name = test.partition("::")
    return verdict, time.time() - t0, f"{module.rsplit('.', 1)[-1]}::{name}: {first}"


def list_mistakes(mistakes, names):
    for name in names:
        print(f"{name}  ({len(mistakes.get(name, []))} mistakes)")
        for m in mistakes.get(name, []):
            print(f"  {m['name']:<28} {m['why']}")


def check_mistakes(root, names):
    """Plant each mistake of the exercises in `names` into its own copy (two at a time) and run
    that exercise's tests on it; True when every mistake is caught."""
    t0 = time.time()
    mistakes = load_mistakes()
    found = scan(root)
    problems = [f"{n}: fewer than 2 mistakes" for n in names if len(mistakes.get(n, [])) < 2]
    problems += [f"{n}: not an exercise" for n in mistakes if n not in EXERCISES]
    jobs = [(n, m) for n in names for m in mistakes.get(n, [])]
    files = {n: test_files_marked(root, n) for n in names}
    print(f"{'exercise':<24} {'mistake':<28} {'verdict':<10} {'time':>5}  first failure")
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(try_mistake, root, found, tmp, n, m, files[n]) for n, m in jobs]
        for (n, m), future in zip(jobs, futures):
            verdict, seconds, detail = future.result()
            print(f"{n:<24} {m['name']:<28} {verdict:<10} {seconds:>4.0f}s  {detail[:120]}",
                  flush=True)
            if verdict != "caught":
                problems.append(f"{n}: mistake {m['name']} is {verdict}: {detail}")
    for p in problems:
        print(f"FAIL {p}")
    print(f"\n--mistakes: {len(jobs)} mistakes in {len(names)} exercises, {len(problems)} "
          f"problems, {time.time() - t0:.0f}s")
    return not problems


def main(argv=None):
    parser = argparse.ArgumentParser(description="gradtx exercises: list them, write a student "
                                     "copy, check them and their known mistakes.")
    parser.add_argument("--list", action="store_true",
                        help="print the exercises with their file, difficulty and check command "
                        "(with --mistakes: the known mistakes)")
    parser.add_argument("--out", metavar="DIR",
                        help="write a student copy of the repository to DIR (new or empty)")
    parser.add_argument("--only", metavar="A,B",
                        help="with --out: blank only these exercises; with --mistakes: only "
                        "these exercises' mistakes")
    parser.add_argument("--check", action="store_true",
                        help="verify every exercise on a student copy in a temp dir")
    parser.add_argument("--mistakes", action="store_true",
                        help="plant each known mistake (tools/exercise_mistakes.py) in a copy and "
                        "show that the exercise's tests catch it")
    args = parser.parse_args(argv)
    modes = sum(map(bool, (args.list and not args.mistakes, args.out, args.check, args.mistakes)))
    if modes != 1 or (args.only and not (args.out or args.mistakes)):
        parser.error("give exactly one of --list, --out DIR [--only A,B], --check, "
                     "--mistakes [--list] [--only A,B]")
    names = (set(EXERCISES) if args.only is None
             else {n.strip() for n in args.only.split(",") if n.strip()})
    if unknown := names - set(EXERCISES):
        parser.error(f"unknown exercise(s) {', '.join(sorted(unknown))}; --list shows them")
    names = [n for n in EXERCISES if n in names]   # easiest first
    if args.mistakes:
        if args.list:
            list_mistakes(load_mistakes(), names)
        else:
            sys.exit(0 if check_mistakes(ROOT, names) else 1)
    elif args.list:
        list_exercises(scan(ROOT))
    elif args.out:
        out = write_copy(ROOT, args.out, set(names))
        print(f"student copy with {len(names)} exercise(s) blank: {out}\n"
              f"  cd {out} && python -m pytest -m <exercise>     (EXERCISES.md lists them)")
    else:
        sys.exit(0 if check(ROOT) else 1)


if __name__ == "__main__":
    main()
