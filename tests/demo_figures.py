"""The reference figures of the concept demos (tests/demo_figures.json, data) and how a demo's
figures are checked against them.

Each concept's demo prints its figures (`python mla.py --json --small`); demo_figures.json gives,
per concept, the demo's arguments and a list of checks: one figure compared with a number or with
another figure of the same run (times a factor, plus an offset), its points, the value the
reference measured, and why the band holds. tests/grade.py grades a student's demo with them; the
demo tests of tests/test_<concept>.py check the same bands in-process, so a student sees them too.
"""
from __future__ import annotations

import json
from pathlib import Path

PATH = Path(__file__).resolve().parent / "demo_figures.json"


def load(path: Path = PATH) -> dict:
    """{concept: {"args": [...], "checks": [...]}} (the "about" note left out)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if k != "about"}


def bound(spec, figures: dict):
    """A check's bound: a number (or bool), or {"figure": name, "times": f, "plus": c}: that
    figure of the same run, times f, plus c."""
    if isinstance(spec, dict):
        return float(figures[spec["figure"]]) * spec.get("times", 1.0) + spec.get("plus", 0.0)
    return spec


def describe(spec) -> str:
    """A bound as text: 576, or 0.5 x maxvio_global_none + 0.1."""
    if not isinstance(spec, dict):
        return f"{spec:g}" if isinstance(spec, float) else str(spec)
    text = spec["figure"]
    if spec.get("times", 1.0) != 1.0:
        text = f"{spec['times']:g} x {text}"
    if spec.get("plus", 0.0):
        text = f"{text} + {spec['plus']:g}"
    return text


def name(rule: dict) -> str:
    """A check's name, e.g. 'figure cache_elements_mla_v3 == 576'."""
    parts = []
    if "equals" in rule:
        parts.append(f"== {describe(rule['equals'])}")
    if "at_least" in rule:
        parts.append(f">= {describe(rule['at_least'])}")
    if "at_most" in rule:
        parts.append(f"<= {describe(rule['at_most'])}")
    return f"figure {rule['figure']} {' and '.join(parts)}"


def check(rule: dict, figures: dict) -> tuple[bool, str]:
    """(whether figures meet rule, what was measured against what). A bool figure must equal
    its bool; a number may differ from an "equals" bound by the rule's "tolerance" (default 0)."""
    key = rule["figure"]
    if key not in figures:
        return False, f"the demo reported no figure {key!r}"
    value = figures[key]
    ok = True
    against = []
    try:
        if "equals" in rule:
            want = bound(rule["equals"], figures)
            if isinstance(want, bool) or isinstance(value, bool):
                ok = ok and value is want
            else:
                ok = ok and abs(float(value) - float(want)) <= rule.get("tolerance", 0.0)
            against.append(f"== {want}")
        if "at_least" in rule:
            want = bound(rule["at_least"], figures)
            ok = ok and float(value) >= want
            against.append(f">= {want:.4g}")
        if "at_most" in rule:
            want = bound(rule["at_most"], figures)
            ok = ok and float(value) <= want
            against.append(f"<= {want:.4g}")
    except (KeyError, TypeError, ValueError) as e:
        return False, f"{key} = {value!r} cannot be checked: {type(e).__name__}: {e}"
    return ok, f"measured {key} = {value!r}, wanted {' and '.join(against)}"


def unmet(concept: str, figures: dict) -> list[str]:
    """What each failed check of concept says about figures (a demo's dict); [] if all hold."""
    out = []
    for rule in load()[concept]["checks"]:
        ok, said = check(rule, figures)
        if not ok:
            out.append(f"{name(rule)}: {said} ({rule['why']})")
    return out
