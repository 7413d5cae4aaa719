"""Repository-wide pytest configuration.

``notebooks/*.py`` are the notebooks' jupytext scripts. ``--nbmake notebooks`` runs the
notebooks; ``--doctest-modules`` would also import each script, which executes the whole
notebook a second time during collection.
"""

collect_ignore_glob = ["notebooks/*.py"]
