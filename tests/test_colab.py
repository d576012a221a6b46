"""Executes launch/colab_demo.ipynb on CPU in its tiny test mode (COVIPAL_NOTEBOOK_TEST=1)."""
from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_demo.ipynb")


def _outputs(cell) -> str:
    text = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            text.append(o["text"])
        elif "data" in o:
            text.append(o["data"].get("text/markdown", "") or o["data"].get("text/plain", ""))
    return "\n".join(text)


def test_notebook_structure():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "CHECKPOINT" in params[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    src = "\n".join(c.source for c in nb.cells)
    for needle in ('"[tpu]"', '"[cuda]"', '"-e", REPO + extra', "XLA_PYTHON_CLIENT_PREALLOCATE",
                   "COVIPAL_REPO_URL", "COVIPAL_NOTEBOOK_TEST", 'MODEL = "tiny"'):
        assert needle in src, needle


def test_notebook_says_what_to_do_without_code(tmp_path):
    """A fresh runtime with no REPO_URL and nothing uploaded: one clear instruction."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    script = tmp_path / "setup.py"
    script.write_text(code[0] + f"\nREPO_DIR = {str(tmp_path / 'none')!r}\n" + code[1])
    env = {k: v for k, v in os.environ.items()
           if k not in ("COVIPAL_NOTEBOOK_TEST", "COVIPAL_REPO_URL")}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "covipal_jax was not found" in r.stderr and "REPO_URL" in r.stderr
    assert "COVIPAL_REPO_URL" in r.stderr and ".zip" in r.stderr


@pytest.mark.slow
def test_notebook_runs_tiny_on_cpu(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Inject parameters the way papermill does: a cell right after the parameters cell.
    idx = next(i for i, c in enumerate(nb.cells)
               if "parameters" in c.get("metadata", {}).get("tags", []))
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(
        f"OUTPUT_DIR = {str(tmp_path)!r}\nMAX_NEW_TOKENS = 3"))
    # The kernel inherits the environment: test mode, CPU, fast (unoptimized) XLA compiles.
    monkeypatch.setenv("COVIPAL_NOTEBOOK_TEST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    text = "\n".join(_outputs(c) for c in nb.cells if c.cell_type == "code")
    assert "accelerator: cpu" in text
    assert "skipping installation" in text
    assert "| unpruned | none | 64 / 64 |" in text
    assert "| pruned | visionzip | 16 / 64 |" in text
    assert "visionzip: 15 patches kept of 64, + CLS" in text
    # The last cell shows the side-by-side grid and saved it.
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert any("image/png" in o.get("data", {}) for o in last.outputs)
    grid = np.asarray(Image.open(tmp_path / "kept_patches.png").convert("RGB"))
    grey = (grid[..., 0] == grid[..., 1]) & (grid[..., 1] == grid[..., 2])
    assert 0.2 < grey.mean() < 0.98  # pruned patches greyed, kept ones in colour
