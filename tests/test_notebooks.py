"""Every notebook in `notebooks/` runs top to bottom on tiny settings, so none can rot.

Each notebook reads `HF_EXTRAS_NOTEBOOK_TINY=1` and shrinks its models, data and steps to seconds. It is executed
with `nbclient` in a fresh temporary working directory (its `runs/` folders land there) on the `python3` kernel; a
first injected cell checks that the kernel is this interpreter's environment (the venv that has hf_extras), not
some other Python that happens to own the kernelspec. Notebooks are stored without outputs (clean diffs).

`test_notebook_runs_at_default_settings` (slow, outside CI: `pytest -m slow tests/test_notebooks.py -s`) runs them as
a reader does, in one working directory (notebook 01 first, so 03 fine-tunes its model) with `../shared/data`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 180  # per cell; the tiny settings take seconds, the headroom is for a loaded CI machine
CONCURRENT_KERNELS = 2  # kernels start and import torch single-threaded: two at a time use both CI cores
# every task and every family has a notebook (a family tour may be folded into a task notebook)
TOPICS = (
    "causal_lm", "masked_lm", "sequence_classification", "token_classification", "question_answering",
    "image_classification", "seq2seq", "retnet", "gated_retention", "mamba", "dyt", "mlp_mixer",
)  # fmt: skip
TINY_ENV = {
    "HF_EXTRAS_NOTEBOOK_TINY": "1",
    "HF_HUB_OFFLINE": "1",  # nothing may download
    "JUPYTER_PREFER_ENV_PATH": "1",  # the venv's python3 kernelspec wins over a user-level one of another Python
    "MPLBACKEND": "agg",
    "OMP_NUM_THREADS": "1",  # tiny models gain nothing from threads; two kernels share the cores
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # quiets the debugger's frozen-modules warning
}


def test_every_task_and_family_has_a_notebook():
    names = " ".join(p.stem for p in NOTEBOOKS)
    assert [t for t in TOPICS if t not in names] == [], f"notebooks in {NOTEBOOK_DIR}: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean_and_reads_the_tiny_switch(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), (
        "strip the outputs before committing"
    )
    assert any("HF_EXTRAS_NOTEBOOK_TINY" in cell.source for cell in code), "the notebook must read the TINY switch"


async def _execute(path: Path, workdir: Path, slots: asyncio.Semaphore, cell_timeout: int) -> tuple[str | None, float]:
    """Run the notebook in `workdir`; the error text of the failing cell (or None) and the wall time in seconds."""
    notebook = nbformat.read(path, as_version=4)
    check = f"import sys\nassert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}, not the test venv'"
    notebook.cells.insert(0, nbformat.v4.new_code_cell(check))
    client = nbclient.NotebookClient(
        notebook, timeout=cell_timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    async with slots:
        start = time.perf_counter()
        try:
            await client.async_execute()
        except nbclient.exceptions.CellExecutionError as error:
            return str(error), time.perf_counter() - start
    return None, time.perf_counter() - start


def _execute_selected(
    request, test_name: str, env: dict[str, str], workdir_for, cell_timeout: int, shared_workdir: bool = False
):
    """Execute every notebook whose `test_name` test was selected, `CONCURRENT_KERNELS` at a time; path ->
    (error or None, seconds). In a shared working directory notebook 01 runs first: later ones load its model."""
    selected = [
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", None) == test_name
    ]
    first = [p for p in selected if p.stem.startswith("01_")] if shared_workdir else []

    async def run_all():
        slots = asyncio.Semaphore(CONCURRENT_KERNELS)
        results = {}
        for batch in (first, [p for p in selected if p not in first]):
            outcomes = await asyncio.gather(*(_execute(p, workdir_for(p), slots, cell_timeout) for p in batch))
            results.update(zip(batch, outcomes))
        return results

    with pytest.MonkeyPatch.context() as patch:  # kernels inherit this process's environment
        for key, value in env.items():
            patch.setenv(key, value)
        return asyncio.run(run_all())


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory) -> dict[Path, tuple[str | None, float]]:
    """Every selected notebook on its tiny settings, each in a fresh working directory."""
    return _execute_selected(
        request, "test_notebook_executes", TINY_ENV, lambda p: tmp_path_factory.mktemp(p.stem), CELL_TIMEOUT_S
    )


@pytest.fixture(scope="module")
def executed_at_default_settings(request, tmp_path_factory) -> dict[Path, tuple[str | None, float]]:
    """Every selected notebook at the settings a reader runs, in one shared working directory, with the real data."""
    env = {key: value for key, value in TINY_ENV.items() if key != "HF_EXTRAS_NOTEBOOK_TINY"}
    env["HF_EXTRAS_DATA_DIR"] = SHARED_DATA
    workdir = tmp_path_factory.mktemp("notebooks")
    return _execute_selected(
        request, "test_notebook_runs_at_default_settings", env, lambda p: workdir, 3600, shared_workdir=True
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, executed):
    """The notebook runs top to bottom on tiny settings in a fresh working directory, on this venv's kernel."""
    error, _ = executed[path]
    if error is not None:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_default_settings(path, executed_at_default_settings):
    """The notebook as a reader runs it (minutes each; `pytest -m slow tests/test_notebooks.py -s` prints times)."""
    error, seconds = executed_at_default_settings[path]
    print(f"\n{path.name}: {seconds:.0f} s at default settings")
    if error is not None:
        pytest.fail(f"{path.name} failed at its default settings:\n{error}", pytrace=False)
