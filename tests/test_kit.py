"""The instructor kit works: the solution markers parse, and the student version that
make_student_version.py writes imports, and fails its graded tests only with NotImplementedError.

A graded test that failed with anything else (ImportError, NameError, a wrong number) would tell a
student something other than "this is what you have to write", so every failure is checked.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import make_student_version as kit
from make_student_version import BEGIN, END, KitError, find_regions, strip_solutions

CONCEPTS = ("mla", "moe", "mtp", "fp8", "grpo", "distill")             # the files with assignments
GRADED = [f"tests/test_{c}.py" for c in CONCEPTS]

# Records every test's outcome and, for failures, the exception types of the chain (__cause__ /
# __context__); a child process's error (torch.multiprocessing) is named by its traceback's last line.
PLUGIN = '''
import json, os
import pytest

RESULTS = []

def exception_names(exc):
    names = []
    while exc is not None and all(exc is not seen for seen in names):
        names.append(exc)
        exc = exc.__cause__ or exc.__context__
    out = [type(e).__name__ for e in names]
    for e in names:
        if type(e).__name__ == "ProcessRaisedException":
            out.append((str(e).strip().splitlines() or [""])[-1].split(":")[0])
    return out

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        names = exception_names(call.excinfo.value) if call.excinfo else ["unknown"]
        RESULTS.append({"nodeid": item.nodeid, "outcome": "failed", "names": names})
    elif report.when == "call" or report.skipped:
        RESULTS.append({"nodeid": item.nodeid, "outcome": report.outcome, "names": []})

def pytest_collectreport(report):
    if report.failed:
        RESULTS.append({"nodeid": report.nodeid, "outcome": "failed", "names": ["CollectionError"]})

def pytest_sessionfinish(session):
    with open(os.environ["KIT_RESULTS"], "w") as f:
        json.dump(RESULTS, f)
'''


def marked(body: str, description: str = "implement f (Paper §1)", name: str = "f") -> str:
    """A tiny module: function `name` has the given body inside a marked region, then Y = 1."""
    return (f"def {name}(x):\n    {BEGIN}: {description}\n" + textwrap.indent(body, "    ")
            + f"    {END}\n\n\nY = 1\n")


# ----------------------------------------------------------------------------- the marker parser
def test_region_becomes_one_raise_at_the_markers_indentation_with_the_description():
    source = "class A:\n" + textwrap.indent(marked("y = x + 1\nreturn y\n"), "    ")
    student, n = strip_solutions(source)
    assert n == 1
    assert student.splitlines()[2:5] == [f"        {BEGIN}: implement f (Paper §1)",
                                         "        raise NotImplementedError('implement f (Paper §1)')",
                                         f"        {END}"]
    namespace = {}
    exec(compile(student, "<student>", "exec"), namespace)               # still importable
    with pytest.raises(NotImplementedError, match=r"implement f \(Paper §1\)"):
        namespace["A"]().f()


def test_text_outside_regions_is_unchanged_and_quotes_survive():
    source = "import os\n" + marked("return x\n", "it's \"quoted\"") + marked("return 2 * x\n", name="g")
    student, n = strip_solutions(source)
    assert n == 2 and student.startswith("import os\ndef f(x):\n") and student.endswith("\n\n\nY = 1\n")
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
    (f"def f():\n    {BEGIN}: a\n    {BEGIN}: b\n    {END}\n    {END}\n", "inside the region opened at line 2"),
    (f"def f():\n    {BEGIN}\n    pass\n    {END}\n", "write what to implement"),
    (f"def f():\n    {BEGIN}:   \n    pass\n    {END}\n", "write what to implement"),
    (f"def f():\n    {BEGIN}: a\n    pass\n{END}\n", "indented unlike its BEGIN"),
])
def test_bad_markers_raise_a_clear_error(source, words):
    with pytest.raises(KitError, match=words):
        find_regions(source, "m.py")


def test_region_whose_raise_would_not_compile_is_rejected():
    source = f"def f(x):\n{BEGIN}: markers outside the body\n    return x\n{END}\n"   # raise at column 0
    with pytest.raises(KitError, match="does not compile"):
        strip_solutions(source, "m.py")


def test_out_dir_inside_the_repo_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="^error: OUT_DIR .* is inside the repo"):   # the CLI: one line
        kit.main([str(kit.ROOT / "student")])
    with pytest.raises(KitError, match="inside the repo"):
        kit.make_student_version(tmp_path, root=tmp_path)


def test_every_concept_file_has_a_region():
    counts = {c: len(find_regions((kit.ROOT / f"{c}.py").read_text(encoding="utf-8"), f"{c}.py"))
              for c in CONCEPTS}
    assert all(counts.values()), f"every assignment file needs at least one region: {counts}"


# ----------------------------------------------------------------------------- the student version
@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit") / "student"
    regions = kit.make_student_version(out)
    assert set(regions) >= {f"{c}.py" for c in CONCEPTS}, regions
    return out


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_student_version_imports_every_module(student):
    r = run(["-c", "import mla, moe, mtp, fp8, train, grpo, distill"], student)
    assert r.returncode == 0, f"the student version must import:\n{r.stderr[-2000:]}"


def test_graded_tests_fail_only_with_not_implemented_error(student, tmp_path):
    (tmp_path / "kit_plugin.py").write_text(PLUGIN)
    results = tmp_path / "results.json"
    r = run(["-m", "pytest", *GRADED, "-p", "kit_plugin", "-p", "no:cacheprovider", "-q", "-o", "addopts="],
            student, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            KIT_RESULTS=str(results))
    assert r.returncode == 1, f"pytest should report failed tests (exit 1), got {r.returncode}:\n{r.stdout[-3000:]}"
    tests = json.loads(results.read_text())
    failed = [t for t in tests if t["outcome"] == "failed"]
    wrong = [f"{t['nodeid']}: {' <- '.join(t['names'])}" for t in failed if "NotImplementedError" not in t["names"]]
    assert not wrong, "on the student version a test failed with something other than NotImplementedError:\n" \
                      + "\n".join(wrong)
    per_file = {f: sum(t["nodeid"].startswith(f) for t in failed) for f in GRADED}
    assert all(per_file.values()), f"every graded file must have a failing test: {per_file}"
    print("failed / recorded per graded file: "
          + ", ".join(f"{f}: {n}/{sum(t['nodeid'].startswith(f) for t in tests)}" for f, n in per_file.items()))
