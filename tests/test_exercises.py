"""Tests for tools/exercises.py, the student-copy maker (EXERCISES.md). Oracles: the repository's
own files (outside the marked blocks the copy is the same text, docstrings included, read back
with ast), and the tool's refusals. The exercises' own tests run with `python tools/exercises.py --check`.

Run:  python -m pytest tests/test_exercises.py -q
"""
import ast
import importlib.util
import os
import re

import pytest
from conftest import blank_exercise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("exercises", os.path.join(ROOT, "tools", "exercises.py"))
exercises = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exercises)

RAISE = re.compile(r'^\s+raise NotImplementedError\("exercise (\w+): .* -- check with: python -m pytest -m \1"\)$')


def without_exercises(text):
    """The text with every marked block (markers included) and every blank exercise line removed."""
    lines, inside = [], False
    for line in text.splitlines():
        if "### BEGIN SOLUTION" in line:
            inside = True
        elif "### END SOLUTION" in line:
            inside = False
        elif not inside and not RAISE.match(line):
            lines.append(line)
    return lines


def docstrings(text):
    return {node.name: ast.get_docstring(node) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("only", [None, ("rdp_step", "update_vector")])
def test_student_copy_blanks_exactly_the_marked_blocks(tmp_path, only):
    names = set(exercises.EXERCISES) if only is None else set(only)
    out = exercises.write_copy(ROOT, str(tmp_path / "student"), names)
    blank, already_blank = set(), set()  # (a student copy's own copy: its blanks stay blank)
    for path in exercises.repo_files(ROOT):
        if path in exercises.ANSWER_KEY_ONLY:   # the known mistakes quote the solutions
            assert not os.path.exists(os.path.join(out, path)), path
            continue
        with open(os.path.join(ROOT, path), "rb") as f:
            original = f.read()
        with open(os.path.join(out, path), "rb") as f:
            copy = f.read()
        if not path.endswith(".py") or path == os.path.join("tools", "exercises.py"):
            assert copy == original, path   # byte for byte (the figures are PNG files)
            continue
        original, copy = original.decode("utf-8"), copy.decode("utf-8")
        assert without_exercises(copy) == without_exercises(original), path     # the rest is untouched
        assert docstrings(copy) == docstrings(original), path                   # students keep them
        blank |= {m.group(1) for line in copy.splitlines() if (m := RAISE.match(line))}
        already_blank |= {m.group(1) for line in original.splitlines() if (m := RAISE.match(line))}
        assert not re.search(rf"### BEGIN SOLUTION ({'|'.join(names)})\s", copy), path
    assert blank == names | already_blank


def test_the_tool_never_writes_into_the_repository(tmp_path):
    for inside in (ROOT, os.path.join(ROOT, "tests", "student")):
        with pytest.raises(SystemExit, match="refusing to write into the repository"):
            exercises.write_copy(ROOT, inside, set(exercises.EXERCISES))
    (tmp_path / "somebodys_file").write_text("keep me")
    with pytest.raises(SystemExit, match="not an empty folder"):
        exercises.write_copy(ROOT, str(tmp_path), set(exercises.EXERCISES))


@pytest.mark.parametrize("lines,error", [
    (["def f():\n", "    ### BEGIN SOLUTION rdp_step\n", "    return 1\n"], "never closed"),
    (["def f():\n", "    return 1\n", "    ### END SOLUTION\n"], "without a BEGIN"),
    (["def f():\n", "    ### BEGIN SOLUTION rdp_step\n", "    ### BEGIN SOLUTION rdp_step\n"], "inside the block"),
    (["### BEGIN SOLUTION rdp_step\n", "x = 1\n", "### END SOLUTION\n"], "module level"),
    (["def f():\n", "    ### BEGIN SOLUTION no_such_exercise\n", "    ### END SOLUTION\n"], "unknown exercise"),
])
def test_malformed_markers_are_refused_with_their_line(lines, error):
    with pytest.raises(SystemExit, match=rf"toy\.py:\d+: .*{error}"):
        exercises.find_blocks("toy.py", lines)


def test_a_blank_exercise_is_recognised_behind_other_exceptions():
    blank = NotImplementedError("exercise rdp_step: a hint -- check with: python -m pytest -m rdp_step")
    try:
        try:
            raise blank
        except NotImplementedError as e:
            raise ValueError("while computing epsilon") from e
    except ValueError as wrapped:
        assert blank_exercise(wrapped) == "rdp_step"
    assert blank_exercise(NotImplementedError("not an exercise")) is None
    assert blank_exercise(ValueError("exercise rdp_step: not a NotImplementedError")) is None


# -----------------------------------------------------------------------------
# --check on a machine without a GPU or matplotlib: those skips are no problem, others are


def test_skips_for_what_the_machine_lacks_are_allowed_and_no_others():
    tests = os.path.join(ROOT, "tests")
    reasons = re.findall(r'reason="([^"]+)"', open(os.path.join(tests, "test_cuda.py")).read()
                         + open(os.path.join(tests, "test_plots.py")).read())
    assert reasons and all(exercises.skip_is_allowed(r) for r in reasons)   # what the tests say
    assert exercises.skip_is_allowed("needs exercise rdp_step")
    for other in ("could not import 'gradtx'", "needs exercise", "", "skipped: optional extra"):
        assert not exercises.skip_is_allowed(other), other


def test_a_junit_test_id_becomes_a_pytest_node_id():
    assert exercises.node_id(ROOT, "tests.test_dp::test_x[0.5-2]") == "tests/test_dp.py::test_x[0.5-2]"
    assert exercises.node_id(ROOT, "tests.test_dp.TestA::test_x") == "tests/test_dp.py::TestA::test_x"
