"""Shared pytest setup: repo root on sys.path, one marker per concept file, points, seeded torch."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# tests/test_<concept>.py (and the instructors' tests/hidden/test_<concept>_hidden.py) are graded
# by `pytest -m <concept>`: the instructor kit relies on this.
CONCEPTS = {"mla", "moe", "mtp", "fp8", "train", "grpo", "distill", "notebooks", "kit"}
# Points of a graded test function that has no points marker (parametrized cases share them).
# A test that no graded region reaches (configs, error messages, helpers) is marked points(0): it
# shows in the grade report, but untouched stubs earn nothing (tests/test_kit.py checks this).
DEFAULT_POINTS = 1


def concept_of(path: str) -> str | None:
    """The concept a test file belongs to: test_mla.py and hidden/test_mla_hidden.py -> "mla"."""
    stem = os.path.basename(path)[:-len(".py")]
    if not stem.startswith("test_"):
        return None
    stem = stem[len("test_"):]
    if stem.endswith("_hidden"):
        stem = stem[:-len("_hidden")]
    return stem if stem in CONCEPTS else None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"points(n): the test function's points in tests/grade.py (default "
                   f"{DEFAULT_POINTS}; its parametrized cases share them)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        concept = concept_of(str(item.fspath))
        if concept:
            item.add_marker(getattr(pytest.mark, concept))


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch
    torch.manual_seed(0)
    yield
