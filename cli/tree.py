"""``sequoia tree``: build, show, export, import and scale speculation trees."""

from __future__ import annotations

import typer

app = typer.Typer(help="Build, inspect and export speculation trees.", no_args_is_help=True)
