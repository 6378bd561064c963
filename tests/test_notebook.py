"""Execute notebooks/quickstart.ipynb headless (nbclient + ipykernel), as CI does."""
import os
import pathlib

import pytest

NB = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="notebook execution needs nbformat (dev extra)")
    nbclient = pytest.importorskip("nbclient", reason="notebook execution needs nbclient (dev extra)")
    pytest.importorskip("ipykernel", reason="notebook execution needs ipykernel (dev extra)")
    pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib (dev extra)")
    nb = nbformat.read(str(NB), as_version=4)
    keep = {k: os.environ.get(k) for k in ("XLA_FLAGS", "PYTHONPATH")}
    # the kernel is a fresh process: one CPU device is enough and compiles faster; it must
    # import this checkout's fusion_jax even when the package is not installed
    os.environ["XLA_FLAGS"] = ""
    root = str(NB.parents[1])
    os.environ["PYTHONPATH"] = root + (os.pathsep + keep["PYTHONPATH"] if keep["PYTHONPATH"] else "")
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bitwise equal: True" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
    assert images >= 3                     # synthesized image, loss curve, crops with windows
