"""Every notebook runs top to bottom in small mode (NOTEBOOK_SMALL=1) without a cell error.

Stored outputs are not compared: the notebooks are re-executed from scratch, in their own folder,
as a student would run them.
"""
import glob
import os

import pytest

from conftest import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="install tests/requirements.txt to run notebooks")
    nbclient = pytest.importorskip("nbclient", reason="install tests/requirements.txt to run notebooks")
    monkeypatch.setenv("NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Anything a notebook writes under out/ goes to a temporary folder, not the user's runs.
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
