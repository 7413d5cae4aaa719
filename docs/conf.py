"""Sphinx configuration: API reference from docstrings, README sections, notebooks, changelog.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import inspect

from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.parsing import nested_parse_to_nodes

import came_optax

project = "came_optax"
author = "came_optax developers"
copyright = "came_optax developers"
release = came_optax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# docs/notebooks is a link to ../notebooks: the notebooks are rendered from where they live.
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# The notebooks are committed without outputs and are not run here (CI runs them with nbmake).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# The docstrings state each argument's type and range in words; Sphinx would print aliases
# such as optax.ScalarOrSchedule expanded into long unions.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_attr_annotations = False

html_theme = "furo"
html_title = f"came_optax {release}"


class PublicApi(SphinxDirective):
    """Summary tables and entries for every name in ``came_optax.__all__``.

    The names are read from the package at build time, so a renamed or new public name
    appears in the reference without editing the docs.
    """

    def run(self):
        kinds = {"Functions": [], "Classes": [], "Constants": []}
        for name in sorted(came_optax.__all__):
            obj = getattr(came_optax, name)
            if inspect.isclass(obj):
                kinds["Classes"].append((name, "autoclass"))
            elif callable(obj):
                kinds["Functions"].append((name, "autofunction"))
            else:
                kinds["Constants"].append((name, "autodata"))
        lines = []
        for title, entries in kinds.items():
            if not entries:
                continue
            lines += [title, "-" * len(title), "", ".. autosummary::", "   :nosignatures:", ""]
            lines += [f"   {name}" for name, _ in entries] + [""]
            for name, directive in entries:
                lines += [f".. {directive}:: {name}", ""]
        return nested_parse_to_nodes(self.state, StringList(lines, source="came_optax.__all__"))


def setup(app):
    app.add_directive("came-optax-public-api", PublicApi)
