"""``sequoia tree``: build, show, export, import and scale speculation trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree as RichTree

from sequoia import solver
from sequoia.acceptance import ACCEPTANCE_FORMAT, AcceptanceResult
from sequoia.errors import AcceptanceError, ConfigError
from sequoia.scaling import ScalingReport
from sequoia.tree import EXPORT_FORMATS, Tree, export, load_growmap
from sequoia_cli.common import console, handles_errors

app = typer.Typer(help="Build, inspect and export speculation trees.", no_args_is_help=True)

BUILD_SHAPES = ("sequoia", *solver.SHAPES)

AcceptanceFile = typer.Option(None, "--acceptance", help=f"A {ACCEPTANCE_FORMAT} JSON file (its rows by depth where measured, else its 'vector').")
AcceptanceText = typer.Option(None, "--p", help="Acceptance vector inline, e.g. 0.62,0.13,0.05.")


def _acceptance(path: Path | None, text: str | None, required: bool = True) -> np.ndarray | None:
    """The acceptance vector from ``--acceptance`` or ``--p`` (exactly one of them)."""
    if path is not None and text is not None:
        raise ConfigError("give the acceptance vector once: --acceptance FILE or --p LIST, not both")
    if path is not None:
        return AcceptanceResult.load(path).for_solver  # one row per depth where measured
    if text is not None:
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise AcceptanceError(f"--p must be comma-separated numbers, got {text!r}") from None
        return solver.validate_acceptance(values)
    if required:
        raise ConfigError("this needs an acceptance vector: --acceptance FILE or --p 0.62,0.13,0.05")
    return None


def _solve_with_progress(p: np.ndarray, max_size: int, max_depth: int) -> solver.SolveTable:
    columns = (TextColumn("solving depth"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("solve", total=max(1, min(max_depth, max_size - 1)))
        return solver.solve(p, max_size, max_depth, lambda done, _: bar.update(task, completed=done))


def _with_meta(tree: Tree, p: np.ndarray | None, **meta: object) -> Tree:
    if p is not None:
        meta |= {"acceptance": p.tolist(), "expected_tokens": solver.expected_tokens(tree, p)}
    return Tree(tree.parents, {**tree.meta, **meta})


def _say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


def _summary(tree: Tree) -> str:
    line = f"{tree.size} nodes, depth {tree.depth}"
    if "expected_tokens" in tree.meta:
        line += f", {tree.meta['expected_tokens']:.4f} expected tokens per step"
    return line


@app.command()
@handles_errors
def build(
    out: Path = typer.Option(..., "--out", help="Where to write the sequoia-tree/1 JSON."),
    acceptance: Path | None = AcceptanceFile,
    p: str | None = AcceptanceText,
    budget: int | None = typer.Option(None, "--budget", help="Size budget in nodes, root included."),
    max_depth: int = typer.Option(16, "--max-depth", help="Depth limit (edges) with --budget."),
    shape: str = typer.Option("sequoia", "--shape", help=f"One of {', '.join(BUILD_SHAPES)}."),
    width: int | None = typer.Option(None, "--width", help="Baselines: branching (kary) or chain count (chains)."),
    depth: int | None = typer.Option(None, "--depth", help="Baselines: depth of the fixed shape."),
) -> None:
    """Build the optimal tree for a budget, or a baseline shape (fixed, or best within --budget)."""
    if shape not in BUILD_SHAPES:
        raise ConfigError(f"unknown tree shape {shape!r}; choose one of {', '.join(BUILD_SHAPES)}")
    fixed = shape != "sequoia" and depth is not None
    vector = _acceptance(acceptance, p, required=not fixed)
    if fixed:
        if shape != "chain" and width is None:
            raise ConfigError(f"--shape {shape} --depth {depth} also needs --width")
        shaped = solver.topk_per_level(solver.shape_widths(shape, width or 1, depth))
        tree = _with_meta(shaped, vector, shape=shape, width=width, depth=depth)
    elif budget is None:
        raise ConfigError(f"--shape {shape} needs --budget (or --depth and --width for a fixed shape)")
    elif shape == "sequoia":
        tree = _solve_with_progress(vector, budget, max_depth).tree(budget, max_depth)
    else:
        tree = solver.best_baseline(shape, vector, budget, max_depth)
    tree.save(out)
    _say(f"wrote {out}: {_summary(tree)}")


@app.command()
@handles_errors
def show(
    file: Path = typer.Argument(..., help="A sequoia-tree/1 JSON or growmap .pt file."),
    acceptance: Path | None = AcceptanceFile,
    p: str | None = AcceptanceText,
    table: bool = typer.Option(False, "--table", help="One row per node instead of a tree view."),
) -> None:
    """Show a tree: every node's id, parent, depth, rank and reach probability."""
    tree = Tree.load(file)
    vector = _acceptance(acceptance, p, required=False)
    if vector is None and "acceptance" in tree.meta:
        vector = solver.acceptance_by_depth(tree.meta["acceptance"])
    reach = None if vector is None else solver.reach_probabilities(tree, vector)
    if reach is not None:
        tree = _with_meta(tree, vector)

    def label(i: int) -> str:
        prob = "" if reach is None else f"  reach [bold]{reach[i]:.4f}[/]"
        if i == 0:
            return f"[cyan]0[/] root{prob}"
        return f"[cyan]{i}[/] ← {tree.parents[i]}  depth {tree.depths[i]}  rank {tree.ranks[i]}{prob}"

    if table:
        view = Table("node", "parent", "depth", "rank", "reach", title=str(file))
        for i in range(tree.size):
            view.add_row(*map(str, (i, tree.parents[i], tree.depths[i], tree.ranks[i])),
                         "-" if reach is None else f"{reach[i]:.4f}")
    else:
        view = RichTree(f"[bold]{file}[/]")
        branches = [view.add(label(0))]
        for i in range(1, tree.size):
            branches.append(branches[tree.parents[i]].add(label(i)))
    console.print(view)
    _say(_summary(tree))


@app.command("export")
@handles_errors
def export_command(
    file: Path = typer.Argument(..., help="A sequoia-tree/1 JSON or growmap .pt file."),
    fmt: str = typer.Option(..., "--format", help=f"One of {', '.join(EXPORT_FORMATS)}."),
    out: Path = typer.Option(..., "--out", help="Output file."),
) -> None:
    """Export a tree as sequoia-tree/1 JSON, a growmap .pt, Medusa choices or a vLLM tree."""
    tree = Tree.load(file)
    export(tree, fmt, out)
    _say(f"wrote {out} ({fmt}): {_summary(tree)}")


@app.command("import")
@handles_errors
def import_command(
    growmap: Path = typer.Argument(..., help="A growmap .pt from the original Sequoia repository."),
    out: Path = typer.Option(..., "--out", help="Where to write the sequoia-tree/1 JSON."),
    acceptance: Path | None = AcceptanceFile,
    p: str | None = AcceptanceText,
) -> None:
    """Import an original Sequoia growmap as a sequoia-tree/1 file."""
    tree = Tree.from_growmap(load_growmap(growmap))
    tree = _with_meta(tree, _acceptance(acceptance, p, required=False), source=str(growmap))
    tree.save(out)
    _say(f"wrote {out}: {_summary(tree)}")


@app.command()
@handles_errors
def scaling(
    acceptance: Path | None = AcceptanceFile,
    p: str | None = AcceptanceText,
    max_size: int = typer.Option(512, "--max-size", help="Largest tree size on the curve."),
    max_depth: int = typer.Option(32, "--max-depth", help="Depth limit for every tree."),
    out: Path = typer.Option(Path("results/scaling.png"), "--out", help="PNG path; .json and .md go next to it."),
) -> None:
    """Expected tokens vs tree size: the optimal tree against chain, k-ary and k-chains trees."""
    if out.suffix != ".png":
        raise ConfigError(f"--out must be a .png path (the .json and .md go next to it), got {out}")
    vector = _acceptance(acceptance, p)
    curves = solver.scaling_table(vector, max_size, max_depth, _solve_with_progress(vector, max_size, max_depth))
    report = ScalingReport(vector, max_depth, curves)
    report.write(out)
    view = Table("size", *curves, title=f"expected tokens per step (depth <= {max_depth})")
    for row in report.rows():
        view.add_row(*row)
    console.print(view)
    _say(f"wrote {out}, {out.with_suffix('.json')} and {out.with_suffix('.md')}")
