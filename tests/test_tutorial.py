"""The tutorial's exercises and its student copy (nbval runs the notebook itself, see pytest.ini)."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
import torch

from tools.student_copy import marked_blocks, source_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "tutorial.ipynb"
TOOL = ROOT / "tools" / "student_copy.py"
MIN_EXERCISES = 8


def make_copy(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def solution_lines(source):
    lines = source.split("\n")
    return [line.strip() for kind, first, last in marked_blocks(source) if kind == "SOLUTION"
            for line in lines[first + 1:last] if line.strip()]


def test_student_copy_has_every_exercise_and_no_solution(tmp_path):
    result = make_copy(TUTORIAL, tmp_path / "student.ipynb")
    assert result.returncode == 0, result.stderr
    solved = json.loads(TUTORIAL.read_text())
    student = nbformat.read(tmp_path / "student.ipynb", as_version=4)
    nbformat.validate(student)
    assert len(student.cells) == len(solved["cells"])

    exercises = checks = 0
    for solved_cell, student_cell in zip(solved["cells"], student.cells):
        solved_source, text = source_of(solved_cell), student_cell.source
        assert not [line for line in text.split("\n") if line.strip().startswith(("### BEGIN", "### END"))]
        kinds = [kind for kind, _, _ in marked_blocks(solved_source)]
        exercises, checks = exercises + kinds.count("SOLUTION"), checks + kinds.count("HIDDEN TESTS")
        student_lines = {line.strip() for line in text.split("\n")}
        leaked = [line for line in solution_lines(solved_source) if line in student_lines]
        assert not leaked, f"solution lines left in the student copy: {leaked}"
        if student_cell.cell_type == "code":
            assert student_cell.outputs == [] and student_cell.execution_count is None
            ast.parse(text)  # the stubs keep every cell valid Python
            if "SOLUTION" in kinds:
                assert "raise NotImplementedError" in text
    assert exercises >= MIN_EXERCISES and checks >= exercises, (exercises, checks)
    assert f"{exercises} solutions replaced" in result.stdout


def test_student_copy_default_paths(tmp_path):
    (tmp_path / "tutorial.ipynb").write_text(TUTORIAL.read_text())
    result = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tutorial_student.ipynb").is_file()


def notebook_with(*sources):
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                       "cells": [{"cell_type": "code", "metadata": {}, "source": s, "outputs": [],
                                  "execution_count": None} for s in sources]})


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    ("{not json", "cannot read"),
    (json.dumps({"cells": []}), "not an nbformat 4 notebook"),
    (notebook_with("x = 1"), "no '### BEGIN SOLUTION' block"),
    (notebook_with("### BEGIN SOLUTION\nx = 1"), "never closed"),
    (notebook_with("x = 1\n### END SOLUTION"), "without"),
    (notebook_with("### BEGIN SOLUTION\n### BEGIN HIDDEN TESTS\n### END HIDDEN TESTS\n### END SOLUTION"), "inside"),
])
def test_student_copy_bad_input_is_one_line_and_writes_nothing(tmp_path, content, problem):
    source, target = tmp_path / "solved.ipynb", tmp_path / "student.ipynb"
    if content is not None:
        source.write_text(content)
    result = make_copy(source, target)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:") and problem in result.stderr
    assert not target.exists()


def test_student_copy_refuses_to_overwrite_the_solved_notebook(tmp_path):
    source = tmp_path / "solved.ipynb"
    source.write_text(notebook_with("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"))
    before = source.read_text()
    result = make_copy(source, source)
    assert result.returncode == 2 and "overwrite" in result.stderr
    assert source.read_text() == before

#----------------------------------------------------------------------------
# The hidden checks must catch a wrong answer: run the notebook's code with a tiny budget and,
# before each check runs on the real solution, run it on the solution scaled by 1.01.

def _off_by_one_percent(fn):
    def scale(value):
        if isinstance(value, tuple):
            return tuple(scale(v) for v in value)
        return value * 1.01

    return lambda *args, **kwargs: scale(fn(*args, **kwargs))


def _solved_function(source):
    marker = next(first for kind, first, _ in marked_blocks(source) if kind == "SOLUTION") + 1
    return next(node.name for node in ast.parse(source).body
                if isinstance(node, ast.FunctionDef) and node.lineno <= marker <= node.end_lineno)


@pytest.mark.slow
def test_hidden_checks_catch_a_one_percent_error(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SCM_TUTORIAL_FULL", raising=False)
    torch.manual_seed(0)
    cells = [source_of(cell) for cell in json.loads(TUTORIAL.read_text())["cells"] if cell["cell_type"] == "code"]
    namespace = {"__name__": "tutorial"}
    exercise, caught = None, []
    for index, source in enumerate(cells):
        code = compile(source, f"tutorial.ipynb code cell {index}", "exec")
        kinds = [kind for kind, _, _ in marked_blocks(source)]
        if "HIDDEN TESTS" in kinds:
            assert exercise is not None, f"code cell {index}: hidden checks without an exercise before them"
            solution = namespace[exercise]
            namespace[exercise] = _off_by_one_percent(solution)
            with pytest.raises(AssertionError):
                exec(code, namespace)
            namespace[exercise] = solution
            caught.append(exercise)
            exercise = None
        exec(code, namespace)
        plt.close("all")
        if "SOLUTION" in kinds:
            exercise = _solved_function(source)
        if "BUDGET =" in source:  # a tiny budget: this test is about the checks, not the results
            namespace["BUDGET"] = dict(teacher_steps=40, student_steps=40, ablation_steps=20, n_samples=500)
            namespace["N"] = 500
    assert len(caught) >= MIN_EXERCISES, caught
