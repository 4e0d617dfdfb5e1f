"""Every notebook in `notebooks/` runs top to bottom on tiny settings, so none can rot.

Each notebook reads `HF_EXTRAS_NOTEBOOK_TINY=1` and shrinks its models, data and steps to seconds. It is executed
with `nbclient` in a fresh temporary working directory (its `runs/` folders land there) on the `python3` kernel; a
first injected cell checks that the kernel is this interpreter's environment (the venv that has hf_extras), not
some other Python that happens to own the kernelspec. Notebooks are stored without outputs (clean diffs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120  # per cell; the tiny settings take seconds, the headroom is for a loaded CI machine


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, f"expected a notebook per task in {NOTEBOOK_DIR}, found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean_and_reads_the_tiny_switch(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip the outputs before committing"
    assert any("HF_EXTRAS_NOTEBOOK_TINY" in cell.source for cell in code), "the notebook must read the TINY switch"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EXTRAS_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may download
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets the debugger's frozen-modules warning
    notebook = nbformat.read(path, as_version=4)
    check = f"import sys\nassert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}, not the test venv'"
    notebook.cells.insert(0, nbformat.v4.new_code_cell(check))
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
