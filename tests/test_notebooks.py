"""The notebooks execute from top to bottom without an error, so they cannot go stale.

Each is run with nbclient in a fresh ``python3`` kernel of this interpreter (jupyter_client
starts kernel specs that name ``python`` with ``sys.executable``), from the notebooks/
folder as a user would open it. The cells check their own claims (against plain jax.numpy
or float64 NumPy, and the training claims of gradient_flow against its own runs), so a
wrong result is an error too. The documentation site shows the stored outputs, so the test
also requires each notebook to be stored executed from top to bottom.
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb", "gradient_flow.ipynb"])
def test_notebook_executes_without_errors(name, monkeypatch):
    # the kernel imports eqx_norm from this checkout whether or not it is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    counts = [cell.get("execution_count") for cell in notebook.cells if cell.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{name} must be stored executed, top to bottom, with its outputs (execution counts "
        f"{counts}): see the command in docs/getting_started.md"
    )
    client = NotebookClient(
        notebook,
        timeout=300,  # per cell; the slowest (ten training runs) takes ~15 s on 2 idle cores
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Traceback" not in text
    if name == "gradient_flow.ipynb":  # the two figures are drawn inline
        assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
