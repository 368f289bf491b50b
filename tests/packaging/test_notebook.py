"""recipes/finetune_resnet18.ipynb runs top to bottom and renders its reports as HTML tables."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="executing the notebook needs nbformat")
nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient")
pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "recipes" / "finetune_resnet18.ipynb"

# Prepended to the in-memory copy: proves the kernel is this interpreter (a system-wide
# "python3" kernel without torch or surgery would otherwise fail in a confusing way).
KERNEL_CHECK = "import sys\nprint('KERNEL-PREFIX', sys.prefix)"


def _outputs(nb, output_type: str) -> list[dict]:
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == output_type
    ]


def _html_tables(nb) -> list[str]:
    return [
        o.data["text/html"]
        for o in _outputs(nb, "execute_result") + _outputs(nb, "display_data")
        if "<table>" in o.data.get("text/html", "")
    ]


def _stdout(nb) -> str:
    return "".join(o.text for o in _outputs(nb, "stream") if o.name == "stdout")


# What the notebook may write to stderr: its tqdm bars ("fine-tune:  50%|#####  | 6/12 ..."),
# nothing else (no warnings such as tqdm.auto's "IProgress not found", no deprecations).
TQDM_LINE = re.compile(r"^[\w -]+: +\d+%\|.*\| *\d+/\d+ \[")


def _stderr_noise(nb) -> list[str]:
    lines = [
        line.strip()
        for o in _outputs(nb, "stream")
        if o.name == "stderr"
        for line in re.split(r"[\r\n]+", o.text)
    ]
    return [line for line in lines if line and not TQDM_LINE.match(line)]


def test_stderr_noise_keeps_tqdm_bars_and_catches_warnings():
    stream = nbformat.v4.new_output(
        "stream",
        name="stderr",
        text="\rfine-tune:   0%|          | 0/12 [00:00<?, ?it/s]"
        "\rfine-tune: 100%|##########| 12/12 [00:01<00:00,  9.1it/s]\n"
        "/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter\n",
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("", outputs=[stream])])
    assert _stderr_noise(nb) == [
        "/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter"
    ]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {cell.id!r} has stored outputs; clear them"
            assert cell.execution_count is None, f"cell {cell.id!r} has an execution count"


@pytest.mark.slow
def test_notebook_executes_and_renders_html_tables(tmp_path, monkeypatch):
    # One torch thread in the kernel (it inherits this environment): on a small shared CPU,
    # OpenMP threads competing with other processes make the run several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(KERNEL_CHECK, id="kernel-check"))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        prefix = re.search(r"KERNEL-PREFIX (.*)", _stdout(nb))
        kernel = prefix.group(1) if prefix else "unknown"
        pytest.fail(f"notebook failed (kernel sys.prefix: {kernel}; tests: {sys.prefix}):\n{e}")

    prefix = re.search(r"KERNEL-PREFIX (.*)", _stdout(nb))
    assert prefix and Path(prefix.group(1)) == Path(sys.prefix), (
        f"the python3 kernel runs {prefix and prefix.group(1)}, not this interpreter "
        f"({sys.prefix}); install ipykernel in this environment"
    )
    errors = _outputs(nb, "error")
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    noise = _stderr_noise(nb)
    assert not noise, f"the notebook writes warnings or other noise to stderr: {noise}"

    tables = _html_tables(nb)
    assert len(tables) >= 3, (
        f"expected the load report, trainable summary and group table: {tables}"
    )
    load = [t for t in tables if "fc.weight" in t]
    assert load, "no HTML load report naming fc.weight"
    assert "mismatched" in load[0] and "(6, 512)" in load[0] and "(4, 512)" in load[0]
    assert "module." in load[0], "the load report should show the stripped 'module.' prefix"
    assert any("layer4" in t and "BN fixed" in t for t in tables), "no trainable summary table"
    groups = [t for t in tables if "weight decay" in t and "no_decay" in t]
    assert groups, "no describe_groups table"
    assert "<td>fc</td>" in groups[0] and "0.01" in groups[0]

    out = _stdout(nb)
    assert "frozen bn1 running statistics unchanged: True" in out
    accuracy = re.search(r"accuracy on digits 6-9 after fine-tuning: ([\d.]+)%", out)
    assert accuracy, f"final accuracy not printed:\n{out}"
    # chance is 25%; a seeded run gets over 90%, so this only catches a head that did not train
    assert float(accuracy.group(1)) >= 50.0, f"fine-tuning did not learn:\n{out}"
    assert (tmp_path / "resnet18_digits0-5.pth").is_file(), "checkpoint not written to the cwd"
