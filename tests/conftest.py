"""Shared pytest setup: repo root on sys.path, one marker per concept file, deterministic torch."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# tests/test_<concept>.py is graded by `pytest -m <concept>` (the instructor kit relies on this).
CONCEPTS = {"mla", "moe", "mtp", "fp8", "train", "grpo", "distill", "notebooks", "kit"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        stem = os.path.basename(str(item.fspath))[len("test_"):-len(".py")]
        if stem in CONCEPTS:
            item.add_marker(getattr(pytest.mark, stem))


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch
    torch.manual_seed(0)
    yield
