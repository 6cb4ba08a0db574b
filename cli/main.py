"""Entry point of the ``sequoia`` command: registers one sub-app per command group."""

from __future__ import annotations

import typer

import sequoia
from sequoia_cli import acceptance, bench, draft, generate, optimize, profile, serve, simulate, tree

app = typer.Typer(
    name="sequoia",
    help="Hardware-aware speculative decoding with optimal token trees.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(tree.app, name="tree")
app.add_typer(profile.app, name="profile")
app.command("optimize")(optimize.optimize)
app.command("acceptance")(acceptance.acceptance)
app.command("bench")(bench.bench)
app.command("generate")(generate.generate)
app.command("serve")(serve.serve)
app.add_typer(draft.app, name="draft")
app.add_typer(simulate.app, name="simulate")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sequoia {sequoia.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Profile a device, measure acceptance, solve for the optimal tree, decode, benchmark."""


if __name__ == "__main__":
    app()
