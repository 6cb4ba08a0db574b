"""``sequoia profile``: measure a device latency profile, show it, compare two, check the mask."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from sequoia import device as devices
from sequoia.errors import ConfigError
from sequoia.optimizer import STEP_KEY
from sequoia.profile import DEFAULT_PREFIXES, DEFAULT_TOKENS, DEFAULT_WIDTHS, KNEE_FACTOR, LatencyGrid, Profile
from sequoia_cli.common import console, err_console, handles_errors, progress_bar

# Heavy modules (transformers, the profiler) are imported inside the commands that measure, so
# finding this device's cached profiles takes a fraction of a second.
app = typer.Typer(help="Measure and inspect device latency profiles.", no_args_is_help=True)
DEFAULT_TARGET = "smollm2-135m"  # sequoia.models.DEFAULT_MODEL (checked equal by the tests)


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


MODEL = typer.Option(DEFAULT_TARGET, "--model", help="Alias, .gguf file, model directory or hub id.")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or auto.")
DTYPE = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16.")
THREADS = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice).")
REPEATS = typer.Option(10, "--repeats", help="Timed passes per cell.")
WARMUP = typer.Option(2, "--warmup", help="Untimed passes per cell before timing.")


@app.command()
@handles_errors
def run(
    out: Path | None = typer.Option(
        None, "--out", help="Profile JSON to write (a PNG plot goes next to it). Without it: this device's "
        "cached profiles (a quick grid per dtype, measured now where missing)."
    ),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32, bfloat16 or float16 (default: float32 with --out, else every dtype "
        "this device runs)."
    ),
    prefix: str = typer.Option(_csv(DEFAULT_PREFIXES), "--prefix", help="Prefix lengths (with --out)."),
    tokens: str = typer.Option(
        None, "--tokens", help=f"Token counts (with --out; default: {_csv(DEFAULT_TOKENS)}, capped by the context)."
    ),
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    threads: int = THREADS,
    offload: bool = typer.Option(False, "--offload", help="Offload what exceeds GPU memory to CPU (accelerate)."),
    draft: str = typer.Option(
        None, "--draft", help="Also profile this draft per tree level (with --out: early-exit:N or a draft model; "
        "without: any draft, its cost cached for this device)."
    ),
    widths: str = typer.Option(_csv(DEFAULT_WIDTHS), "--widths", help="Draft level widths (with --out)."),
    notes: str = typer.Option("", "--notes", help="Free text stored in the file (e.g. machine load)."),
) -> None:
    """Time one tree-attention forward pass per (prefix length, token count) and save it: to
    --out, or into this device's profile cache (what generate, optimize and bench use)."""
    if out is None:
        _run_cached(model, device, dtype, threads, draft)
        return
    from sequoia import profiler
    from sequoia.drafts import DraftSpec
    from sequoia.figures import profile_png, write_png
    from sequoia.models import load_model

    if out.suffix != ".json":
        raise ConfigError(f"--out must name a .json file, got {out}")
    dtype = dtype or "float32"
    prefixes = _ints(prefix, "--prefix")
    loaded = load_model(model, dtype=dtype, device=device, threads=threads, offload=offload, tokenizer=False)
    context = profiler.model_context(loaded.model)
    counts = _ints(tokens, "--tokens") if tokens else profiler.fit_tokens(DEFAULT_TOKENS, prefixes, context)
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


def _run_cached(model: str, device: str, dtype: str | None, threads: int | None, draft: str | None) -> None:
    """This device's profile of ``model`` in each dtype: cached, else measured now (quick grid)."""
    import time

    from sequoia import profile_cache as cache

    start = time.perf_counter()
    fp = cache.here(device, threads)
    dtypes = [dtype] if dtype else list(fp.get("dtypes") or ["float32"])
    name = cache.model_name(model)
    console.print(f"this device: {devices.describe(fp)} (key {devices.fingerprint_key(fp)})", highlight=False)
    found = {d: cache.read_cached(fp, name, d) for d in dtypes}
    missing = [d for d, hit in found.items() if hit is None]
    targets = None
    if missing or draft:
        targets = cache.Targets(model, device, threads, tokenizer=False)
        _warn_if_busy(_load_average())
    with progress_bar("measuring this device") as report:
        for d in missing:
            found[d] = cache.measure_and_cache(targets.get(d), d, report)
        costs = {}
        if draft:
            from sequoia.draft_costs import device_draft_costs
            from sequoia.drafts import DraftSpec

            costs = device_draft_costs(DraftSpec.resolve(draft, model), model, dtypes, device, targets, report)
    for d, hit in found.items():
        how = f"measured now in {hit.seconds:.0f} s" if hit.measured else "cached"
        console.print(f"{d}: {how}: {hit.path}", highlight=False, soft_wrap=True)
    for d, c in costs.items():
        shown = ", ".join(f"{w}: {ms:.2f}" for w, ms in sorted(c.level_ms.items()) if w != STEP_KEY) or "free"
        step = f"; per step {c.level_ms[STEP_KEY]:+.2f}" if STEP_KEY in c.level_ms else ""
        console.print(f"draft {draft} per tree level in {c.dtype or d} ({c.source}), ms by width: {shown}{step}",
                      highlight=False, soft_wrap=True)
    _print_side_by_side({d: hit.profile for d, hit in found.items()})
    console.print(f"cache: {cache.cache_dir() / 'profiles'}"
                  + (f"; measured {', '.join(missing)} in {time.perf_counter() - start:.0f} s" if missing else ""),
                  highlight=False, soft_wrap=True)


def _load_average() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0


@app.command()
@handles_errors
def show(
    path: Path = typer.Argument(..., help="A sequoia-profile/1 JSON file."),
    device: str = DEVICE,
    threads: int = THREADS,
) -> None:
    """The device it was measured on (fingerprint; whether it is this one), median latency (IQR)
    per token count and prefix length, and the knee of each curve."""
    from sequoia.profile_cache import here

    result = Profile.load(path)
    _print_profile(result)
    fp = result.fingerprint
    console.print(f"measured on: {devices.describe(fp) if 'version' in fp else 'no fingerprint recorded'}",
                  highlight=False, soft_wrap=True)
    diffs = devices.mismatches(fp, here(device, threads))
    console.print("for this device: " + ("yes" if not diffs else "no (" + "; ".join(diffs) + ")"),
                  highlight=False, soft_wrap=True)


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
    from sequoia import profiler
    from sequoia.models import load_model

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


def _print_side_by_side(profiles: dict[str, Profile]) -> None:
    """Median ms per token count at the smallest prefix, one column per dtype, and the knee."""
    prefix = min(p.target.prefix_lengths[0] for p in profiles.values())
    table = Table("tokens", *(f"{d} ms" for d in profiles), title=f"this device, prefix {prefix}: median ms")
    counts = sorted({n for p in profiles.values() for n in p.target.tokens})
    for n in counts:
        table.add_row(str(n), *(f"{p.latency(n, prefix):.1f}" if n <= p.target.tokens[-1] else ""
                                for p in profiles.values()))
    table.add_row("knee", *(str(p.knee(prefix)) for p in profiles.values()))
    console.print(table)


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
