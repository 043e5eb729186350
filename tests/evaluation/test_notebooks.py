"""Both notebooks run top to bottom on the session's tiny workdir, so they never rot."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["quickstart.ipynb", "analysis.ipynb"])
def test_the_notebook_executes(tiny_run, monkeypatch, name):
    workdir, _ = tiny_run
    monkeypatch.setenv("MTP_WORKDIR", str(workdir))  # the kernel inherits the environment
    monkeypatch.setenv("MTP_WORKDIRS", str(workdir))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    if name == "analysis.ipynb":
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # curves, comparisons, per-run plots
