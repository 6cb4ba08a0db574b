"""Entry point of the ``sequoia`` command: registers one sub-app per command group.

A command's module is imported only when that command runs (``sequoia profile run`` never
imports the training or benchmark code), so a command that only reads a cached file starts in a
fraction of a second; ``app`` (every command, for ``--help`` and the tests) is built on first use.
"""

from __future__ import annotations

import importlib
import sys

import typer

import sequoia

GROUPS = {"tree": "tree", "profile": "profile", "draft": "draft", "simulate": "simulate"}  # name -> module (.app)
COMMANDS = {"optimize": "optimize", "acceptance": "acceptance", "bench": "bench", "generate": "generate",
            "serve": "serve"}  # name -> module (.<name>)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sequoia {sequoia.__version__}")
        raise typer.Exit()


def build(only: str | None = None) -> typer.Typer:
    """The Typer app with every command, or with ``only`` that one (what one run needs)."""
    app = typer.Typer(
        name="sequoia",
        help="Hardware-aware speculative decoding with optimal token trees.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for name in [*GROUPS, *COMMANDS]:
        if only is not None and name != only:
            continue
        if name in GROUPS:
            app.add_typer(importlib.import_module(f"sequoia_cli.{GROUPS[name]}").app, name=name)
        else:
            app.command(name)(getattr(importlib.import_module(f"sequoia_cli.{COMMANDS[name]}"), name))

    @app.callback()
    def main(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """Profile a device, measure acceptance, solve for the optimal tree, decode, benchmark."""

    return app


def run() -> None:
    """The ``sequoia`` console script: build only the command asked for, then run it."""
    if sys.argv[1:] == ["--version"]:
        typer.echo(f"sequoia {sequoia.__version__}")
        return
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    build(name if name in GROUPS or name in COMMANDS else None)()


def __getattr__(name: str):
    if name == "app":  # every command: `from sequoia_cli.main import app`
        globals()["app"] = built = build()
        return built
    raise AttributeError(f"module 'sequoia_cli.main' has no attribute {name!r}")


if __name__ == "__main__":
    run()
