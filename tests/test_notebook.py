"""experiments/notebook.ipynb runs top to bottom (nbclient, a real IPython kernel) against the
session's tiny trained checkpoint, and shows its images and crops with their predictions; it is
committed executed (against the README's demo run), so a reader sees the outputs on GitHub."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "notebook.ipynb"


def test_notebook_runs_and_shows_predictions(run, monkeypatch):
    monkeypatch.setenv("VGG_JAX_CHECKPOINT", str(run))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    # The kernel imports this checkout's vgg_jax (not whichever one is pip-installed in editable mode).
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    committed = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert any("image/png" in out.get("data", {}) for out in committed), "commit it executed, with its figure"
    assert not any(out.output_type == "error" for out in committed)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    # Reads back what the figure shows: the titles of the image panels.
    check = "print('\\n'.join(ax.get_title() for ax in axes.flat[::2] if ax.get_title()))\n"
    check += "print([tuple(image.shape[:2]) for image in images])"
    nb.cells.append(nbformat.v4.new_code_cell(check))
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
    # Quiet without any set-up call: no TensorFlow banner, no orbax notice, nothing on stderr.
    source = "".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "quiet" not in source
    errors = "".join(out.get("text", "") for out in outputs if out.output_type == "stream" and out.name == "stderr")
    assert errors == "", errors
    # Sizes printed as the figure titles them, width x height (the titles read back from the drawn figure).
    sizes = next(line for line in text.splitlines() if line.startswith("image sizes (width x height): "))
    printed = sizes.split(": ", 1)[1].split(", ")
    *titles, heights_widths = (
        next(out.text for out in nb.cells[-1].outputs if out.output_type == "stream").strip().split("\n")
    )
    assert len(printed) == 8 and printed == [t.rsplit(": ", 1)[1] for t in titles]
    assert printed == [f"{w}x{h}" for h, w in ast.literal_eval(heights_widths)]  # (H, W) arrays: width is shape[1]
