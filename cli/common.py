"""Helpers shared by every command: one console, and turning library errors into one line."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sequoia.errors import SequoiaError
from sequoia.models import DEFAULT_MODEL

console = Console()
err_console = Console(stderr=True)

DRAFT_HELP = (
    "none, ngram, early-exit:N, a trained draft (packaged name or directory) or a draft model "
    "sharing the target's tokenizer. Default: the target's packaged trained draft, else ngram."
)

# Options `generate` and `serve` share: what to decode with, and how to plan it for this device.
TARGET_OPTION = typer.Option(DEFAULT_MODEL, "--target", help="Alias, .gguf file, model directory or hub id.")
DRAFT_OPTION = typer.Option(None, "--draft", help=DRAFT_HELP)
TREE_OPTION = typer.Option(None, "--tree", help="Tree file (sequoia-tree/1 JSON or growmap .pt).")
BUDGET_OPTION = typer.Option(None, "--budget", help="Tree size for the solver (with --acceptance).")
MAX_DEPTH_OPTION = typer.Option(None, "--max-depth", help="Tree depth limit for the solver or the plan.")
ACCEPTANCE_OPTION = typer.Option(
    None, "--acceptance", help="sequoia-acceptance/1 file to plan with (default: the draft's card, else a guess)."
)
PROFILE_OPTION = typer.Option(
    [], "--profile", help="Profile(s) to plan with (default: this device's, cached or measured now)."
)
FOREIGN_PROFILE_OPTION = typer.Option(False, "--foreign-profile", help="Accept a profile of another device.")
PLAN_DTYPE_OPTION = typer.Option(
    None, "--dtype", help="float32, bfloat16 or float16 (default: the plan's choice for this device)."
)
VERIFIER_OPTION = typer.Option("sequoia", "--verifier", help="Stochastic verification: sequoia or specinfer.")
THREADS_OPTION = typer.Option(None, "--threads", help="CPU threads for torch (default: all).")
P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one red line on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    """Print one yellow ``warning:`` line on stderr."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command so a :class:`SequoiaError` becomes one line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except SequoiaError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None

    return wrapper


@contextmanager
def progress_bar(description: str = "loading", console: Console = console) -> Iterator[Callable[[int, int, str], None]]:
    """A transient Rich bar (on ``console``: stdout unless a command keeps stdout for its
    output); yields ``update(done, total, label)`` for library callbacks."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total, label: bar.update(task, completed=done, total=total, description=label)
