"""Write the student version of this repo: every marked solution replaced by a NotImplementedError.

The instructor's workflow:
  1. Mark the code a student should write. A line
     `### BEGIN SOLUTION: <what to implement, paper §>` opens a region and a line
     `### END SOLUTION` at the same indentation closes it (comments only: the solution runs
     unchanged). A region is a function body or a whole block, so that one raise in its place
     keeps the module importable. mla, moe, mtp, fp8, grpo and distill are marked already.
  2. Generate:   python tests/make_student_version.py OUT_DIR [--only mla,grpo]
     OUT_DIR (outside the repo) gets every git-tracked file except the instructors' own (HIDDEN:
     tests/hidden/, the hidden tests and the reference implementations they compare against;
     tests/grade.py; tests/test_kit.py; answer keys). In each assignment file every region becomes
     `raise NotImplementedError("<what to implement, paper §>")` between the kept marker lines, so
     `diff -r . OUT_DIR` shows exactly what was taken out. With --only, only the named assignments
     are stubbed and every other file keeps its solution, so each assignment is handed out (and
     graded) alone. Commit new files first: only tracked ones go.
  3. Grade: the student runs `pytest -m mla` (moe, mtp, fp8, grpo, distill) in the copy: the public
     tests of that file (tests/conftest.py marks tests/test_<concept>.py with <concept>). The
     instructor runs `python tests/grade.py OUT_DIR` from this repo: public + hidden tests, points
     and the demo figures, written to OUT_DIR/results.json (Gradescope's format) and results.xml.
     tests/test_kit.py checks that on the student version each graded file imports and fails only
     with NotImplementedError, so a failing test always means "not implemented yet".
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "out", "__pycache__"}
# The assignment files, one per concept: `--only` names some of them.
ASSIGNMENTS = ("mla", "moe", "mtp", "fp8", "grpo", "distill")
# What never goes into a student copy: the hidden tests and the reference implementations they
# compare against (a folder), the grader and the kit's own tests (they need both), and any answer
# key (by name, wherever it sits).
HIDDEN = ("tests/hidden/", "tests/grade.py", "tests/test_kit.py")
ANSWER_KEY_WORDS = ("answer_key", "answer-key", "answerkey")


class KitError(ValueError):
    """Why the student version cannot be written (a bad marker, a bad OUT_DIR, an unknown
    assignment); one line that says where."""


@dataclass
class Region:
    begin: int          # 0-based line index of the BEGIN marker
    end: int            # 0-based line index of the END marker
    indent: str         # the BEGIN marker's indentation: the raise goes there
    message: str        # what to implement, from the text after the BEGIN marker


def find_regions(source: str, name: str = "<source>") -> list[Region]:
    """The marked regions of source, in order. Raises KitError on a BEGIN without a description,
    a nested or unclosed BEGIN, an END without a BEGIN, or an END indented unlike its BEGIN."""
    regions = []
    open_at = None
    for i, line in enumerate(source.splitlines()):
        text = line.lstrip()
        where = f"{name}:{i + 1}"
        indent = line[:len(line) - len(text)]
        if text.startswith(BEGIN):
            if open_at is not None:
                raise KitError(f"{where}: BEGIN SOLUTION inside the region opened at line "
                               f"{open_at.begin + 1}")
            rest = text[len(BEGIN):]
            message = rest[1:].strip() if rest.startswith(":") else ""
            if not message:
                raise KitError(f"{where}: write what to implement after the marker: "
                               f"'{BEGIN}: <description, paper §>'")
            open_at = Region(i, -1, indent, message)
        elif text.startswith(END):
            if open_at is None:
                raise KitError(f"{where}: END SOLUTION without a BEGIN SOLUTION before it")
            if indent != open_at.indent:
                raise KitError(f"{where}: END SOLUTION is indented unlike its BEGIN at line "
                               f"{open_at.begin + 1}")
            open_at.end = i
            regions.append(open_at)
            open_at = None
    if open_at is not None:
        raise KitError(f"{name}:{open_at.begin + 1}: BEGIN SOLUTION is never closed by an "
                       "END SOLUTION")
    return regions


def strip_solutions(source: str, name: str = "<source>") -> tuple[str, int]:
    """Replace every region's body by one raise at its BEGIN marker's indentation (markers kept).
    Returns (the student source, the number of regions). Raises KitError if the result does not
    compile, i.e. a region was not a whole block."""
    regions = find_regions(source, name)
    if not regions:
        return source, 0
    lines = source.splitlines(keepends=True)
    for r in reversed(regions):
        lines[r.begin + 1:r.end] = [f"{r.indent}raise NotImplementedError({r.message!r})\n"]
    student = "".join(lines)
    try:
        compile(student, name, "exec")
    except SyntaxError as e:
        raise KitError(f"{name}:{e.lineno}: the student version does not compile ({e.msg}): "
                       "a region must be a function body or a whole block") from None
    return student, len(regions)


def tracked_files(root: Path) -> list[Path]:
    """Paths (relative to root) of the git-tracked files that exist; without git, every file under
    root outside .git, out and __pycache__."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True,
                             check=True).stdout
        paths = [Path(p) for p in out.decode().split("\0") if p]
    # not a git checkout
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            paths += [Path(d, f).relative_to(root) for f in files]
    return sorted(p for p in paths if (root / p).is_file())


def is_hidden(path: Path) -> bool:
    """True for the instructors' files that a student copy leaves out (HIDDEN, answer keys)."""
    posix = path.as_posix()
    if any(posix == h or (h.endswith("/") and posix.startswith(h)) for h in HIDDEN):
        return True
    return any(word in path.name.lower() for word in ANSWER_KEY_WORDS)


def parse_only(names) -> tuple[str, ...] | None:
    """only as a tuple of assignment names in course order (None: every assignment).
    names: None, "mla,grpo", or an iterable of names. Raises KitError naming any unknown one."""
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    chosen = {n.strip() for n in names if n.strip()}
    unknown = sorted(chosen - set(ASSIGNMENTS))
    if unknown:
        raise KitError(f"unknown assignment(s) {', '.join(unknown)} in --only: choose from "
                       f"{', '.join(ASSIGNMENTS)}")
    return tuple(a for a in ASSIGNMENTS if a in chosen)


def stubbed_here(path: Path, only: tuple[str, ...] | None) -> bool:
    """Whether path's regions are stubbed: every .py file without only; with only, the named
    assignment files (mla.py, ...) and nothing else."""
    if only is None:
        return True
    return path.parent == Path(".") and path.stem in only


def plan_student_version(root: Path, only: tuple[str, ...] | None
                         ) -> tuple[list[Path], dict[Path, tuple[str, int]]]:
    """(the files to copy, {.py file: (its student source, its number of regions)}) for the files
    whose regions are stubbed. Every .py file's markers are checked, stubbed or not, so a bad
    marker fails here, before anything is written."""
    files = [p for p in tracked_files(root) if not is_hidden(p)]
    students = {}
    for p in files:
        if p.suffix != ".py":
            continue
        source = (root / p).read_text(encoding="utf-8")
        student = strip_solutions(source, str(p))
        if stubbed_here(p, only):
            students[p] = student
    return files, students


def make_student_version(out_dir: Path, root: Path = ROOT, only=None) -> dict[str, int]:
    """Copy root's tracked files, all but the HIDDEN ones, to out_dir, solutions stripped.

    only: None (every region of every .py file is stubbed) or assignment names (an iterable, or
    "mla,grpo"): then only the regions of those assignment files are stubbed and every other file
    keeps its solution; () stubs nothing (the solution copy, for checking the grader). Unknown
    names, bad markers and a bad out_dir raise KitError before anything is written.
    Returns {path of each stubbed .py file with regions: its number of regions, and of each
    notebook with stubbed exercise cells: their number}.
    """
    only = parse_only(only)
    root = Path(root).resolve()
    out_dir = Path(out_dir).resolve()
    if out_dir == root or root in out_dir.parents:
        raise KitError(f"OUT_DIR {out_dir} is inside the repo {root}: choose a folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise KitError(f"OUT_DIR {out_dir} is a file: choose a new or empty folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KitError(f"OUT_DIR {out_dir} is not empty: remove it or choose a new folder")
    files, students = plan_student_version(root, only)
    # 1. the tracked files, with the student source of the stubbed .py files
    for p in files:
        dst = out_dir / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        # copy2 keeps the mode: scripts stay executable
        shutil.copy2(root / p, dst)
        if p in students:
            dst.write_text(students[p][0], encoding="utf-8")
    # 2. the notebooks, after the .py files: their student copies replace the copied ones
    #    (exercise cells stubbed, answer cells and outputs removed)
    import student_notebooks
    cells = student_notebooks.write_student_notebooks(root, out_dir,
                                                      None if only is None else set(only))
    regions = {str(p): n for p, (_, n) in students.items() if n}
    return {**regions, **{nb: n for nb, n in cells.items() if n}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Write the student version of the repo (solutions -> raise).")
    ap.add_argument("out_dir", type=Path, help="a new or empty folder outside the repo")
    ap.add_argument("--only", metavar="NAMES",
                    help=f"comma-separated assignments to stub ({','.join(ASSIGNMENTS)}); "
                         "the other files keep their solutions (default: every assignment)")
    args = ap.parse_args(argv)
    try:
        if args.only is not None and not parse_only(args.only):
            raise KitError(f"--only names no assignment: give some of {', '.join(ASSIGNMENTS)}")
        regions = make_student_version(args.out_dir, only=args.only)
    except KitError as e:
        sys.exit(f"error: {e}")
    n_files = sum(not is_hidden(p) for p in tracked_files(ROOT))
    print(f"student version of {ROOT} written to {args.out_dir.resolve()} ({n_files} files)")
    for path, n in regions.items():
        what = "exercise cell" if path.endswith(".ipynb") else "region"
        print(f"  {path:<28} {n} {what}{'s' * (n != 1)}")
    print(f"  total: {sum(regions.values())} stubs in {len(regions)} files")


if __name__ == "__main__":
    main()
