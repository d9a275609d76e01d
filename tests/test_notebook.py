"""experiments/notebook.ipynb runs top to bottom (nbclient, a real IPython kernel) against the
session's tiny trained checkpoint, and shows its images with their predictions."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "notebook.ipynb"


def test_notebook_runs_and_shows_predictions(run, monkeypatch):
    monkeypatch.setenv("VGG_JAX_CHECKPOINT", str(run))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"from {run}" in text and "10 classes" in text
    assert "top-1 correct on these images:" in text and "of 8" in text
    assert any("image/png" in out.get("data", {}) for out in outputs), "the figure was not shown"
    shapes = [out["data"]["text/plain"] for out in outputs if out.output_type == "execute_result"]
    assert shapes == ["{'pool5': (8, 1, 1, 32), 'fc7': (8, 1, 1, 16)}"]
