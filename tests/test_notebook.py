"""experiments/notebook.ipynb runs top to bottom (nbclient, a real IPython kernel) against the
session's tiny trained checkpoint, and shows its images and crops with their predictions; it is
committed executed (against the README's demo run), so a reader sees the outputs on GitHub."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "notebook.ipynb"


def test_notebook_runs_and_shows_predictions(run, monkeypatch):
    monkeypatch.setenv("VGG_JAX_CHECKPOINT", str(run))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    committed = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert any("image/png" in out.get("data", {}) for out in committed), "commit it executed, with its figure"
    assert not any(out.output_type == "error" for out in committed)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
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
