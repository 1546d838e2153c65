"""Write the student version of this repo: every marked solution replaced by a NotImplementedError.

The instructor's workflow:
  1. Mark the code a student should write. A line `### BEGIN SOLUTION: <what to implement, paper §>`
     opens a region and a line `### END SOLUTION` at the same indentation closes it (comments only:
     the solution runs unchanged). A region is a function body or a whole block, so that one raise in
     its place keeps the module importable. mla, moe, mtp, fp8, grpo and distill are marked already.
  2. Generate:   python tests/make_student_version.py OUT_DIR
     OUT_DIR (outside the repo) gets every git-tracked file. In each .py file every region becomes
     `raise NotImplementedError("<what to implement, paper §>")` between the kept marker lines, so
     `diff -r . OUT_DIR` shows exactly what was taken out. Commit new files first: only tracked ones go.
  3. Grade: in the student's copy, `pytest -m mla` (moe, mtp, fp8, grpo, distill) runs the tests of
     that file (tests/conftest.py marks tests/test_<concept>.py with <concept>). They all pass on the
     solution; tests/test_kit.py checks that on the student version each graded file imports and
     fails, and only with NotImplementedError, so a failing test always means "not implemented yet".
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


class KitError(ValueError):
    """Why the student version cannot be written (a bad marker, a bad OUT_DIR); one line that says where."""


@dataclass
class Region:
    begin: int          # 0-based line index of the BEGIN marker
    end: int            # 0-based line index of the END marker
    indent: str         # the BEGIN marker's indentation: the raise goes there
    message: str        # what to implement, from the text after the BEGIN marker


def find_regions(source: str, name: str = "<source>") -> list[Region]:
    """The marked regions of source, in order. Raises KitError on a BEGIN without a description,
    a nested or unclosed BEGIN, an END without a BEGIN, or an END indented unlike its BEGIN."""
    regions, open_at = [], None
    for i, line in enumerate(source.splitlines()):
        text, where = line.lstrip(), f"{name}:{i + 1}"
        indent = line[:len(line) - len(text)]
        if text.startswith(BEGIN):
            if open_at is not None:
                raise KitError(f"{where}: BEGIN SOLUTION inside the region opened at line {open_at.begin + 1}")
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
                raise KitError(f"{where}: END SOLUTION is indented unlike its BEGIN at line {open_at.begin + 1}")
            open_at.end = i
            regions.append(open_at)
            open_at = None
    if open_at is not None:
        raise KitError(f"{name}:{open_at.begin + 1}: BEGIN SOLUTION is never closed by an END SOLUTION")
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
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True).stdout
        paths = [Path(p) for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):                    # not a git checkout
        paths = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            paths += [Path(d, f).relative_to(root) for f in files]
    return sorted(p for p in paths if (root / p).is_file())


def make_student_version(out_dir: Path, root: Path = ROOT) -> dict[str, int]:
    """Copy root's tracked files to out_dir, solutions stripped from the .py files.
    Returns {path of each .py file with regions: its number of regions}."""
    root, out_dir = root.resolve(), out_dir.resolve()
    if out_dir == root or root in out_dir.parents:
        raise KitError(f"OUT_DIR {out_dir} is inside the repo {root}: choose a folder outside it")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KitError(f"OUT_DIR {out_dir} is not empty: remove it or choose a new folder")
    files = tracked_files(root)
    students = {p: strip_solutions((root / p).read_text(encoding="utf-8"), str(p))
                for p in files if p.suffix == ".py"}                     # every file checked before any write
    for p in files:
        dst = out_dir / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / p, dst)                                      # keeps the mode (scripts stay executable)
        if p in students:
            dst.write_text(students[p][0], encoding="utf-8")
    return {str(p): n for p, (_, n) in students.items() if n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the student version of the repo (solutions -> raise).")
    ap.add_argument("out_dir", type=Path, help="a new or empty folder outside the repo")
    args = ap.parse_args(argv)
    try:
        regions = make_student_version(args.out_dir)
    except KitError as e:
        sys.exit(f"error: {e}")
    print(f"student version of {ROOT} written to {args.out_dir.resolve()} ({len(tracked_files(ROOT))} files)")
    for path, n in regions.items():
        print(f"  {path:<12} {n} region{'s' * (n != 1)}")
    print(f"  total: {sum(regions.values())} regions in {len(regions)} files")


if __name__ == "__main__":
    main()
