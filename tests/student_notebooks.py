"""The student version of the notebooks, and the instructors' answer key.

How a notebook marks its exercises (the conventions of the instructor kit):
  * an exercise is a code cell tagged "solution" (cell metadata `tags`) whose first line is
    `# EXERCISE NN.K: <what to do>` (NN the notebook's number, K the exercise). In the student copy
    it becomes that line, any `# HINT ...` lines right after it, and
    `raise NotImplementedError("exercise NN.K: <what to do>")`;
  * a cell tagged "answer" (a written answer, or code only an instructor needs) is left out of the
    student copy and goes to the answer key;
  * a "your turn" cell calls `check("NN.K", value)` from notebooks/checks.py, whose reference values
    are data (notebooks/checks/NN_name.json); written or experimental work is a markdown cell that
    starts `**Deliverable NN.K (written)**:` or `**Deliverable NN.K (experimental)**:`.
Every code cell of the student copy has its outputs cleared, so nothing computed by a solution
shows.

    python tests/student_notebooks.py --answer-key KEY.md     # the answer key, for instructors only
    python tests/student_notebooks.py --out DIR [--only mla]  # DIR/notebooks/*.ipynb: students'


tests/make_student_version.py calls write_student_notebooks for the student copy of the repo; the
answer key is never written into it.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
# The assignment each notebook belongs to; 00, 05 and 08 have none of their own.
CONCEPT_OF = {"01": "mla", "02": "moe", "03": "mtp", "04": "fp8", "06": "grpo", "07": "distill"}
CONCEPTS = frozenset(CONCEPT_OF.values())
HEADER = re.compile(r"^#\s*EXERCISE\s+(\d\d\.\d+)\s*:\s*(\S.*?)\s*$")
# Execution noise that a student copy need not carry.
NOISE = ("execution", "collapsed", "scrolled", "ExecuteTime")


def tags(cell) -> list[str]:
    """The cell's metadata tags (an empty list when it has none)."""
    return list(cell.get("metadata", {}).get("tags", []))


def exercise_header(cell, where: str = "a cell") -> tuple[str, str]:
    """(exercise id, what to do) from a solution cell's first line; ValueError if it has none."""
    lines = cell.source.splitlines()
    match = HEADER.match(lines[0].strip()) if lines else None
    if cell.cell_type != "code" or match is None:
        raise ValueError(f"{where}: a 'solution' cell must be a code cell whose first line is "
                         "'# EXERCISE NN.K: <what to do>'")
    return match.group(1), match.group(2)


def stub_source(cell, where: str = "a cell") -> str:
    """The student's version of a solution cell: its header, its HINT lines, one raise."""
    exercise, what = exercise_header(cell, where)
    lines = cell.source.splitlines()
    hints = []
    for line in lines[1:]:
        if not line.strip().startswith("# HINT"):
            break
        hints.append(line)
    # json.dumps writes a double-quoted literal whose escapes Python reads the same way.
    message = json.dumps(f"exercise {exercise}: {what}", ensure_ascii=False)
    return "\n".join([lines[0], *hints, f"raise NotImplementedError({message})"])


def _check_cell(cell, where: str, number: str | None) -> None:
    """Fail early on a cell the kit would misread: a solution without its header, a cell tagged both
    ways, an exercise numbered for another notebook."""
    cell_tags = tags(cell)
    if "solution" in cell_tags and "answer" in cell_tags:
        raise ValueError(f"{where}: tagged both 'solution' and 'answer': choose one")
    if "solution" in cell_tags:
        exercise, _ = exercise_header(cell, where)
        if number is not None and not exercise.startswith(number + "."):
            raise ValueError(f"{where}: exercise {exercise} is numbered for another notebook "
                             f"(expected {number}.K)")


def _number(name: str) -> str | None:
    """The notebook's two-digit number from its file name ('01_mla.ipynb' -> '01'), if any."""
    stem = Path(name).name
    return stem[:2] if stem[:2].isdigit() else None


def checked_cells(nb, name: str):
    """(index, cell, "<name> cell <i>", its tags) for every cell of nb, each checked first."""
    number = _number(name)
    for i, cell in enumerate(nb.cells):
        where = f"{name} cell {i}"
        _check_cell(cell, where, number)
        yield i, cell, where, tags(cell)


def student_notebook(nb, stub: bool = True, name: str = "notebook"):
    """A student copy of nb: answer cells dropped, solution cells stubbed (if stub), every output
    cleared. nb itself is not modified."""
    out = copy.deepcopy(nb)
    cells = []
    for _, cell, where, cell_tags in checked_cells(out, name):
        if "answer" in cell_tags:
            continue
        if cell.cell_type == "code":
            if stub and "solution" in cell_tags:
                cell.source = stub_source(cell, where)
            cell.outputs = []
            cell.execution_count = None
        for key in NOISE:
            cell.metadata.pop(key, None)
        cells.append(cell)
    out.cells = cells
    return out


def count_exercises(nb) -> int:
    """The number of solution cells (exercises to write) in nb."""
    return sum("solution" in tags(c) for c in nb.cells)


def _as_pairs(nbs) -> list[tuple[str, object]]:
    """(name, notebook) pairs from a mapping, an iterable of pairs, or bare notebooks."""
    if isinstance(nbs, dict):
        return list(nbs.items())
    pairs = []
    for i, item in enumerate(nbs):
        if isinstance(item, tuple):
            pairs.append(item)
        else:
            pairs.append((f"notebook {i}", item))
    return pairs


def answer_key(nbs, checks: dict[str, str] | None = None) -> str:
    """A markdown answer key: per notebook, in cell order, every exercise's solution code, every
    deliverable's prompt and every answer cell, then what its check cells expect.
    nbs: {name: notebook} (or (name, notebook) pairs). checks: {exercise id: what it expects}."""
    out = ["# Answer key: notebook exercises (instructors only; not part of the student copy)", ""]
    checks = checks or {}
    for name, nb in _as_pairs(nbs):
        number = _number(name)
        body = []
        for i, cell, where, cell_tags in checked_cells(nb, name):
            text = cell.source.strip()
            if "solution" in cell_tags:
                exercise, what = exercise_header(cell, where)
                body += [f"### Exercise {exercise}: {what}", "", "```python", text, "```", ""]
            elif "answer" in cell_tags and cell.cell_type == "code":
                body += [f"Answer code (cell {i}):", "", "```python", text, "```", ""]
            elif "answer" in cell_tags:
                body += [text, ""]
            elif cell.cell_type == "markdown" and text.startswith("**Deliverable"):
                body += ["> " + line for line in text.splitlines()] + [""]
        expected = [f"- `{k}`: {v}" for k, v in sorted(checks.items())
                    if k.startswith(f"{number}.")]
        if expected:
            body += ["What the check cells expect (notebooks/checks/):", "", *expected, ""]
        if body:
            out += [f"## {name}", ""] + body
    return "\n".join(out).rstrip() + "\n"


def check_expectations(root: Path) -> dict[str, str]:
    """{exercise id: "<what>: <expected>"} from root's notebooks/checks.py and its reference
    data."""
    path = Path(root) / "notebooks" / "checks.py"
    if not path.exists():
        return {}
    spec = importlib.util.spec_from_file_location("notebook_checks", path)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    out = {}
    for data in sorted(checks.DATA.glob("*.json")):
        for exercise, ref in json.loads(data.read_text(encoding="utf-8")).items():
            out[exercise] = f"{ref.get('what', 'result')}: {checks.expected_text(ref)}"
    return out


def _parse_only(only) -> set[str] | None:
    """only as a set of concept names; ValueError naming any unknown one."""
    if only is None:
        return None
    chosen = {only} if isinstance(only, str) else set(only)
    unknown = sorted(chosen - CONCEPTS)
    if unknown:
        raise ValueError(f"unknown assignment(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(sorted(CONCEPTS))}")
    return chosen


def notebook_paths(root: Path) -> list[Path]:
    """Every notebooks/*.ipynb under root, in course order."""
    return sorted((Path(root) / "notebooks").glob("*.ipynb"))


def write_student_notebooks(root: Path, out_dir: Path, only: set[str] | None = None
                            ) -> dict[str, int]:
    """Write the student copy of every root/notebooks/*.ipynb to out_dir/notebooks/ (overwriting).

    only: the assignments handed out (mla, moe, mtp, fp8, grpo, distill); then only the notebooks of
    those assignments get their exercises stubbed, the others keep their solutions. Answer cells
    and outputs are removed from every notebook. Returns {"notebooks/NAME.ipynb": cells stubbed}.
    """
    chosen = _parse_only(only)
    target = Path(out_dir) / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    stubbed = {}
    for path in notebook_paths(root):
        nb = nbformat.read(path, as_version=4)
        concept = CONCEPT_OF.get(_number(path.name) or "")
        stub = chosen is None or concept in chosen
        nbformat.write(student_notebook(nb, stub=stub, name=path.name), target / path.name)
        stubbed[f"notebooks/{path.name}"] = count_exercises(nb) if stub else 0
    return stubbed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="The notebooks' answer key, or their student copies.")
    ap.add_argument("--answer-key", type=Path, metavar="FILE",
                    help="write the instructors' answer key (markdown) to FILE "
                         "(default: not written)")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="write student copies to DIR/notebooks/ (default: not written)")
    ap.add_argument("--only", default=None,
                    help="with --out: comma-separated assignments to stub, e.g. mla,grpo "
                         "(default: every notebook's exercises)")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help=f"the repo whose notebooks are read (default: {ROOT})")
    args = ap.parse_args(argv)
    if args.answer_key is None and args.out is None:
        ap.error("nothing to do: give --answer-key FILE and/or --out DIR")
    try:
        if args.answer_key is not None:
            nbs = {p.name: nbformat.read(p, as_version=4) for p in notebook_paths(args.root)}
            key = answer_key(nbs, check_expectations(args.root))
            args.answer_key.write_text(key, encoding="utf-8")
            total = sum(count_exercises(nb) for nb in nbs.values())
            print(f"answer key for {total} exercises in {len(nbs)} notebooks: {args.answer_key}")
        if args.out is not None:
            names = [] if args.only is None else args.only.split(",")
            only = None if args.only is None else {s.strip() for s in names if s.strip()}
            counts = write_student_notebooks(args.root, args.out, only)
            for name, n in counts.items():
                print(f"  {name:<28} {n} exercise cell{'s' * (n != 1)} stubbed")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
