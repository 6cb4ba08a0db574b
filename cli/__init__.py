"""The ``sequoia`` command line: a thin Typer layer over the ``sequoia`` library."""
