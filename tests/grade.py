"""Grade a student copy: public and hidden tests with points, and the demo figures, written as
Gradescope's results.json and a JUnit XML beside it.

    python tests/grade.py DIR [--only mla,grpo]     # run from the reference copy (this repo)

Each assignment is graded alone. For assignment X, a harness folder gets this repo's files (its
tests, the hidden ones, train.py, every other concept file) and DIR's X.py in place of ours: the
student's work on X is the only code of theirs that runs, so an unfinished MLA cannot cost GRPO
points, and edited tests or helpers change nothing. In the harness:
  1. pytest runs tests/test_X.py and tests/hidden/test_X_hidden.py (a time limit per test and one
     per assignment). Every test function is one entry, worth its @pytest.mark.points(n)
     (default 1, tests/conftest.py); its parametrized cases share the points, skipped cases count
     for nothing.
  2. `python X.py --json ...` runs the demo; each check of tests/demo_figures.json (data: a
     figure, its band, points, and why) is one entry.
A stub that raises, a crash, a syntax error or a time limit gives 0 on the entries it touches and
an output that says why; grade.py itself carries on. DIR gets results.json (score, tests: name,
score, max_score, output, status, visibility, execution_time) and results.xml (JUnit).

The module is also the pytest plugin of step 1 (`-p grade`): the hooks below record every case.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import demo_figures
import make_student_version as kit

ROOT = kit.ROOT
ASSIGNMENTS = kit.ASSIGNMENTS
HIDDEN_DIR = "tests/hidden"
# Environment of the pytest run inside a harness (set by grade.py, read by the plugin hooks).
RECORDS_ENV = "GRADE_RECORDS"
TEST_LIMIT_ENV = "GRADE_TEST_LIMIT"
# How much of a failure's text goes into an entry's output: per case (its traceback's end), and
# in all (the entry's start: the summary and the first cases).
MAX_CASE_OUTPUT = 1200
MAX_OUTPUT = 5000


# ---- the pytest plugin (active only in the pytest runs grade.py starts)
class TestTimeLimit(Exception):
    """A test ran past its time limit (raised into it by SIGALRM)."""


def _record(row: dict) -> None:
    path = os.environ.get(RECORDS_ENV)
    if not path:
        return
    # one line per event, flushed at once: a run killed at its time limit keeps what it did
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _points(item) -> float:
    """The test function's @pytest.mark.points(n), else tests/conftest.py's DEFAULT_POINTS."""
    marker = item.get_closest_marker("points")
    if marker is None:
        # pytest has imported tests/conftest.py by the time items exist
        from conftest import DEFAULT_POINTS
        return float(DEFAULT_POINTS)
    return float(marker.args[0])


def exception_names(exc) -> list[str]:
    """The type names of exc and of its chain (__cause__ / __context__)."""
    chain = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    names = [type(e).__name__ for e in chain]
    # a child process's error (torch.multiprocessing) is named by its traceback's last line
    for e in chain:
        if type(e).__name__ == "ProcessRaisedException":
            names.append((str(e).strip().splitlines() or [""])[-1].split(":")[0])
    return names


def not_implemented(exc) -> str | None:
    """The message of the NotImplementedError in exc's chain (a stub's "what to implement"), also
    from a child process's traceback; None if there is none."""
    seen = []
    while exc is not None and all(exc is not e for e in seen):
        seen.append(exc)
        if isinstance(exc, NotImplementedError):
            return str(exc)
        if type(exc).__name__ == "ProcessRaisedException":
            last = (str(exc).strip().splitlines() or [""])[-1]
            if last.startswith("NotImplementedError: "):
                return last[len("NotImplementedError: "):]
        exc = exc.__cause__ or exc.__context__
    return None


def pytest_collection_finish(session):
    for item in session.items:
        _record({"event": "collected", "nodeid": item.nodeid,
                 "function": getattr(item, "originalname", None) or item.name.split("[")[0],
                 "file": Path(str(item.fspath)).name, "points": _points(item),
                 "hidden": "hidden" in Path(str(item.fspath)).parts})


def pytest_collectreport(report):
    if report.failed:
        _record({"event": "collect_error", "nodeid": report.nodeid,
                 "output": str(report.longrepr)[-MAX_CASE_OUTPUT:]})


def _on_alarm(signum, frame):
    limit = os.environ.get(TEST_LIMIT_ENV, "?")
    raise TestTimeLimit(f"the test ran past its time limit ({limit} s)")


def pytest_runtest_protocol(item, nextitem):
    limit = float(os.environ.get(TEST_LIMIT_ENV, "0") or 0)
    if limit > 0:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
    # returning None lets pytest's own protocol run the test; the alarm is cleared at logfinish
    return None


def pytest_runtest_logfinish(nodeid, location):
    signal.setitimer(signal.ITIMER_REAL, 0)


def trim_traceback(text: str) -> str:
    """pytest's short traceback without the frames inside installed packages (torch's module
    call machinery says nothing to a student)."""
    kept = []
    skipping = False
    for line in text.splitlines():
        # a frame starts at column 0 ("path:line: in name"); its code lines are indented
        if line and not line[0].isspace() and ": in " in line:
            skipping = "site-packages" in line or "dist-packages" in line
        elif line.startswith("E ") or not line.startswith(" "):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def _message(call) -> str:
    """The failure's first line, e.g. 'NotImplementedError: absorbed MLA: ... (V2 §2.1.2)'."""
    if call.excinfo is None:
        return ""
    lines = call.excinfo.exconly().strip().splitlines()
    return lines[0][:300] if lines else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        exc = call.excinfo.value if call.excinfo else None
        names = exception_names(exc) if exc is not None else ["unknown"]
        _record({"event": "case", "nodeid": item.nodeid, "when": report.when,
                 "outcome": "failed", "names": names, "message": _message(call),
                 "not_implemented": not_implemented(exc),
                 "output": trim_traceback(report.longreprtext)[-MAX_CASE_OUTPUT:],
                 "seconds": report.duration})
    elif report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
        _record({"event": "case", "nodeid": item.nodeid, "when": report.when,
                 "outcome": "skipped", "message": str(reason), "seconds": report.duration})
    elif report.when == "call":
        _record({"event": "case", "nodeid": item.nodeid, "when": report.when,
                 "outcome": "passed", "seconds": report.duration})


# ---- the harness
def source_files(root: Path) -> list[Path]:
    """root's files as git sees them: tracked, plus untracked ones that are not ignored (new
    hidden tests before their first commit); without git, every file outside SKIP_DIRS."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-c", "-o",
                              "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return kit.tracked_files(root)
    paths = {Path(p) for p in out.decode().split("\0") if p}
    return sorted(p for p in paths if (root / p).is_file())


def build_harness(student: Path, assignment: str, out: Path, root: Path = ROOT) -> bool:
    """out = root's files with student/<assignment>.py in place of root's. Returns whether the
    student copy has that file."""
    for p in source_files(root):
        dst = out / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / p, dst)
    theirs = student / f"{assignment}.py"
    if not theirs.is_file():
        return False
    shutil.copyfile(theirs, out / f"{assignment}.py")
    return True


def graded_files(harness: Path, assignment: str) -> list[str]:
    """The public and the hidden test file of an assignment, those that exist in the harness."""
    files = [f"tests/test_{assignment}.py", f"{HIDDEN_DIR}/test_{assignment}_hidden.py"]
    return [f for f in files if (harness / f).is_file()]


def run_pytest(harness: Path, files: list[str], records: Path, test_limit: float,
               limit: float, collect_only: bool = False) -> tuple[str | None, float]:
    """pytest on files in harness with this module as plugin, recording into records. Returns
    (why the run stopped early or None, seconds)."""
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "grade", "-p", "no:cacheprovider",
           "-o", "addopts=", "-q", "--tb=short", "--continue-on-collection-errors"]
    if collect_only:
        cmd.append("--collect-only")
    # PYTHONPATH: `-p grade` imports this module from the harness's tests/
    path = os.pathsep.join([str(harness / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, RECORDS_ENV: str(records), TEST_LIMIT_ENV: f"{test_limit:g}",
           "PYTHONPATH": path}
    code, out, err, seconds = run_limited(cmd, harness, env, limit)
    if code is None:
        return f"the assignment's tests ran past their time limit ({limit:g} s)", seconds
    # pytest exits 0 (all passed), 1 (some failed) or 5 (none collected); anything else is a crash
    if code in (0, 1, 5):
        return None, seconds
    tail = "\n".join((out + err).strip().splitlines()[-15:])
    return f"pytest stopped (exit {code}):\n{tail}", seconds


def run_limited(cmd: list[str], cwd: Path, env: dict, limit: float
                ) -> tuple[int | None, str, str, float]:
    """Run cmd for at most limit seconds: (exit code, or None past the limit; stdout; stderr;
    seconds). Past the limit, cmd and every process it started (its session) are killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "MPLBACKEND": "Agg"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return None, out, err, limit
    return proc.returncode, out, err, time.perf_counter() - start


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        # a run killed mid-write leaves at most one partial line
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


# ---- entries
def entry(assignment: str, name: str, score: float, max_score: float, output: str,
          seconds: float, hidden: bool = False, status: str | None = None, extra=None) -> dict:
    """One test of Gradescope's results.json."""
    if status is None:
        status = "passed" if score >= max_score else "failed"
    return {"name": f"{assignment}: {name}", "score": round(score, 4), "max_score": max_score,
            "status": status, "output": output.strip()[:MAX_OUTPUT],
            "visibility": "after_due_date" if hidden else "visible",
            "execution_time": round(seconds, 2), "extra_data": extra or {}}


def function_entries(assignment: str, rows: list[dict], stopped: str | None) -> list[dict]:
    """One entry per collected test function, from the recorded rows of its cases."""
    items = [r for r in rows if r["event"] == "collected"]
    cases = {}
    for r in rows:
        if r["event"] == "case":
            cases.setdefault(r["nodeid"], []).append(r)
    functions = {}
    for item in items:
        functions.setdefault((item["file"], item["function"]), []).append(item)
    out = []
    for (file, function), members in functions.items():
        passed = 0
        counted = 0
        lines = []
        details = []
        shown = set()
        seconds = 0.0
        for item in members:
            got = cases.get(item["nodeid"], [])
            seconds += sum(r.get("seconds", 0.0) for r in got)
            case = item["nodeid"].split("::")[-1]
            failed = [r for r in got if r["outcome"] == "failed"]
            if failed:
                counted += 1
                first = failed[0]
                details.append({"case": case, "outcome": "failed", "names": first["names"],
                                "message": first["message"],
                                "not_implemented": first.get("not_implemented")})
                # a traceback once per distinct message: the cases of one stub all say the same
                if first["message"] in shown:
                    lines.append(f"FAILED {case}: {first['message']}")
                else:
                    shown.add(first["message"])
                    lines.append(f"FAILED {case}: {first['message']}\n{first['output']}")
            elif any(r["outcome"] == "passed" for r in got):
                counted += 1
                passed += 1
                details.append({"case": case, "outcome": "passed"})
            elif got:
                details.append({"case": case, "outcome": "skipped"})
                lines.append(f"skipped {case}: {got[0].get('message', '')}")
            else:
                counted += 1
                why = stopped or "the test did not run"
                details.append({"case": case, "outcome": "not run", "message": why})
                lines.append(f"NOT RUN {case}: {why}")
        points = members[0]["points"]
        max_score = points if counted else 0.0
        score = points * passed / counted if counted else 0.0
        summary = f"{passed}/{counted} cases passed" if counted else "skipped here"
        output = "\n".join([summary, *lines])
        status = "passed" if counted == passed else "failed"
        out.append(entry(assignment, f"{file}::{function}", score, max_score, output, seconds,
                         members[0]["hidden"], status, {"cases": details}))
    return out


def collect_error_summary(errors: list[str]) -> str:
    """Why the tests could not be collected: the error lines ("E ...") first, then the text."""
    said = []
    for text in errors:
        for line in text.splitlines():
            # one copy of each line: the public and the hidden file fail on the same import
            if line.startswith("E ") and line[1:].strip() not in said:
                said.append(line[1:].strip())
    if not said:
        return "the tests could not be collected:\n" + "\n".join(errors)
    return f"the tests could not be collected: {said[-1]}\n" + "\n".join(said)


def with_uncollected(rows: list[dict], reference: list[dict], why: str) -> list[dict]:
    """rows plus, for every test of the reference's collection that the student's run did not
    collect (a missing file, a syntax error, an import that fails), a failed case saying why."""
    seen = {r["nodeid"] for r in rows if r["event"] == "collected"}
    missing = [r for r in reference if r["event"] == "collected" and r["nodeid"] not in seen]
    failed = [{"event": "case", "nodeid": r["nodeid"], "outcome": "failed", "names": [],
               "message": why.splitlines()[0], "output": why} for r in missing]
    return rows + missing + failed


# ---- figures
def parse_demo_json(stdout: str) -> dict:
    """The JSON object a demo printed (the first line that opens one, to its end)."""
    decoder = json.JSONDecoder()
    offset = 0
    for line in stdout.splitlines(keepends=True):
        if line.lstrip().startswith("{"):
            value, _ = decoder.raw_decode(stdout[offset:].lstrip())
            if isinstance(value, dict):
                return value
        offset += len(line)
    raise ValueError("the demo printed no JSON object")


def run_demo(harness: Path, assignment: str, args: list[str], limit: float
             ) -> tuple[dict | None, str, float]:
    """(the demo's figures or None, what went wrong, seconds)."""
    cmd = [sys.executable, f"{assignment}.py", *args]
    command = f"`python {' '.join(cmd[1:])}`"
    code, out, err, seconds = run_limited(cmd, harness, dict(os.environ), limit)
    if code is None:
        return None, f"{command} ran past its time limit ({limit:g} s)", seconds
    if code != 0:
        last = (err.strip().splitlines() or ["(no error output)"])[-1]
        return None, f"{command} failed (exit {code}): {last}", seconds
    try:
        return parse_demo_json(out), "", seconds
    except ValueError as e:
        return None, f"{command}: {e}", seconds


def figure_entries(assignment: str, spec: dict, figures: dict | None, error: str,
                   seconds: float) -> list[dict]:
    out = []
    for rule in spec["checks"]:
        points = float(rule.get("points", 1))
        if figures is None:
            ok = False
            said = error
        else:
            ok, said = demo_figures.check(rule, figures)
        output = f"{said}\n({rule['why']}; the reference measured {rule.get('measured')})"
        score = points if ok else 0.0
        out.append(entry(assignment, demo_figures.name(rule), score, points, output, seconds,
                         extra={"figure": rule["figure"]}))
    return out


# ---- grading
def grade_assignment(student: Path, assignment: str, work: Path, figures: dict,
                     limits: argparse.Namespace) -> list[dict]:
    """Every entry of one assignment: its test functions, then its figure checks."""
    harness = work / assignment
    harness.mkdir(parents=True)
    has_file = build_harness(student, assignment, harness)
    files = graded_files(harness, assignment)
    records = work / f"{assignment}.jsonl"
    reference = work / f"{assignment}.reference.jsonl"
    if has_file:
        stopped, _ = run_pytest(harness, files, records, limits.test_time_limit, limits.time_limit)
    else:
        stopped = f"the student copy has no {assignment}.py"
    rows = read_records(records)
    errors = [r["output"] for r in rows if r["event"] == "collect_error"]
    if errors or not any(r["event"] == "collected" for r in rows):
        # tests the student's run could not collect still count: the reference's collection
        # names them, each at 0 with the reason
        why = stopped or collect_error_summary(errors).replace(f"{harness}/", "")
        run_pytest(ROOT, files, reference, limits.test_time_limit, limits.time_limit,
                   collect_only=True)
        rows = with_uncollected(rows, read_records(reference), why)
    entries = function_entries(assignment, rows, stopped)
    spec = figures.get(assignment)
    if spec and not limits.no_figures:
        if has_file:
            demo, error, seconds = run_demo(harness, assignment, spec["args"],
                                            limits.demo_time_limit)
        else:
            demo, error, seconds = None, stopped, 0.0
        entries += figure_entries(assignment, spec, demo, error, seconds)
    return entries


def junit_xml(tests: list[dict], seconds: float) -> ET.ElementTree:
    """One testsuite per assignment, one testcase per entry, points as properties."""
    suites = ET.Element("testsuites", time=f"{seconds:.2f}")
    by_assignment = {}
    for t in tests:
        by_assignment.setdefault(t["name"].split(":")[0], []).append(t)
    for assignment, group in by_assignment.items():
        failures = sum(t["status"] == "failed" for t in group)
        suite = ET.SubElement(suites, "testsuite", name=assignment, tests=str(len(group)),
                              failures=str(failures),
                              time=f"{sum(t['execution_time'] for t in group):.2f}")
        for t in group:
            case = ET.SubElement(suite, "testcase", classname=assignment,
                                 name=t["name"].split(": ", 1)[1], time=f"{t['execution_time']}")
            props = ET.SubElement(case, "properties")
            ET.SubElement(props, "property", name="score", value=f"{t['score']:g}")
            ET.SubElement(props, "property", name="max_score", value=f"{t['max_score']:g}")
            if t["status"] == "failed":
                failure = ET.SubElement(case, "failure",
                                        message=t["output"].splitlines()[0][:200])
                failure.text = t["output"]
            elif t["max_score"] == 0 and "skipped" in t["output"]:
                ET.SubElement(case, "skipped", message=t["output"][:200])
    return ET.ElementTree(suites)


def check_student_dir(student: Path) -> None:
    """Fail early, in one line, on a DIR that is not a student copy to grade."""
    if not student.exists():
        raise kit.KitError(f"DIR {student} does not exist: give the student copy's folder")
    if not student.is_dir():
        raise kit.KitError(f"DIR {student} is not a folder: give the student copy's folder")
    if student.resolve() == ROOT:
        raise kit.KitError(f"DIR {student} is the reference copy itself: grade a student copy "
                           "(python tests/make_student_version.py OUT)")
    if not any((student / f"{a}.py").is_file() for a in ASSIGNMENTS):
        names = ", ".join(f"{a}.py" for a in ASSIGNMENTS)
        raise kit.KitError(f"DIR {student} holds none of {names}: is it a student copy?")


def grade(student: Path, only=None, test_time_limit: float = 300, time_limit: float = 1200,
          demo_time_limit: float = 600, no_figures: bool = False, quiet: bool = False) -> dict:
    """Grade the student copy in student; write student/results.json and student/results.xml.
    Returns the results dict. Raises KitError on a bad student folder or unknown assignment."""
    student = Path(student).resolve()
    check_student_dir(student)
    chosen = kit.parse_only(only) or ASSIGNMENTS
    figures = demo_figures.load()
    limits = argparse.Namespace(test_time_limit=test_time_limit, time_limit=time_limit,
                                demo_time_limit=demo_time_limit, no_figures=no_figures)
    start = time.perf_counter()
    tests = []
    with tempfile.TemporaryDirectory(prefix="grade-") as work:
        for assignment in chosen:
            t0 = time.perf_counter()
            entries = grade_assignment(student, assignment, Path(work), figures, limits)
            tests += entries
            if not quiet:
                got = sum(e["score"] for e in entries)
                total = sum(e["max_score"] for e in entries)
                print(f"  {assignment:<8} {got:6.2f} / {total:<6g} ({len(entries)} entries, "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    score = round(sum(t["score"] for t in tests), 4)
    max_score = sum(t["max_score"] for t in tests)
    lines = []
    for a in chosen:
        mine = [t for t in tests if t["name"].startswith(f"{a}: ")]
        got = sum(t["score"] for t in mine)
        total = sum(t["max_score"] for t in mine)
        lines.append(f"{a}: {got:g} / {total:g}")
    results = {"score": score, "execution_time": round(seconds, 1),
               "output": f"{score:g} / {max_score:g} points. " + "; ".join(lines),
               "visibility": "visible", "extra_data": {"max_score": max_score,
                                                       "assignments": list(chosen)},
               "tests": tests}
    for name in ("results.json", "results.xml"):
        if (student / name).exists() and not quiet:
            print(f"  overwriting {student / name} (a previous grading)")
    (student / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    junit_xml(tests, seconds).write(student / "results.xml", encoding="utf-8",
                                    xml_declaration=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Grade a student copy: tests (public + hidden) and "
                                             "demo figures -> DIR/results.json and results.xml.")
    ap.add_argument("dir", type=Path, help="the student copy (make_student_version.py's OUT_DIR)")
    ap.add_argument("--only", metavar="NAMES",
                    help=f"comma-separated assignments to grade ({','.join(ASSIGNMENTS)}); "
                         "default: all of them")
    ap.add_argument("--test-time-limit", type=float, default=300, metavar="S",
                    help="seconds one test may run (default 300)")
    ap.add_argument("--time-limit", type=float, default=1200, metavar="S",
                    help="seconds one assignment's tests may run together (default 1200)")
    ap.add_argument("--demo-time-limit", type=float, default=600, metavar="S",
                    help="seconds one demo may run for the figure check (default 600)")
    ap.add_argument("--no-figures", action="store_true",
                    help="skip the figure checks (the demos)")
    args = ap.parse_args(argv)
    try:
        if args.only is not None and not kit.parse_only(args.only):
            raise kit.KitError(f"--only names no assignment: give some of {', '.join(ASSIGNMENTS)}")
        print(f"grading {args.dir.resolve()} against {ROOT}")
        results = grade(args.dir, args.only, args.test_time_limit, args.time_limit,
                        args.demo_time_limit, args.no_figures)
    except kit.KitError as e:
        sys.exit(f"error: {e}")
    print(results["output"])
    print(f"wrote {args.dir.resolve() / 'results.json'} and results.xml")


if __name__ == "__main__":
    main()
