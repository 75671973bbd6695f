"""Tests of the known mistakes (tools/exercise_mistakes.py), data that must fit the code as it is
now, and of how tools/exercises.py plants them. Whether each exercise's tests catch its mistakes:
python tools/exercises.py --mistakes (CI runs it). A student copy leaves this file out, with the
mistakes themselves: they quote the solutions.

Run:  python -m pytest tests/test_exercise_mistakes.py -q
"""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("exercises", os.path.join(ROOT, "tools", "exercises.py"))
exercises = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exercises)


def test_every_exercise_ships_two_mistakes_that_apply_to_the_code_as_it_is():
    mistakes, found = exercises.load_mistakes(), exercises.scan(ROOT)
    assert set(mistakes) == set(exercises.EXERCISES)
    for name, listed in mistakes.items():
        assert len(listed) >= 2, name
        assert len({m["name"] for m in listed}) == len(listed), name
        for m in listed:
            assert set(m) <= {"name", "why", "function", "edits"} and m["why"] and m["edits"], m
            changed = exercises.plant(found, name, m)    # each edit found once; the result parses
            assert changed and all(text != "".join(found[path][0]) for path, text in changed.items())


def toy(f_body, g_body):
    """A file with one rdp_step block in f and one in g (marker lines built here, so that this
    file itself has none)."""
    begin, end = "    ### BEGIN SOLUTION rdp_step\n", "    ### END SOLUTION\n"
    return (f"def f(x):\n{begin}    return {f_body}\n{end}\n\n"
            f"def g(x):\n{begin}    return {g_body}\n{end}")


def test_a_mistake_edits_only_its_exercises_blocks_and_is_stale_when_they_change():
    lines = toy("x + 1", "x + 1").splitlines(keepends=True)
    found = {"toy.py": (lines, exercises.find_blocks("toy.py", lines))}
    planted = exercises.plant(found, "rdp_step", {"function": "g", "edits": [("x + 1", "x - 1")]})
    assert planted == {"toy.py": toy("x + 1", "x - 1")}
    with pytest.raises(ValueError, match="2 matches"):      # in f and in g: which one?
        exercises.plant(found, "rdp_step", {"edits": [("x + 1", "x - 1")]})
    with pytest.raises(ValueError, match="0 matches"):      # the code changed under the mistake
        exercises.plant(found, "rdp_step", {"function": "g", "edits": [("x * 2", "x")]})
    with pytest.raises(ValueError, match="0 matches"):      # another exercise's blocks: untouched
        exercises.plant(found, "rdp_to_epsilon", {"edits": [("x + 1", "x - 1")]})
    with pytest.raises(SyntaxError):                         # a mistake must still parse
        exercises.plant(found, "rdp_step", {"function": "f", "edits": [("x + 1", "x +")]})


def test_exercises_md_names_every_exercise_and_every_mistake():
    with open(os.path.join(ROOT, "EXERCISES.md"), encoding="utf-8") as f:
        guide = f.read()
    for name, listed in exercises.load_mistakes().items():
        assert re.search(rf"`{name}`", guide), name
        for m in listed:
            assert re.search(rf"\b{m['name']}\b", guide), (name, m["name"])
