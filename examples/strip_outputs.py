"""Strip what running a notebook adds, so that the committed file's diffs show only its cells.

    python examples/strip_outputs.py examples/*.ipynb           # rewrite them in place (make strip-notebooks)
    python examples/strip_outputs.py --check examples/*.ipynb   # exit status 1 naming those that hold outputs

Removed: every output, execution count and cell execution timing, and the kernel's details of the
language (its version, file extension, ...); kept: the cells, their ids and the kernelspec.
Needs nbformat (the dev extra).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

LANGUAGE_INFO = {"name": "python"}  # what a kernel adds beyond this changes with the Python it ran on


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` without outputs, execution counts and run metadata (changed in place, and returned)."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # nbclient's timings
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    if "language_info" in nb.metadata:
        nb.metadata.language_info = nbformat.from_dict(LANGUAGE_INFO)
    return nb


def stripped_text(path: Path) -> str:
    """The file as ``strip`` and nbformat's writer leave it."""
    nb = strip(nbformat.read(path, as_version=nbformat.NO_CONVERT))
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook would change")
    args = parser.parse_args(argv)
    dirty = []
    for path in args.notebooks:
        text = stripped_text(path)
        if text != path.read_text(encoding="utf-8"):
            dirty.append(path)
            if not args.check:
                path.write_text(text, encoding="utf-8")
    for path in dirty:
        print(f"{path}: {'holds outputs or run metadata' if args.check else 'stripped'}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
