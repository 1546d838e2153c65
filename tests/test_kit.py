"""The instructor kit works: the solution markers parse; make_student_version.py writes a student
copy that imports, leaves the instructors' files out and, with --only, stubs only the named
assignments; and tests/grade.py grades each assignment alone.

What is proven, and how, at the cost of one grading of the fully stubbed copy:
  1. graded alone, each assignment's graded tests (public + hidden) fail only with the
     NotImplementedError of that assignment's own stubs, every graded entry of a stub scores less
     than its points, and its figure checks score 0 with the stub's message (grade.py grades X on
     the student's X.py beside the reference's other files: the fully stubbed copy is graded as
     six `--only X` copies at once);
  2. the other assignments' tests pass when only X is stubbed, in the student's own copy (what
     `pytest -m grpo` shows a student): mla, moe, mtp and fp8's tests import no other assignment
     (checked on their imports); GRPO's tests pass in a copy with those four stubbed, so with any
     one of them (a test that passes reaches no stub, and stubbing fewer cannot change that);
  3. the solution copy gets full points in results.json (tests, hidden tests and figures of
     mla; every other assignment's tests are this suite's own, and their demo tests check the
     figures' bands);
and grade.py never crashes on a stub, and refuses a bad DIR in one line.
"""
import ast
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import demo_figures
import grade
import make_student_version as kit
from make_student_version import BEGIN, END, KitError, find_regions, strip_solutions

CONCEPTS = kit.ASSIGNMENTS
PUBLIC = [f"tests/test_{c}.py" for c in CONCEPTS]
# The assignments whose tests may build the assembled model (train.py imports mla, moe, mtp and
# fp8): their independence is checked by running them in a copy with those four stubbed.
ASSEMBLED = ("grpo",)
# tests/test_distill.py is decoupled the same way (dense tiny teachers, naive decoding) but needs
# GRPO's solution (grpo.rl_train); rerunning it whole here would double its minutes in the suite,
# so the kit checks it only graded alone, as every assignment is. Empty: every assignment's free
# tests carry points(0).
NOT_YET_DECOUPLED = ()


def marked(body: str, description: str = "implement f (Paper §1)", name: str = "f") -> str:
    """A tiny module: function `name` has the given body inside a marked region, then Y = 1."""
    return (f"def {name}(x):\n    {BEGIN}: {description}\n" + textwrap.indent(body, "    ")
            + f"    {END}\n\n\nY = 1\n")


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------- the marker parser
def test_region_becomes_one_raise_at_the_markers_indentation_with_the_description():
    source = "class A:\n" + textwrap.indent(marked("y = x + 1\nreturn y\n"), "    ")
    student, n = strip_solutions(source)
    assert n == 1
    assert student.splitlines()[2:5] == [
        f"        {BEGIN}: implement f (Paper §1)",
        "        raise NotImplementedError('implement f (Paper §1)')",
        f"        {END}"]
    namespace = {}
    # still importable
    exec(compile(student, "<student>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match=r"implement f \(Paper §1\)"):
        namespace["A"]().f()


def test_text_outside_regions_is_unchanged_and_quotes_survive():
    source = ("import os\n" + marked("return x\n", "it's \"quoted\"")
              + marked("return 2 * x\n", name="g"))
    student, n = strip_solutions(source)
    assert n == 2
    assert student.startswith("import os\ndef f(x):\n") and student.endswith("\n\n\nY = 1\n")
    namespace = {}
    exec(student, namespace)
    with pytest.raises(NotImplementedError, match="it's \"quoted\""):
        namespace["f"](1)
    with pytest.raises(NotImplementedError, match="implement f"):
        namespace["g"](1)
    assert strip_solutions("x = 1\n") == ("x = 1\n", 0)


def test_solution_runs_unchanged_with_its_markers():
    namespace = {}
    exec(marked("return x + 1\n"), namespace)
    assert namespace["f"](1) == 2


@pytest.mark.parametrize("source,words", [
    (f"def f():\n    {BEGIN}: a\n    pass\n", "never closed"),
    (f"def f():\n    pass\n    {END}\n", "without a BEGIN"),
    (f"def f():\n    {BEGIN}: a\n    {BEGIN}: b\n    {END}\n    {END}\n",
     "inside the region opened at line 2"),
    (f"def f():\n    {BEGIN}\n    pass\n    {END}\n", "write what to implement"),
    (f"def f():\n    {BEGIN}:   \n    pass\n    {END}\n", "write what to implement"),
    (f"def f():\n    {BEGIN}: a\n    pass\n{END}\n", "indented unlike its BEGIN"),
])
def test_bad_markers_raise_a_clear_error(source, words):
    with pytest.raises(KitError, match=words):
        find_regions(source, "m.py")


def test_region_whose_raise_would_not_compile_is_rejected():
    # the raise would land at column 0
    source = f"def f(x):\n{BEGIN}: markers outside the body\n    return x\n{END}\n"
    with pytest.raises(KitError, match="does not compile"):
        strip_solutions(source, "m.py")


def test_every_concept_file_has_a_region():
    counts = {c: len(find_regions((kit.ROOT / f"{c}.py").read_text(encoding="utf-8"), f"{c}.py"))
              for c in CONCEPTS}
    assert all(counts.values()), f"every assignment file needs at least one region: {counts}"


# ----------------------------------------------------------------------------- the generator
def test_out_dir_inside_the_repo_is_refused(tmp_path):
    # the CLI: one line
    with pytest.raises(SystemExit, match="^error: OUT_DIR .* is inside the repo"):
        kit.main([str(kit.ROOT / "student")])
    with pytest.raises(KitError, match="inside the repo"):
        kit.make_student_version(tmp_path, root=tmp_path)


def test_unknown_assignment_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "student"
    with pytest.raises(SystemExit, match=r"^error: unknown assignment\(s\) attention, foo in "
                                         r"--only: choose from mla, moe"):
        kit.main([str(out), "--only", "mla,foo,attention"])
    with pytest.raises(SystemExit, match="^error: --only names no assignment"):
        kit.main([str(out), "--only", ","])
    assert not out.exists()


def test_only_stubs_the_named_assignments_and_keeps_every_other_solution(tmp_path):
    out = tmp_path / "student"
    regions = kit.make_student_version(out, only="grpo,mla")
    # the notebooks of the named assignments only get their exercises stubbed
    assert set(regions) == {"mla.py", "grpo.py", "notebooks/01_mla.ipynb",
                            "notebooks/06_grpo.ipynb"}
    for c in CONCEPTS:
        ours = (kit.ROOT / f"{c}.py").read_text(encoding="utf-8")
        theirs = (out / f"{c}.py").read_text(encoding="utf-8")
        if c in ("mla", "grpo"):
            assert theirs == strip_solutions(ours)[0]
        else:
            assert theirs == ours, f"{c}.py must keep its solution with --only grpo,mla"
    assert kit.make_student_version(tmp_path / "solution", only=()) == {}


def test_hidden_tests_grader_and_answer_keys_stay_out():
    for path in ("tests/hidden/reference_impl.py", "tests/hidden/test_moe_hidden.py",
                 "tests/grade.py", "tests/test_kit.py", "notebooks/answer_key.md",
                 "ANSWER-KEY.txt"):
        assert kit.is_hidden(Path(path)), path
    for path in ("tests/test_moe.py", "tests/demo_figures.json", "tests/demo_figures.py",
                 "tests/hiddenness.py", "mla.py"):
        assert not kit.is_hidden(Path(path)), path


# ----------------------------------------------------------------------------- grade.py, cheap
def bad_dir(tmp_path: Path, kind: str) -> Path:
    """A DIR grade.py must refuse: missing, a file, a folder without assignments, the repo."""
    if kind == "missing":
        return tmp_path / "nope"
    if kind == "file":
        path = tmp_path / "f.txt"
        path.write_text("x")
        return path
    if kind == "empty":
        return tmp_path
    return kit.ROOT


@pytest.mark.parametrize("kind,words", [("missing", "does not exist"), ("file", "is not a folder"),
                                        ("empty", "holds none of mla.py"),
                                        ("repo", "is the reference copy itself")])
def test_grade_refuses_a_bad_dir_in_one_line(tmp_path, kind, words):
    with pytest.raises(SystemExit, match=f"^error: DIR .*{words}"):
        grade.main([str(bad_dir(tmp_path, kind))])


def test_grade_refuses_an_unknown_assignment(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: unknown assignment\(s\) gpt in --only"):
        grade.main([str(tmp_path), "--only", "mla,gpt"])


def test_figure_checks_compare_with_numbers_and_with_other_figures():
    figures = {"a": 576, "b": 0.3, "c": 2.0, "ok": True}
    assert demo_figures.check({"figure": "a", "equals": 576}, figures)[0]
    assert not demo_figures.check({"figure": "a", "equals": 575}, figures)[0]
    assert demo_figures.check({"figure": "b", "at_least": 0.2, "at_most": 0.4}, figures)[0]
    assert not demo_figures.check({"figure": "b", "at_most": {"figure": "c", "times": 0.1}},
                                  figures)[0]
    assert demo_figures.check({"figure": "c", "equals": {"figure": "b", "plus": 1.7},
                               "tolerance": 1e-9}, figures)[0]
    assert demo_figures.check({"figure": "ok", "equals": True}, figures)[0]
    assert not demo_figures.check({"figure": "ok", "equals": 1}, figures)[0]
    ok, said = demo_figures.check({"figure": "missing", "at_least": 1}, figures)
    assert not ok and "no figure 'missing'" in said
    # every concept's checks name figures, bounds and points
    for concept, spec in demo_figures.load().items():
        assert concept in CONCEPTS and spec["checks"]
        for rule in spec["checks"]:
            assert {"figure", "points", "why", "measured"} <= set(rule), rule
            assert {"equals", "at_least", "at_most"} & set(rule), rule


def test_the_harness_holds_the_students_file_and_the_reference_for_the_rest(tmp_path):
    student = tmp_path / "student"
    kit.make_student_version(student)
    harness = tmp_path / "harness"
    assert grade.build_harness(student, "grpo", harness)
    assert (harness / "grpo.py").read_bytes() == (student / "grpo.py").read_bytes()
    for other in ("mla.py", "moe.py", "train.py", "tests/test_grpo.py",
                  "tests/hidden/test_grpo_hidden.py"):
        assert (harness / other).read_bytes() == (kit.ROOT / other).read_bytes(), other


def module_imports(path: Path) -> set[str]:
    """The top-level names of every module path imports (anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def repo_closure(start: list[Path]) -> set[str]:
    """The repo's modules (root and tests/) that the files in start import, transitively."""
    where = {}
    for folder in (kit.ROOT, kit.ROOT / "tests", kit.ROOT / "tests" / "hidden"):
        where.update({p.stem: p for p in folder.glob("*.py")})
    seen = set()
    todo = list(start)
    while todo:
        for name in module_imports(todo.pop()) & set(where):
            if name not in seen:
                seen.add(name)
                todo.append(where[name])
    return seen


@pytest.mark.parametrize("concept", ["mla", "moe", "mtp", "fp8"])
def test_concept_tests_import_no_other_assignment(concept):
    files = [kit.ROOT / f"tests/test_{concept}.py",
             kit.ROOT / f"tests/hidden/test_{concept}_hidden.py"]
    reached = repo_closure([f for f in files if f.exists()]) & set(CONCEPTS)
    assert reached == {concept}, \
        f"tests of {concept} import {sorted(reached - {concept})}: then they are not graded alone"


# ----------------------------------------------------------------------------- the stubbed copy
@pytest.fixture(scope="module")
def stubbed(tmp_path_factory) -> Path:
    """The full student version: every assignment stubbed."""
    out = tmp_path_factory.mktemp("kit") / "student"
    regions = kit.make_student_version(out)
    assert set(regions) >= {f"{c}.py" for c in CONCEPTS}, regions
    return out


@pytest.fixture(scope="module")
def graded(stubbed) -> dict:
    """grade.py's results.json for the stubbed copy: each assignment graded alone."""
    grade.grade(stubbed, quiet=True, test_time_limit=300, time_limit=600, demo_time_limit=300)
    return json.loads((stubbed / "results.json").read_text(encoding="utf-8"))


def entries_of(results: dict, concept: str) -> list[dict]:
    return [t for t in results["tests"] if t["name"].startswith(f"{concept}: ")]


def test_student_copy_has_no_hidden_file_and_its_public_tests_collect(stubbed):
    for hidden in kit.HIDDEN:
        assert not (stubbed / hidden).exists(), f"{hidden} must stay out of the student copy"
    r = run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *PUBLIC], stubbed)
    assert r.returncode == 0, f"the student copy's public tests must import:\n{r.stdout[-3000:]}"


def test_graded_alone_each_assignment_fails_only_with_its_own_stubs(graded):
    wrong = []
    failing = {}
    for c in CONCEPTS:
        stubs = {r.message for r in find_regions((kit.ROOT / f"{c}.py").read_text(), c)}
        for t in entries_of(graded, c):
            for case in t["extra_data"].get("cases", []):
                if case["outcome"] == "not run":
                    wrong.append(f"{t['name']}::{case['case']}: not run ({case['message']})")
                if case["outcome"] != "failed":
                    continue
                failing[c] = failing.get(c, 0) + 1
                if case["not_implemented"] not in stubs:
                    why = " <- ".join(case["names"]) + f": {case['message']}"
                    wrong.append(f"{t['name']}::{case['case']}: {why}")
    assert not wrong, "on the stubbed copy a graded test failed with something other than " \
                      "its own assignment's NotImplementedError:\n" + "\n".join(wrong)
    assert set(failing) == set(CONCEPTS), f"every assignment must have failing tests: {failing}"


def test_a_stub_earns_no_entry_in_full(graded):
    free = [t["name"] for c in CONCEPTS if c not in NOT_YET_DECOUPLED
            for t in entries_of(graded, c) if t["max_score"] > 0 and t["score"] >= t["max_score"]]
    assert not free, "these tests pass on a stub yet carry points: give them " \
                     "@pytest.mark.points(0) (no graded region reaches them):\n" + "\n".join(free)


def test_figure_checks_of_a_stub_score_zero_and_say_what_to_implement(graded):
    for concept in demo_figures.load():
        stubs = [r.message for r in find_regions((kit.ROOT / f"{concept}.py").read_text(), "")]
        checks = [t for t in entries_of(graded, concept) if "figure" in t["extra_data"]]
        assert len(checks) == len(demo_figures.load()[concept]["checks"])
        for t in checks:
            assert t["score"] == 0 and t["status"] == "failed", t
            assert "NotImplementedError" in t["output"], t["output"]
            assert any(m in t["output"] for m in stubs), t["output"]


def test_results_are_gradescope_json_and_junit_xml(graded, stubbed):
    assert set(graded) >= {"score", "tests", "execution_time", "output"}
    assert graded["score"] == pytest.approx(sum(t["score"] for t in graded["tests"]))
    for t in graded["tests"]:
        assert {"name", "score", "max_score", "output", "status", "visibility"} <= set(t), t
        assert 0 <= t["score"] <= t["max_score"] and isinstance(t["output"], str)
        assert t["visibility"] in ("visible", "after_due_date")
    assert any(t["visibility"] == "after_due_date" for t in graded["tests"]), "hidden tests ran"
    cases = ET.parse(stubbed / "results.xml").getroot().iter("testcase")
    assert len(list(cases)) == len(graded["tests"])


@pytest.mark.parametrize("concept", ASSEMBLED)
def test_tests_of_the_assembled_model_pass_with_the_model_assignments_stubbed(tmp_path, concept):
    out = tmp_path / "student"
    kit.make_student_version(out, only="mla,moe,mtp,fp8")
    r = run(["-m", "pytest", f"tests/test_{concept}.py", "-q", "-p", "no:cacheprovider",
             "-o", "addopts="], out)
    assert r.returncode == 0, f"with mla, moe, mtp and fp8 stubbed, tests/test_{concept}.py " \
                              f"must still pass (graded alone):\n{r.stdout[-3000:]}"


# ----------------------------------------------------------------------------- the solution copy
def test_solution_copy_gets_full_points(tmp_path):
    out = tmp_path / "solution"
    kit.make_student_version(out, only=())
    results = grade.grade(out, only="mla", quiet=True)
    failed = [f"{t['name']}: {t['output'][:300]}" for t in results["tests"]
              if t["score"] < t["max_score"]]
    assert not failed, "the solution must get full points:\n" + "\n".join(failed)
    assert results["score"] == sum(t["max_score"] for t in results["tests"]) > 0
