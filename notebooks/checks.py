"""`check("NN.K", value)`: compare a notebook exercise's result with its reference, one line of output.

The references are data, not code: notebooks/checks/NN_name.json (NN the notebook's number) maps each
exercise id to what it measures and the expected answer, e.g.

    {"01.1": {"what": "MLA cache elements per token at V3 sizes", "value": 576, "atol": 0, "rtol": 0}}

`value` is a number, a string, a bool or a (nested) list compared elementwise; numbers match within
`atol + rtol * |expected|` (default: exactly, up to float rounding). A measured figure gets a range
instead, `{"min": x, "max": y}` (either bound may be left out), applied to every element of a list.
Tensors and numpy arrays are compared as the lists they hold.

    from checks import check
    check("01.1", by_hand["mla"])      # prints "✓ 01.1 MLA cache elements ...: 576"
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DATA = Path(__file__).resolve().parent / "checks"
# Float comparisons with no tolerance given still forgive the last bits of rounding.
DEFAULT_RTOL = 1e-9


def reference(exercise: str) -> dict:
    """The reference entry of one exercise id, from the JSON file of its notebook number."""
    number = exercise.split(".")[0]
    files = sorted(DATA.glob(f"{number}_*.json"))
    if not files:
        raise KeyError(f"no reference data for exercise {exercise!r}: expected {DATA}/{number}_*.json")
    for path in files:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if exercise in entries:
            return entries[exercise]
    names = ", ".join(p.name for p in files)
    raise KeyError(f"exercise {exercise!r} has no entry in {names}")


def plain(value):
    """value as JSON-like Python: tensors, arrays and tuples become lists, 0-d tensors numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def matches(got, want, atol: float = 0.0, rtol: float = DEFAULT_RTOL) -> bool:
    """Whether got equals want: numbers within atol + rtol * |want|, lists elementwise, the rest ==."""
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(got, bool) and got == want
    if _is_number(want):
        return _is_number(got) and math.isclose(got, want, rel_tol=rtol, abs_tol=atol)
    if isinstance(want, list):
        return (isinstance(got, list) and len(got) == len(want)
                and all(matches(g, w, atol, rtol) for g, w in zip(got, want)))
    if isinstance(want, dict):
        return (isinstance(got, dict) and got.keys() == want.keys()
                and all(matches(got[k], want[k], atol, rtol) for k in want))
    return got == want


def in_range(got, low: float | None, high: float | None) -> bool:
    """Whether got (a number, or every number of a list) lies in [low, high]."""
    if isinstance(got, list):
        return len(got) > 0 and all(in_range(g, low, high) for g in got)
    if not _is_number(got) or math.isnan(got):
        return False
    return (low is None or got >= low) and (high is None or got <= high)


def _short(x, width: int = 90) -> str:
    """A one-line rendering of x, floats to 4 significant digits, cut at width characters."""
    if isinstance(x, float):
        text = f"{x:.4g}"
    elif isinstance(x, list):
        text = "[" + ", ".join(_short(v, width) for v in x) + "]"
    else:
        text = repr(x)
    return text if len(text) <= width else text[:width - 1] + "…"


def expected_text(ref: dict) -> str:
    """What the reference asks for, in words: a value (with its tolerance) or a range."""
    if "value" in ref:
        atol = ref.get("atol", 0)
        rtol = ref.get("rtol", 0)
        slack = f" (atol {atol:g})" if atol else ""
        slack += f" (rtol {rtol:g})" if rtol else ""
        return _short(ref["value"]) + slack
    low = ref.get("min")
    high = ref.get("max")
    if low is None:
        return f"at most {high:g}"
    if high is None:
        return f"at least {low:g}"
    return f"between {low:g} and {high:g}"


def check(exercise: str, value) -> None:
    """Print "✓ NN.K <what>: <value>" if value matches the reference of exercise, else raise
    AssertionError("NN.K: <what>: expected ..., got ...")."""
    ref = reference(exercise)
    got = plain(value)
    if "value" in ref:
        rtol = ref.get("rtol", DEFAULT_RTOL) or DEFAULT_RTOL
        ok = matches(got, ref["value"], ref.get("atol", 0.0), rtol)
    elif "min" in ref or "max" in ref:
        ok = in_range(got, ref.get("min"), ref.get("max"))
    else:
        raise KeyError(f"the reference of {exercise!r} needs a 'value' or a 'min'/'max' range")
    what = ref.get("what", "result")
    if not ok:
        raise AssertionError(f"{exercise}: {what}: expected {expected_text(ref)}, got {_short(got)}")
    print(f"✓ {exercise} {what}: {_short(got)}")
