"""Each notebook agrees with its paired percent-format script and is stored without outputs.

After editing either file of a pair, run ``jupytext --sync notebooks/*.py`` and clear the
notebook's outputs (``jupyter nbconvert --clear-output --inplace notebooks/*.ipynb``).
"""

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/came-optax/came_optax/blob/main/notebooks/"


def cells(path: Path) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "came_vs_adamw.ipynb"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_script(notebook):
    script = notebook.with_suffix(".py")
    assert script.exists(), f"{notebook.name} has no paired {script.name}"
    assert cells(notebook) == cells(script), (
        f"{notebook.name} and {script.name} differ: run `jupytext --sync notebooks/*.py`"
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(notebook):
    for cell in jupytext.read(notebook).cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{notebook.name} has outputs: clear them before committing"
            )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_its_colab_badge(notebook):
    first = jupytext.read(notebook).cells[0]
    assert first.cell_type == "markdown" and COLAB + notebook.name in first.source
