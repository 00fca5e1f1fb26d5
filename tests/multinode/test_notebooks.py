"""The notebooks run headless at a tiny size (``NOTEBOOK_SIZE=tiny``) and save their figures:
the load sweep and the autoscaling experiment. Each starts its own local Ray in its kernel
(a process of its own), so they run with the multi-node tests, after the session app's."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.notebook

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("name", "figures"), [
    ("load_sweep", ["load_sweep", "latency_vs_offered"]), ("autoscaling", ["autoscaling"])])
def test_notebook_runs_headless_and_saves_its_figures(name: str, figures: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [NOTEBOOKS / "figures" / f"{f}.png" for f in figures]
    for figure in paths:
        figure.unlink(missing_ok=True)
    monkeypatch.setenv("NOTEBOOK_SIZE", "tiny")
    for attempt in range(2):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOKS)}})
        try:
            client.execute()  # raises CellExecutionError, with the cell's traceback
            break
        except nbclient.exceptions.CellExecutionError as exc:
            # Ray gives its node 30 s to register; on a machine this loaded it may miss it.
            # The kernel (and the Ray it started) is gone: run the notebook again, once.
            if attempt or "timed out during startup" not in str(exc):
                raise
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    for figure in paths:
        assert figure.exists() and figure.stat().st_size > 5_000
        assert f"saved {figure}" in printed
