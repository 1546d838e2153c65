"""The house rules a reader relies on: every code file fits 100 columns, names its functions with
`def` (no named lambdas), fences its sections, and every flag of the three scripts says what it
does and its default once (`python train.py --help`)."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

CODE = sorted(glob.glob(os.path.join(ROOT, "*.py")))
SCRIPTS = ["train.py", "grpo.py", "distill.py"]


@pytest.mark.parametrize("path", CODE, ids=[os.path.basename(p) for p in CODE])
def test_lines_fit_100_columns(path):
    long = [i + 1 for i, line in enumerate(open(path, encoding="utf-8")) if len(line.rstrip("\n")) > 100]
    assert not long, f"{os.path.basename(path)}: lines over 100 columns: {long[:10]}"


@pytest.mark.parametrize("path", CODE, ids=[os.path.basename(p) for p in CODE])
def test_no_named_lambdas(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    named = [node.lineno for node in ast.walk(tree)
             if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Lambda)]
    assert not named, f"{os.path.basename(path)}: name a function with def, not lambda: lines {named}"


@pytest.mark.parametrize("path", CODE, ids=[os.path.basename(p) for p in CODE])
def test_sections_are_fenced_and_mapped(path):
    text = open(path, encoding="utf-8").read()
    fences = re.findall(r"^# ---- (.+)$", text, flags=re.M)
    assert fences, f"{os.path.basename(path)}: sections need `# ---- name` fences"
    assert not re.search(r"^# -{6,}", text, flags=re.M), "use `# ---- name`, not a long rule"


def test_train_py_leads_with_the_model():
    lines = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read().splitlines()
    where = next(i + 1 for i, line in enumerate(lines) if line.startswith("class Transformer("))
    assert where <= 200, f"class Transformer starts at line {where}: a reader looks for it first"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_every_flag_with_its_default_once(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout
    options = out[out.index("options:"):] if "options:" in out else out
    flags = re.findall(r"^  (--[a-z0-9-]+)(?:, --no-[a-z0-9-]+)?(?: [A-Z_]+)?\s+(.*)$", options, flags=re.M)
    assert len(flags) > 10, f"{script} --help lists too few flags:\n{out}"
    for flag, text in flags:
        assert "default" in text, f"{script} {flag}: no default shown: {text!r}"
        assert text.count("(default:") == 1, f"{script} {flag}: the default is shown twice: {text!r}"
        assert not text.startswith("(default"), f"{script} {flag}: no description: {text!r}"
