"""The notebooks: paired with their scripts, stored without outputs, run once, installable on Colab.

After editing either file of a pair, run ``jupytext --sync notebooks/*.py`` and clear the
notebook's outputs (``jupyter nbconvert --clear-output --inplace notebooks/*.ipynb``).
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import jupytext
import pytest
from helpers import REPO, run_python

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def source_repository() -> str:
    """The GitHub URL that README.md names as the project's source repository."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"The source repository is <(https://github\.com/[^>]+)>", readme)
    assert match, "README.md does not name the source repository"
    return match.group(1)


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
    repo = source_repository().removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{notebook.name}"
    first = jupytext.read(notebook).cells[0]
    assert first.cell_type == "markdown" and badge in first.source


def requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_by(extras: list[str]) -> set[str]:
    """Distributions that ``pip install "came-optax[extras]"`` installs, one level deep."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = list(project["dependencies"])
    for extra in extras:
        assert extra in project["optional-dependencies"], f"no extra named {extra!r}"
        direct += project["optional-dependencies"][extra]
    names = {requirement_name(r) for r in direct}
    for name in list(names):
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                names.add(requirement_name(requirement))
    return names


def imported(source: str) -> set[str]:
    """Top-level names of the modules that ``source`` imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_cell_installs_the_package_and_what_the_notebook_imports(notebook):
    code = [cell.source for cell in jupytext.read(notebook).cells if cell.cell_type == "code"]
    colab = [source for source in code if "google.colab" in source]
    assert len(colab) == 1, f"{notebook.name} has no Colab install cell"
    match = re.search(r'"came-optax\[([\w,]+)\] @ git\+(\S+)"', colab[0])
    assert match, f"{notebook.name} does not install came-optax with its extras"
    assert match.group(2) == source_repository()
    provided = installed_by(match.group(1).split(","))
    distributions = importlib.metadata.packages_distributions()
    # The Colab cell's own import (IPython) comes with every Jupyter kernel.
    for module in set().union(*(imported(source) for source in code if source not in colab)):
        if module not in sys.stdlib_module_names and module != "came_optax":
            needed = {requirement_name(d) for d in distributions[module]}
            assert needed & provided, f"{notebook.name} imports {module}, which is not installed"


# A pytest run that stops as soon as it starts collecting a notebook's script as a module.
COLLECTION_PROBE = """
import sys

import pytest


class StopAtNotebookScript:
    def pytest_collectstart(self, collector):
        path = getattr(collector, "path", None)
        if path is not None and path.suffix == ".py" and path.parent.name == "notebooks":
            pytest.exit(f"collected {path.name} as a module", returncode=3)


sys.exit(pytest.main(sys.argv[1:], plugins=[StopAtNotebookScript()]))
"""


def test_test_command_runs_each_notebook_once():
    """``--doctest-modules`` must not import (and so run) ``notebooks/*.py`` besides nbmake."""
    pytest.importorskip("nbmake")
    result = run_python(
        ["-c", COLLECTION_PROBE, "--collect-only", "-q", "-p", "no:cacheprovider",
         "--doctest-modules", "--nbmake", "notebooks"],
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert collected == {f"notebooks/{notebook.name}" for notebook in NOTEBOOKS}
