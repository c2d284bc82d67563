"""The quick-start notebook runs top to bottom (on a tiny model, with small settings)."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(model_dir, tmp_path, monkeypatch):
    for key, value in {"PLACEMENT_MODEL": str(model_dir), "PLACEMENT_STEPS": "1", "PLACEMENT_TEST": "4",
                       "PLACEMENT_BATCHES": "2", "PLACEMENT_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "out" / "compare" / "comparison.csv").is_file()
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the heatmap and the curves, inline
