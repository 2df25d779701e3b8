"""Write the student copy of the tutorial: solutions become stubs, hidden checks go, outputs are cleared.

    python tools/student_copy.py                          # tutorial.ipynb -> tutorial_student.ipynb
    python tools/student_copy.py SOLVED.ipynb STUDENT.ipynb

Markers (nbgrader's, one per line, indented like the code around them):
  ### BEGIN SOLUTION ... ### END SOLUTION          in code: replaced by "# YOUR CODE HERE" and
                                                   `raise NotImplementedError`; in markdown: by
                                                   "YOUR ANSWER HERE"
  ### BEGIN HIDDEN TESTS ... ### END HIDDEN TESTS  removed, markers included
Bad input (missing file, not a notebook, unbalanced markers, output = input) prints one `error:`
line, exits with 2 and writes nothing.
"""
import json
import os
import sys
import tempfile

BLOCKS = {"SOLUTION": ("### BEGIN SOLUTION", "### END SOLUTION"),
          "HIDDEN TESTS": ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")}


class NotebookError(ValueError):
    pass


def source_of(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def marked_blocks(source, where="cell"):
    """[(kind, first line, last line)] of the marker pairs in `source` (line indices, markers
    included); raises NotebookError on a marker without its partner or nested blocks."""
    blocks, open_block = [], None
    for number, line in enumerate(source.split("\n")):
        text = line.strip()
        for kind, (begin, end) in BLOCKS.items():
            if text == begin:
                if open_block:
                    raise NotebookError(f"{where}, line {number + 1}: {begin!r} inside an open "
                                        f"{open_block[0]} block")
                open_block = (kind, number)
            elif text == end:
                if not open_block or open_block[0] != kind:
                    raise NotebookError(f"{where}, line {number + 1}: {end!r} without {begin!r}")
                blocks.append((kind, open_block[1], number))
                open_block = None
    if open_block:
        raise NotebookError(f"{where}, line {open_block[1] + 1}: {BLOCKS[open_block[0]][0]!r} is never closed")
    return blocks


def student_source(source, cell_type, blocks):
    """`source` with its marked `blocks` (from marked_blocks) replaced or removed."""
    lines = source.split("\n")
    for kind, first, last in reversed(blocks):
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        if kind == "HIDDEN TESTS":
            replacement = []
        elif cell_type == "code":
            replacement = [indent + "# YOUR CODE HERE", indent + 'raise NotImplementedError("exercise: write this part")']
        else:
            replacement = [indent + "YOUR ANSWER HERE"]
        lines[first:last + 1] = replacement
    return "\n".join(lines)


def student_notebook(notebook):
    """The student copy of a solved notebook (a dict in nbformat 4 layout) and its counts."""
    counts = {"SOLUTION": 0, "HIDDEN TESTS": 0}
    cells = []
    for index, cell in enumerate(notebook["cells"]):
        cell = dict(cell)
        source = source_of(cell)
        blocks = marked_blocks(source, f"cell {index}")
        for kind, _, _ in blocks:
            counts[kind] += 1
        cell["source"] = student_source(source, cell["cell_type"], blocks)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    return {**notebook, "cells": cells}, counts


def read_notebook(path):
    if not os.path.isfile(path):
        raise NotebookError(f"notebook not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            notebook = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotebookError(f"cannot read {path} as a notebook: {type(error).__name__}: {error}") from None
    if not isinstance(notebook, dict) or notebook.get("nbformat") != 4 or not isinstance(notebook.get("cells"), list):
        raise NotebookError(f"{path}: not an nbformat 4 notebook")
    return notebook


def write_atomically(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".ipynb")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    if len(argv) > 2:
        print("error: expected at most two arguments, SOLVED.ipynb and STUDENT.ipynb", file=sys.stderr)
        return 2
    source, target = (argv + ["tutorial.ipynb", "tutorial_student.ipynb"][len(argv):])[:2]
    try:
        if os.path.abspath(source) == os.path.abspath(target):
            raise NotebookError(f"the student copy would overwrite the solved notebook {source}")
        notebook, counts = student_notebook(read_notebook(source))
        if counts["SOLUTION"] == 0:
            raise NotebookError(f"{source}: no '### BEGIN SOLUTION' block, nothing to turn into exercises")
    except NotebookError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    write_atomically(target, json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {target}: {counts['SOLUTION']} solutions replaced by stubs, "
          f"{counts['HIDDEN TESTS']} hidden checks removed, outputs cleared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
