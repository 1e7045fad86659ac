"""The walkthrough notebook runs top to bottom and shows what it promises.

The notebook is executed with nbclient in a temporary working directory, on a kernel
whose argv is this test process's own interpreter (``sys.executable``), so it always runs
in the project's environment whatever kernelspecs the machine has installed.
"""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
KERNEL = "python3"


def _cell_text(cell) -> str:
    """Everything a code cell printed or displayed, as plain text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("display_data", "execute_result"):
            data = out.get("data", {})
            parts.append(data.get("text/plain", ""))
            parts.append(data.get("text/html", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out.get("traceback", [])))
    return "\n".join(parts)


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    # A kernelspec that launches *this* interpreter, found first through JUPYTER_PATH.
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tnexp test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    workdir = tmp_path_factory.mktemp("notebook-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(jupyter_dir))
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            nb,
            timeout=600,
            kernel_name=KERNEL,
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()  # raises CellExecutionError if any cell fails
    return nb, workdir


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
def test_notebook_runs_without_errors(executed):
    nb, workdir = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    for cell in code:
        for out in cell.outputs:
            assert out.output_type != "error", _cell_text(cell)
    # logger=False / no checkpoints: the notebook leaves nothing behind in its directory.
    assert not list(Path(workdir).iterdir())


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
def test_notebook_shows_each_step(executed):
    nb, _ = executed
    text = "\n".join(_cell_text(c) for c in nb.cells if c.cell_type == "code")

    teacher = re.search(r"teacher validation top-1: (\d+\.\d+)%", text)
    assert teacher and 50.0 < float(teacher.group(1)) <= 100.0

    # b. one convolution: the three-conv structure and SVD beating random init
    assert "TuckerConv2d(" in text and "(core): Conv2d" in text
    errors = dict(re.findall(r"init=(svd|random)\s.*weight error (\d+\.\d+)", text))
    assert set(errors) == {"svd", "random"}
    assert float(errors["svd"]) < float(errors["random"])

    # c. the factory report
    assert "tensorization report" in text
    assert "whole model" in text
    assert "layer4.0.conv2" in text

    # d. local distillation
    assert "slices: ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']" in text
    after = re.search(r"after local distillation: (\d+\.\d+)%", text)
    assert after and 0.0 <= float(after.group(1)) <= 100.0

    # e. plots (per-slice losses, accuracy vs time + per-layer CR)
    assert sum(_images(c) for c in nb.cells if c.cell_type == "code") >= 2


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
def test_notebook_summary(executed):
    nb, _ = executed
    line = next(
        ln
        for c in nb.cells
        if c.cell_type == "code"
        for ln in _cell_text(c).splitlines()
        if ln.startswith("SUMMARY ")
    )
    summary = json.loads(line.removeprefix("SUMMARY "))
    for key in ("teacher_top1", "student_top1_before", "student_top1_after"):
        assert isinstance(summary[key], float) and 0.0 <= summary[key] <= 100.0, key
    assert summary["student_top1_after"] > summary["student_top1_before"]
    assert 0.4 < summary["model_cr"] < 0.5
    assert summary["optimization_s"] > 0
    for name, (first, last) in summary["slice_loss"].items():
        assert last < first, name
