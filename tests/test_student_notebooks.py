"""The student copy of the notebooks works as a course: each notebook with exercises runs, in small
mode, up to its first unfinished piece and stops there with a NotImplementedError that names it (a
notebook exercise, "exercise NN.K: ...", or the concept-file assignment it reached first), and the
kit's
pieces (student_notebook, answer_key, write_student_notebooks, check) do what they promise.

The copy is the real one a student gets: the repo's files, the concept files' solutions stripped
(make_student_version.strip_solutions) and the notebooks written by write_student_notebooks. Each
notebook is executed only until its first error, so the whole run stays short.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from make_student_version import find_regions, strip_solutions

# notebooks/checks.py is imported as the notebooks import it, from their folder
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import checks
import student_notebooks as sn

nbformat = pytest.importorskip("nbformat", reason="install tests/requirements.txt to run notebooks")
NOTEBOOKS = sorted(Path(ROOT, "notebooks").glob("*.ipynb"))
CHECK_CALL = re.compile(r"""\bcheck\(\s*["'](\d\d\.\d+)["']""")


# ----------------------------------------------------------------------------- tiny notebooks
def tiny_notebook():
    """A notebook with one exercise (and a hint), a check, a written answer and a deliverable."""
    v4 = nbformat.v4
    solution = v4.new_code_cell('# EXERCISE 01.1: set x to "two"\n# HINT: a string\nx = "two"',
                                metadata={"tags": ["solution"]})
    solution.outputs = [v4.new_output("stream", text="a solution's output\n")]
    solution.execution_count = 3
    return v4.new_notebook(cells=[
        v4.new_markdown_cell("# 01 · a tiny notebook"),
        solution,
        v4.new_code_cell('check("01.1", x)', outputs=[v4.new_output("stream", text="✓\n")]),
        v4.new_markdown_cell("**Deliverable 01.2 (written)**: say why."),
        v4.new_markdown_cell("**Answer 01.2.** Because.", metadata={"tags": ["answer"]}),
        v4.new_code_cell("print('instructors only')", metadata={"tags": ["answer"]}),
    ])


def run_source(source: str) -> dict:
    namespace = {}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


def test_student_notebook_stubs_solutions_keeps_hints_drops_answers_and_outputs():
    nb = tiny_notebook()
    student = sn.student_notebook(nb, name="01_tiny.ipynb")
    sources = [c.source for c in student.cells]
    assert sources[1].splitlines() == ['# EXERCISE 01.1: set x to "two"', "# HINT: a string",
                                       'raise NotImplementedError("exercise 01.1: set x to \\"two\\"")']
    with pytest.raises(NotImplementedError, match=r'^exercise 01\.1: set x to "two"$'):
        run_source(sources[1])
    assert not any("Answer" in s or "instructors only" in s for s in sources), "answers leak"
    assert "**Deliverable 01.2 (written)**: say why." in sources
    code = [c for c in student.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.cells[1].source.endswith('x = "two"') and nb.cells[1].outputs, \
        "the input is not modified"
    kept = sn.student_notebook(nb, stub=False, name="01_tiny.ipynb")
    assert run_source(kept.cells[1].source)["x"] == "two", "stub=False keeps the solution"
    assert len(kept.cells) == 4 and not kept.cells[1].outputs


@pytest.mark.parametrize("source, tags, words", [
    ("x = 1", ["solution"], "first line is '# EXERCISE NN.K"),
    ("# EXERCISE 02.1: wrong notebook\nx = 1", ["solution"], "numbered for another notebook"),
    ("# EXERCISE 01.1: both\nx = 1", ["solution", "answer"], "tagged both"),
])
def test_misread_cells_fail_with_the_cell_named(source, tags, words):
    nb = tiny_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    with pytest.raises(ValueError, match="01_tiny.ipynb cell 6") as e:
        sn.student_notebook(nb, name="01_tiny.ipynb")
    assert words in str(e.value)


def test_answer_key_holds_solutions_answers_and_deliverables_only():
    key = sn.answer_key({"01_tiny.ipynb": tiny_notebook()}, {"01.1": "x: 'two'", "02.1": "other"})
    assert '### Exercise 01.1: set x to "two"' in key and 'x = "two"' in key
    assert "- `01.1`: x: 'two'" in key and "other" not in key
    assert "**Answer 01.2.** Because." in key and "print('instructors only')" in key
    assert "> **Deliverable 01.2 (written)**: say why." in key
    assert 'check("01.1", x)' not in key and "a tiny notebook" not in key


def test_write_student_notebooks_stubs_only_the_assignments_handed_out(tmp_path):
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    for name in ("01_tiny.ipynb", "05_other.ipynb"):
        nb = tiny_notebook()
        if name.startswith("05"):
            nb.cells[1].source = nb.cells[1].source.replace("01.1", "05.1")
            nb.cells = nb.cells[:2]
        nbformat.write(nb, root / "notebooks" / name)
    out = tmp_path / "student"
    assert sn.write_student_notebooks(root, out) == {"notebooks/01_tiny.ipynb": 1,
                                                     "notebooks/05_other.ipynb": 1}
    written = nbformat.read(out / "notebooks" / "01_tiny.ipynb", as_version=4)
    assert "raise NotImplementedError" in written.cells[1].source and len(written.cells) == 4
    # --only: notebook 01 belongs to mla; 05 has no assignment of its own, so it keeps its solution
    assert sn.write_student_notebooks(root, out, only={"mla"}) == {"notebooks/01_tiny.ipynb": 1,
                                                                     "notebooks/05_other.ipynb": 0}
    other = nbformat.read(out / "notebooks" / "05_other.ipynb", as_version=4)
    assert other.cells[1].source.endswith('x = "two"') and not other.cells[1].outputs
    assert sn.write_student_notebooks(root, out, only={"moe"})["notebooks/01_tiny.ipynb"] == 0
    with pytest.raises(ValueError, match="unknown assignment"):
        sn.write_student_notebooks(root, out, only={"mlaa"})


def test_answer_key_cli_writes_the_key_outside_the_student_copy(tmp_path, capsys):
    key = tmp_path / "key.md"
    sn.main(["--answer-key", str(key)])
    text = key.read_text(encoding="utf-8")
    assert "### Exercise 01.1:" in text and "Answer 01.2" in text
    assert "- `01.2`: " in text, "the key says what each check expects"
    assert "answer key" in capsys.readouterr().out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_stubbed_exercise_raises_its_own_message(path):
    nb = nbformat.read(path, as_version=4)
    student = sn.student_notebook(nb, name=path.name)
    solutions = [c for c in nb.cells if "solution" in sn.tags(c)]
    stubs = [c for c in student.cells if "solution" in sn.tags(c)]
    assert len(stubs) == len(solutions)
    for original, stub in zip(solutions, stubs):
        exercise, what = sn.exercise_header(original)
        with pytest.raises(NotImplementedError) as e:
            run_source(stub.source)
        assert str(e.value) == f"exercise {exercise}: {what}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_exercise_is_checked_or_handed_in(path):
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    announced = set(re.findall(r"\*\*Exercise (\d\d\.\d+)\b", text))
    handed_in = set(re.findall(r"^\*\*Deliverable (\d\d\.\d+)", text, flags=re.M))
    solved = {sn.exercise_header(c)[0] for c in nb.cells if "solution" in sn.tags(c)}
    checked = {e for c in nb.cells if c.cell_type == "code" for e in CHECK_CALL.findall(c.source)}
    unchecked = sorted(e for e in announced if e not in checked and e not in handed_in)
    assert not unchecked, \
        f"{path.name}: exercises with neither a check nor a deliverable: {unchecked}"
    unsolved = sorted(checked - solved)
    assert not unsolved, f"{path.name}: checks with no solution cell of the same id: {unsolved}"


# ----------------------------------------------------------------------------- check()
@pytest.fixture
def reference_data(tmp_path, monkeypatch):
    data = {"99.1": {"what": "a count", "value": 576, "atol": 0, "rtol": 0},
            "99.2": {"what": "a pair", "value": [0.5, [1, 2]], "atol": 0.01},
            "99.3": {"what": "a measured figure", "min": 0.9, "max": 1.5},
            "99.4": {"what": "a verdict", "value": True},
            "99.5": {"what": "a name", "value": "1x128"}}
    (tmp_path / "99_test.json").write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(checks, "DATA", tmp_path)
    return data


def test_check_passes_with_one_line(reference_data, capsys):
    torch = pytest.importorskip("torch")
    checks.check("99.1", 576)
    checks.check("99.2", (torch.tensor(0.504), [1, 2]))
    checks.check("99.3", [1.1, 0.95])
    checks.check("99.4", True)
    checks.check("99.5", "1x128")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("✓ 99.") for line in lines)
    assert lines[0] == "✓ 99.1 a count: 576"


@pytest.mark.parametrize("exercise, value, message", [
    ("99.1", 575, "99.1: a count: expected 576, got 575"),
    ("99.2", [0.52, [1, 2]], "99.2: a pair: expected [0.5, [1, 2]] (atol 0.01), got [0.52, [1, 2]]"),
    ("99.2", [0.5], "expected [0.5, [1, 2]]"),
    ("99.3", 0.5, "99.3: a measured figure: expected between 0.9 and 1.5, got 0.5"),
    ("99.3", float("nan"), "got nan"),
    ("99.4", 1, "99.4: a verdict: expected True, got 1"),
    ("99.5", "per row", "expected '1x128', got 'per row'"),
])
def test_check_fails_saying_what_was_expected(reference_data, exercise, value, message):
    with pytest.raises(AssertionError) as e:
        checks.check(exercise, value)
    assert message in str(e.value)


def test_check_names_a_missing_reference(reference_data):
    with pytest.raises(KeyError, match="99.9"):
        checks.check("99.9", 1)
    with pytest.raises(KeyError, match="98_"):
        checks.check("98.1", 1)


def test_every_check_in_the_notebooks_has_reference_data_and_every_reference_is_used():
    used = {}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                for exercise in CHECK_CALL.findall(cell.source):
                    used[exercise] = path.name
    for exercise, name in used.items():
        assert exercise[:2] == name[:2], \
            f"{name}: check({exercise!r}) is numbered for another notebook"
        ref = checks.reference(exercise)
        assert "value" in ref or "min" in ref or "max" in ref, f"{exercise}: no value and no range"
    shipped = set()
    for path in sorted(Path(ROOT, "notebooks", "checks").glob("*.json")):
        shipped |= set(json.loads(path.read_text(encoding="utf-8")))
    assert shipped <= set(used), f"reference data no notebook checks: {sorted(shipped - set(used))}"


# ----------------------------------------------------------------------------- the student copy
def repo_files(root: Path) -> list[str]:
    """The files a clone would hold, plus untracked ones git does not ignore (work in progress)."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
    return sorted(p for p in out.decode().split("\0") if p and (root / p).is_file())


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    """A student copy of the repo: concept solutions stripped, notebooks stubbed. Returns (the copy,
    {notebook: exercise cells stubbed}, the concept files' stub messages)."""
    if shutil.which("git") is None or not Path(ROOT, ".git").exists():
        pytest.skip("needs a git checkout to know the repo's files")
    root = Path(ROOT)
    out = tmp_path_factory.mktemp("student_copy")
    messages = set()
    for p in repo_files(root):
        dst = out / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / p, dst)
        if p.endswith(".py") and "/" not in p:
            source = (root / p).read_text(encoding="utf-8")
            messages |= {r.message for r in find_regions(source, p)}
            dst.write_text(strip_solutions(source, p)[0], encoding="utf-8")
    stubbed = sn.write_student_notebooks(root, out)
    return out, stubbed, messages


# Run before each notebook in the one shared kernel: a fresh namespace, the notebook's folder.
RESET = """%reset -f
import os
import sys
if "matplotlib.pyplot" in sys.modules:
    sys.modules["matplotlib.pyplot"].close("all")
os.chdir({folder!r})
"""


@pytest.fixture(scope="module")
def outcomes(student_copy, tmp_path_factory):
    """{notebook: (ename, evalue) of its first failing cell, or None}, every student notebook run in
    small mode, cell by cell, until its first error. One kernel serves them all (its namespace reset
    before each): starting a kernel and importing torch for every notebook would triple the time."""
    manager = pytest.importorskip("jupyter_client.manager",
                                  reason="install tests/requirements.txt to run notebooks")
    out, _, _ = student_copy
    env = {"NOTEBOOK_SMALL": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "NOTEBOOK_OUT": str(tmp_path_factory.mktemp("notebook_out"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        km, kc = manager.start_new_kernel(kernel_name="python3")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results = {}
    try:
        for path in sorted((out / "notebooks").glob("*.ipynb")):
            results[path.name] = run_until_first_error(kc, path)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return results


def run_until_first_error(kc, path: Path):
    """Execute path's code cells in the kernel kc; (ename, evalue) of the first error, or None."""
    def quiet(msg):
        return None

    setup = kc.execute_interactive(RESET.format(folder=str(path.parent)), timeout=60,
                                   output_hook=quiet)
    assert setup["content"]["status"] == "ok", f"could not reset the kernel before {path.name}"
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        reply = kc.execute_interactive(cell.source, timeout=300, output_hook=quiet)
        content = reply["content"]
        if content["status"] == "error":
            return content["ename"], content["evalue"]
    return None


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS])
def test_student_notebook_stops_at_its_first_stub_with_the_named_message(student_copy, outcomes,
                                                                        name):
    _, stubbed, messages = student_copy
    outcome = outcomes[name]
    print(f"{name}: {outcome}")
    exercise = re.compile(rf"^exercise {name[:2]}\.\d+: \S")
    if outcome is None:
        assert stubbed[f"notebooks/{name}"] == 0, f"{name} has exercises but ran through"
        return
    ename, evalue = outcome
    assert ename == "NotImplementedError", f"{name} stopped with {ename}: {evalue}"
    assert exercise.match(evalue) or evalue in messages, (
        f"{name} stopped with a NotImplementedError that names neither an exercise nor an "
        f"assignment: {evalue!r}")
