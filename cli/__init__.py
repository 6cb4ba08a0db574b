"""The ``sequoia`` command line: a thin Typer layer over the ``sequoia`` library.

The folder is ``cli/`` (the product's layout), but it installs as the package ``sequoia_cli``
(``pyproject.toml`` maps it): a top-level package named ``cli`` would clash with any other
installed distribution that ships one. Each module is one command group; none holds an
algorithm, a report or a plot -- those live in the library.
"""
