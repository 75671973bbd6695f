"""The documentation speaks of the project alone: no pointers to documents outside the repository
(a spec's sections, issue numbers, notes of how it was built), and every relative link in
README.md, RESULTS.md and EXERCISES.md leads to a file, and a heading, that exists."""
import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "RESULTS.md", "HISTORY.md", "EXERCISES.md"]
OUTSIDE = re.compile(r"\bSPEC\b|§\s?\d|\b[Ii]ssues? #?\d+|\b[Ss]essions?\b|DEVELOPERS\.md|STYLE\.md")


def python_files(root):
    """Every tracked *.py file (every *.py file outside git, e.g. in a student copy), relative to root."""
    try:
        done = subprocess.run(["git", "ls-files", "*.py"], cwd=root, capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "out", "__"))]   # git, caches, runs
        found += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in files if f.endswith(".py")]
    return sorted(found)


def outside_references(paths, root=ROOT, comments_only=()):
    """'file:line: text' for each line that points outside the repository; for the files in
    comments_only (test code, where pytest's own words may match) only what follows a '#'."""
    found = []
    for path in paths:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                text = line.partition("#")[2] if path in comments_only else line
                if OUTSIDE.search(text):
                    found.append(f"{path}:{number}: {line.strip()}")
    return found


def test_the_docs_and_the_code_speak_of_the_project_alone():
    code = [p for p in python_files(ROOT) if p != "tests/test_docs.py"]   # (this file names the patterns)
    tests = [p for p in code if p.startswith("tests/")]
    found = outside_references([d for d in DOCS if os.path.exists(os.path.join(ROOT, d))] + code,
                               comments_only=tests)
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_the_checker_finds_a_spec_section_and_an_issue_number(tmp_path):
    (tmp_path / "notes.md").write_text("A clean line.\nAs SPEC §3 asks.\nFixes issue 12.\n")
    (tmp_path / "test_x.py").write_text('scope = "session"  # pytest words in code pass\n# see Issue #4\n')
    assert outside_references(["notes.md", "test_x.py"], tmp_path, comments_only=["test_x.py"]) == [
        "notes.md:2: As SPEC §3 asks.", "notes.md:3: Fixes issue 12.", "test_x.py:2: # see Issue #4"]


# -----------------------------------------------------------------------------
# relative links


def anchors(path):
    """The anchors GitHub gives a markdown file's headings (lower case, punctuation dropped, spaces
    to hyphens; a repeated heading gets -1, -2, ...), skipping fenced code."""
    seen, fenced = {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
                slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
                seen[slug] = seen.get(slug, -1) + 1
                yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def broken_links(doc, root=ROOT):
    broken = []
    with open(os.path.join(root, doc), encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):       # http:, https:, mailto: are not ours to check
            continue
        file, _, anchor = target.partition("#")
        path = os.path.join(root, os.path.dirname(doc), file or doc)
        if not os.path.exists(path) or (anchor and anchor not in set(anchors(path))):
            broken.append(f"{doc}: ({target})")
    return broken


def test_every_relative_link_in_the_docs_leads_somewhere():
    assert [link for doc in DOCS for link in broken_links(doc)] == []


def test_the_link_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "A.md").write_text("# Top: the start\n```\n# not a heading\n```\n"
                                   "[ok](#top-the-start) [ok](A.md#top-the-start) [web](https://x.org/#y)\n"
                                   "[gone](B.md) [no heading](#not-a-heading)\n")
    assert broken_links("A.md", tmp_path) == ["A.md: (B.md)", "A.md: (#not-a-heading)"]


# -----------------------------------------------------------------------------
# line length: the modules and tools read in a narrow window, or side by side


def long_lines(paths, root=ROOT, limit=100):
    """'file:line: N characters' for each line of paths longer than limit. An exercise left blank
    in a student copy (tools/exercises.py) is one long `raise NotImplementedError(...)`: not counted."""
    found = []
    for path in paths:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            found += [f"{path}:{number}: {len(line)} characters"
                      for number, line in enumerate((line.rstrip("\n") for line in f), 1)
                      if len(line) > limit
                      and not line.lstrip().startswith('raise NotImplementedError("exercise ')]
    return found


def test_no_line_of_the_modules_or_tools_is_over_100_characters():
    code = [p for p in python_files(ROOT) if not p.startswith("tests/")]
    found = long_lines(code)
    assert code and not found, "\n".join(found)


def test_the_length_checker_counts_characters_and_passes_an_exercise_blank(tmp_path):
    blank = '    raise NotImplementedError("exercise rdp_step: ' + "h" * 100 + '")'
    (tmp_path / "x.py").write_text("ε" * 100 + "\n" + "x" * 101 + "\n" + blank + "\n",
                                   encoding="utf-8")
    assert long_lines(["x.py"], tmp_path) == ["x.py:2: 101 characters"]


# -----------------------------------------------------------------------------
# the reading path: six modules a student reads top to bottom, written for the reader, never
# squeezed to fit a line count (STYLE: "Never squeeze to fit")

CORE = ["data.py", "dp.py", "tinylm.py", "gradtx.py", "eval.py", "train.py"]
MAX_FUNCTION = 40   # lines, docstring included; the exercises' marker lines are not counted
# A function may run longer when it says why: either a comment line `# long: <reason>` right under
# its docstring (the convention in the code), or an entry here, "file:function": "reason".
LONG_FUNCTIONS = {}


def is_marker(line):
    return line.lstrip().startswith(("### BEGIN SOLUTION", "### END SOLUTION"))


def says_why_it_is_long(node, lines):
    """True when a comment line `# long: <reason>` stands between the function's docstring (or
    its def line) and its first statement."""
    body = node.body
    docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                 and isinstance(body[0].value.value, str))
    start = body[0].end_lineno if docstring else node.lineno
    rest = body[1:] if docstring else body
    stop = rest[0].lineno - 1 if rest else node.end_lineno
    return any(line.strip().startswith("# long:") for line in lines[start:stop])


def same_names(targets, values):
    """A swap or a reorder of the same names (`a, b = b, a`): one idea, not two."""
    return sorted(map(ast.unparse, targets)) == sorted(map(ast.unparse, values))


def unrelated_tuple_assignment(node):
    """An assignment whose targets and value are both tuples of two or more (`a, b = f(x), g(y)`):
    two statements on one line. A plain unpacking of one value (`B, T, C = x.shape`,
    `a, b = pair`) is fine, and so is a swap of the same names (`a, b = b, a`)."""
    if not isinstance(node, ast.Assign):
        return False
    target, value = node.targets[0], node.value
    if not (isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)):
        return False
    if len(target.elts) < 2 or len(value.elts) < 2:
        return False
    return not same_names(target.elts, value.elts)


def squeezed(paths, root=ROOT, max_function=MAX_FUNCTION, allowed=None):
    """'file:line: what' for each squeeze in paths: a named lambda (`name = lambda`,
    `property(lambda`), a `# noqa`, an unrelated tuple assignment, a function over max_function
    lines (its docstring included, the exercises' marker lines not) that does not say why."""
    allowed = LONG_FUNCTIONS if allowed is None else allowed
    found = []
    for path in paths:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            source = f.read()
        lines = source.splitlines()
        for number, line in enumerate(lines, 1):
            code = line.split("#", 1)[0]
            if re.search(r"^\s*[\w.]+\s*(:[^=]+)?=\s*lambda\b", code) or "property(lambda" in code:
                found.append(f"{path}:{number}: named lambda")
            if re.search(r"#\s*noqa", line):
                found.append(f"{path}:{number}: # noqa")
        for node in ast.walk(ast.parse(source)):
            if unrelated_tuple_assignment(node):
                found.append(f"{path}:{node.lineno}: unrelated tuple assignment")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = sum(not is_marker(line) for line in lines[node.lineno - 1:node.end_lineno])
                if (n > max_function and f"{path}:{node.name}" not in allowed
                        and not says_why_it_is_long(node, lines)):
                    found.append(f"{path}:{node.lineno}: {node.name} is {n} lines, says not why")
    return found


def test_the_six_modules_are_written_for_the_reader_not_squeezed():
    assert squeezed(CORE) == []


def test_the_squeeze_checker_finds_each_pattern(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(41))
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "split = lambda t: t  # noqa: E731\n"                          # 2: lambda and noqa
        "size = property(lambda self: 1)\n"                            # 3: lambda
        "a, b = len([]), abs(-1)\n"                                    # 4: unrelated
        "B, T, C = torch.zeros(1, 2, 3).shape\n"                       # a plain unpacking: fine
        "a, b = b, a\n"                                                # a swap: fine
        "key = sorted([], key=lambda t: t)\n"                          # an inline lambda: fine
        f"def long():\n    \"\"\"Doc.\"\"\"\n{body}\n"                   # 8: 43 lines
        f"def long_why():\n    \"\"\"Doc.\"\"\"\n    # long: one loop\n{body}\n"
        f"def long_listed():\n{body}\n"
        "def short():\n    ### BEGIN SOLUTION x\n    return 1\n    ### END SOLUTION\n")
    assert squeezed(["m.py"], tmp_path, allowed={"m.py:long_listed": "a test"}) == [
        "m.py:2: named lambda", "m.py:2: # noqa", "m.py:3: named lambda",
        "m.py:4: unrelated tuple assignment", "m.py:8: long is 43 lines, says not why"]


# -----------------------------------------------------------------------------
# the documents' size: a first hour's README, a RESULTS that holds the current results only

SIZES = {"README.md": 12_000, "RESULTS.md": 50_000}


def test_the_readme_and_results_fit_their_size_and_results_says_no_today():
    sizes = {doc: os.path.getsize(os.path.join(ROOT, doc)) for doc in SIZES}
    assert all(sizes[doc] <= limit for doc, limit in SIZES.items()), sizes
    with open(os.path.join(ROOT, "RESULTS.md"), encoding="utf-8") as f:
        todays = re.findall(r"\btoday\b", f.read(), flags=re.I)
    assert not todays, f"RESULTS.md says 'today' {len(todays)} times: name the commit instead"


# -----------------------------------------------------------------------------
# the documented numbers: the README's and RESULTS' default table is the table of the run kept in
# runs/ (its results.json, less the translator's fit curve), so a table edited by hand, or one run
# regenerated without the other, fails here

DOCUMENTED_RUNS = {"runs/default_seed0.json": ["README.md", "RESULTS.md"]}


def stale_tables(runs=DOCUMENTED_RUNS, root=ROOT):
    """'doc: run' for each doc that does not show its run's table, or does not name its commit."""
    import json
    import sys
    sys.path.insert(0, root)
    import eval as evaluation
    stale = []
    for run, docs in runs.items():
        with open(os.path.join(root, run), encoding="utf-8") as f:
            results = json.load(f)
        table = evaluation.results_table(results)
        commit = (results["provenance"]["commit"] or "")[:7]
        for doc in docs:
            with open(os.path.join(root, doc), encoding="utf-8") as f:
                text = f.read()
            if table not in text or not commit or commit not in text:
                stale.append(f"{doc}: {run}")
    return stale


def test_the_documented_default_table_is_its_runs_table():
    assert stale_tables() == []


def test_the_table_checker_catches_an_edited_number(tmp_path):
    import json
    import shutil
    (tmp_path / "runs").mkdir()
    shutil.copy(os.path.join(ROOT, "runs", "default_seed0.json"), tmp_path / "runs" / "r.json")
    results = json.load(open(tmp_path / "runs" / "r.json"))
    import eval as evaluation
    table = evaluation.results_table(results)
    commit = results["provenance"]["commit"][:7]
    (tmp_path / "A.md").write_text(f"commit {commit}\n\n{table}\n")
    (tmp_path / "B.md").write_text(f"commit {commit}\n\n{table.replace('| gradtx | ', '| gradtx | 9')}\n")
    assert stale_tables({"runs/r.json": ["A.md", "B.md"]}, tmp_path) == ["B.md: runs/r.json"]


# -----------------------------------------------------------------------------
# the README's code runs: "Translate one saved upload" on a toy-sized run's --out


def readme_snippet(heading="## Translate one saved upload"):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_translates_one_saved_upload(tmp_path, capsys):
    import json
    import train
    from conftest import TINY_RUN
    out = str(tmp_path / "run")
    train.main(TINY_RUN + [f"--out={out}"])
    capsys.readouterr()
    code = readme_snippet().replace('out = "out"', f"out = {out!r}")
    assert f"out = {out!r}" in code
    exec(compile(code, "README.md", "exec"), {})
    name, score = capsys.readouterr().out.split()
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        client = json.load(f)["clients"][0]
    assert (name, float(score)) == (client["name"], client["scores"]["gradtx"])
