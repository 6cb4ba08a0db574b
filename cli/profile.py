"""``sequoia profile``: measure a device latency profile, show it, compare two, check the mask."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from sequoia import profiler
from sequoia.errors import ConfigError
from sequoia.drafts import DraftSpec
from sequoia.models import DEFAULT_MODEL, load_model
from sequoia.figures import profile_png, write_png
from sequoia.profile import KNEE_FACTOR, LatencyGrid, Profile
from sequoia_cli.common import console, err_console, handles_errors, progress_bar

app = typer.Typer(help="Measure and inspect device latency profiles.", no_args_is_help=True)


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


MODEL = typer.Option(DEFAULT_MODEL, "--model", help="Alias, .gguf file, model directory or hub id.")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or auto.")
DTYPE = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16.")
THREADS = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice).")
REPEATS = typer.Option(10, "--repeats", help="Timed passes per cell.")
WARMUP = typer.Option(2, "--warmup", help="Untimed passes per cell before timing.")


@app.command()
@handles_errors
def run(
    out: Path = typer.Option(..., "--out", help="Profile JSON to write (a PNG plot goes next to it)."),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    prefix: str = typer.Option(_csv(profiler.DEFAULT_PREFIXES), "--prefix", help="Prefix lengths."),
    tokens: str = typer.Option(
        None, "--tokens", help=f"Token counts (default: {_csv(profiler.DEFAULT_TOKENS)}, capped by the context)."
    ),
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    threads: int = THREADS,
    offload: bool = typer.Option(False, "--offload", help="Offload what exceeds GPU memory to CPU (accelerate)."),
    draft: str = typer.Option(
        None, "--draft", help="Also profile this draft per tree level: early-exit:N or a draft model."
    ),
    widths: str = typer.Option(_csv(profiler.DEFAULT_WIDTHS), "--widths", help="Draft level widths."),
    notes: str = typer.Option("", "--notes", help="Free text stored in the file (e.g. machine load)."),
) -> None:
    """Time one tree-attention forward pass per (prefix length, token count) and save it."""
    if out.suffix != ".json":
        raise ConfigError(f"--out must name a .json file, got {out}")
    prefixes = _ints(prefix, "--prefix")
    loaded = load_model(model, dtype=dtype, device=device, threads=threads, offload=offload, tokenizer=False)
    context = profiler.model_context(loaded.model)
    counts = _ints(tokens, "--tokens") if tokens else profiler.fit_tokens(profiler.DEFAULT_TOKENS, prefixes, context)
    profiler.check_plan(prefixes, counts, context)
    draft_model = DraftSpec.resolve(draft, model).causal_lm(loaded, dtype=dtype, device=device) if draft else None
    level_widths = _ints(widths, "--widths")
    if draft_model is not None:
        profiler.check_plan(prefixes, level_widths, profiler.model_context(draft_model))
    load_before = profiler.load_average()
    _warn_if_busy(load_before)
    with progress_bar() as report:
        target = profiler.measure_grid(loaded.model, loaded.name, prefixes, counts, repeats, warmup, progress=report)
        draft_grid = None
        if draft_model is not None:
            draft_grid = profiler.measure_grid(
                draft_model, draft, prefixes, level_widths, repeats, warmup, progress=report
            )
    loads = (load_before, profiler.load_average())
    result = profiler.build_profile(target, loaded.model, repeats, warmup, loads, draft_grid, notes)
    result.save(out)
    write_png(out.with_suffix(".png"), profile_png(result))
    _print_profile(result)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


@app.command()
@handles_errors
def show(path: Path = typer.Argument(..., help="A sequoia-profile/1 JSON file.")) -> None:
    """Median latency (IQR) per token count and prefix length, and the knee of each curve."""
    _print_profile(Profile.load(path))


@app.command()
@handles_errors
def compare(
    a: Path = typer.Argument(..., help="Baseline profile."),
    b: Path = typer.Argument(..., help="Profile compared with the baseline."),
) -> None:
    """Side-by-side medians of two profiles over their common cells, with B/A ratios."""
    pa, pb = Profile.load(a), Profile.load(b)
    prefixes = sorted(set(pa.target.prefix_lengths) & set(pb.target.prefix_lengths))
    counts = sorted(set(pa.target.tokens) & set(pb.target.tokens))
    if not prefixes or not counts:
        raise ConfigError(f"{a} and {b} share no (prefix length, token count) cell")
    console.print(f"A = {a}: {pa.describe()}\nB = {b}: {pb.describe()}")
    table = Table("tokens", title="median latency (ms) and B/A")
    for p in prefixes:
        table.add_column(f"A @{p}", justify="right")
        table.add_column(f"B @{p}", justify="right")
        table.add_column("B/A", justify="right")
    for n in counts:
        cells = []
        for p in prefixes:
            la, lb = pa.latency(n, p), pb.latency(n, p)
            cells += [f"{la:.1f}", f"{lb:.1f}", f"{lb / la:.2f}"]
        table.add_row(str(n), *cells)
    console.print(table)


@app.command("check-mask")
@handles_errors
def check_mask(
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    prefix: int = typer.Option(256, "--prefix", help="Prefix length."),
    tokens: str = typer.Option("1,4,16,64,128", "--tokens", help="Token counts."),
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    threads: int = THREADS,
) -> None:
    """Time the tree-mask forward against a plain causal forward (interleaved)."""
    loaded = load_model(model, dtype=dtype, device=device, threads=threads, tokenizer=False)
    with progress_bar() as report:
        check = profiler.compare_masks(
            loaded.model, prefix, _ints(tokens, "--tokens"), repeats, warmup, progress=report
        )
    table = Table(
        "tokens", "tree mask ms", "causal ms", "tree/causal",
        title=f"{loaded.name} {dtype} on {device}, prefix {prefix}: median (IQR) of {repeats}",
    )
    for t, n in enumerate(check.tokens):
        table.add_row(str(n), _cell(check.tree, 0, t), _cell(check.causal, 0, t), f"{check.ratios()[t]:.2f}")
    console.print(table)


# ---------------------------------------------------------------------------- rendering
def _warn_if_busy(load: float) -> None:
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        err_console.print(
            f"[yellow]warning:[/] load average {load} on {cpus} CPUs: other work inflates the timings, "
            "badly with several threads (try --threads 1, or profile an idle machine)",
            highlight=False, soft_wrap=True,
        )



def _print_profile(result: Profile) -> None:
    console.print(result.describe())
    _print_grid(result.target, "target: median (IQR) ms")
    knees = ", ".join(f"prefix {p}: {result.knee(p)}" for p in result.target.prefix_lengths)
    console.print(f"knee (largest n within {KNEE_FACTOR}x of {result.target.tokens[0]} token): {knees}")
    if result.draft:
        _print_grid(result.draft, f"draft {result.draft.model}, per tree level: median (IQR) ms")


def _print_grid(grid: LatencyGrid, title: str) -> None:
    table = Table("tokens", *(f"prefix {p}" for p in grid.prefix_lengths), title=title)
    for t, n in enumerate(grid.tokens):
        table.add_row(str(n), *(_cell(grid, p, t) for p in range(len(grid.prefix_lengths))))
    console.print(table)


def _cell(grid: LatencyGrid, p: int, t: int) -> str:
    iqr = grid.stats["p75"][p, t] - grid.stats["p25"][p, t]
    return f"{grid.median[p, t]:.1f} ({iqr:.1f})"



def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option} needs at least one value")
    return values
