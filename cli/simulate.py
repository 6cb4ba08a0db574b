"""``sequoia simulate``: predict decoding speed before running it (non-SI vs SI vs DSI)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import typer
from rich.table import Table

from sequoia.acceptance import AcceptanceResult
from sequoia.dsi.simulator import DEFAULT_SAMPLES, DEFAULT_SP_DEGREE, DSIConfig, SimResult, grid, simulate
from sequoia.dsi.check import CHECK_PROMPTS, CheckResult, check
from sequoia.dsi.paper import PaperComparison, compare, paper_markdown
from sequoia.errors import ConfigError, FileFormatError
from sequoia.models import tiny_llama
from sequoia.profile import Profile
from sequoia.figures import dsi_heatmap_png, write_png
from sequoia.files import write_atomic, write_json_atomic
from sequoia_cli.common import console, handles_errors

app = typer.Typer(help="Simulate decoding algorithms before running them.", no_args_is_help=True)


def _point_inputs(
    target_latency: float | None,
    drafter_latency: float | None,
    acceptance: float | None,
    profile: Path | None,
    drafter_profile: Path | None,
    acceptance_file: Path | None,
    prefix_length: int,
) -> tuple[float, float, float] | None:
    """(target ms, drafter ms, acceptance) from numbers or files; None if none was given."""
    given = {
        "target latency (--target-latency or --profile)": (target_latency, profile),
        "drafter latency (--drafter-latency, --drafter-profile or a profile with a draft section)":
            (drafter_latency, drafter_profile),
        "acceptance (--acceptance or --acceptance-file)": (acceptance, acceptance_file),
    }
    for what, (number, path) in given.items():
        if number is not None and path is not None:
            raise ConfigError(f"give the {what.split(' (')[0]} once: a number or a file, not both")
    if all(n is None and p is None for n, p in given.values()):
        return None
    target_profile = Profile.load(profile) if profile else None
    if target_latency is None and target_profile:
        target_latency = target_profile.latency(1, prefix_length)
    if drafter_latency is None and drafter_profile:
        drafter_latency = Profile.load(drafter_profile).latency(1, prefix_length)
    elif drafter_latency is None and target_profile and target_profile.draft:
        drafter_latency = target_profile.draft_latency(1, prefix_length)
    if acceptance is None and acceptance_file:
        acceptance = AcceptanceResult.load(acceptance_file).vector[0]  # p[1]: chain acceptance
    values = dict(zip(given, (target_latency, drafter_latency, acceptance)))
    missing = [what for what, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"missing {'; '.join(missing)}")
    return target_latency, drafter_latency, acceptance


def _point_table(r: SimResult) -> Table:
    c = r.config
    table = Table(title=f"Latency per generated token (ms), {r.si_tokens_per_step.mean:.2f} "
                  "tokens per SI step", title_justify="left")
    for col in ("algorithm", "ms/token", "± s.e.", "tokens/s", "vs non-SI", "vs SI"):
        table.add_column(col, justify="right")
    rows = (
        ("non-SI", r.non_si, 0.0),
        (f"SI (lookahead {c.lookahead})", r.si.mean, r.si.stderr),
        (f"DSI (lookahead {c.lookahead}, SP {c.sp_degree})", r.dsi.mean, r.dsi.stderr),
    )
    for name, ms, se in rows:
        table.add_row(name, f"{ms:.3f}", f"{se:.3f}", f"{1000 / ms:.1f}",
                      f"{r.non_si / ms:.2f}x", f"{r.si.mean / ms:.2f}x")
    return table


def _paper_rich(rows: list[PaperComparison]) -> Table:
    table = Table(title="Paper settings: DSI vs SI (simulated vs reported)", title_justify="left")
    for col in ("target / drafter", "dataset", "drafter %", "acceptance", "ours",
                "paper protocol", "thread-pool accounting", "paper"):
        table.add_column(col, justify="right")
    for row in rows:
        s = row.setting
        table.add_row(f"{s.target} / {s.drafter}", s.dataset, f"{s.reported_drafter_percent:.1f}",
                      f"{s.acceptance:.2f}", f"{row.ours.speedup:.2f}x", f"{row.paper.speedup:.2f}x",
                      f"{row.threadpool.speedup:.2f}x", f"{s.reported_speedup:.2f}x")
    return table




@app.command("dsi")
@handles_errors
def dsi(
    target_latency: float | None = typer.Option(None, "--target-latency", help="Target ms per forward."),
    drafter_latency: float | None = typer.Option(None, "--drafter-latency", help="Drafter ms per token."),
    acceptance: float | None = typer.Option(None, "--acceptance", help="Per-token acceptance rate in [0, 1]."),
    profile: Path | None = typer.Option(
        None, "--profile", help="Target profile (sequoia-profile/1): its 1-token median latency; its "
        "draft section, if any, gives the drafter latency."),
    drafter_profile: Path | None = typer.Option(None, "--drafter-profile", help="Profile of the drafter."),
    prefix_length: int = typer.Option(512, "--prefix-length", help="Context length latencies are read at."),
    acceptance_file: Path | None = typer.Option(
        None, "--acceptance-file", help="sequoia-acceptance/1 file; its p[1] is the per-token rate."),
    lookahead: int = typer.Option(5, "--lookahead", help="Drafts per verification."),
    sp_degree: int = typer.Option(DEFAULT_SP_DEGREE, "--sp-degree", help="Target instances running at once."),
    samples: int = typer.Option(DEFAULT_SAMPLES, "--samples", help="Monte Carlo samples per setting."),
    seed: int = typer.Option(0, "--seed", help="Monte Carlo seed."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result of the setting above."),
    heatmap: Path | None = typer.Option(
        None, "--heatmap", help="Write the drafter-latency x acceptance heatmap (PNG, data next to it "
        "as .json)."),
    paper_table: Path | None = typer.Option(
        None, "--paper-table", help="Write the paper-settings table (Markdown, data next to it as .json)."),
    max_lookahead: int = typer.Option(10, "--max-lookahead", help="Heatmap: best lookahead in 1..N."),
) -> None:
    """Expected latency per token of non-SI, SI and DSI, by event-driven Monte Carlo simulation."""
    inputs = _point_inputs(target_latency, drafter_latency, acceptance, profile, drafter_profile,
                           acceptance_file, prefix_length)
    if inputs is None and heatmap is None and paper_table is None:
        raise ConfigError("nothing to simulate: give latencies and acceptance, --heatmap or --paper-table")
    if max_lookahead < 1:
        raise ConfigError(f"--max-lookahead must be >= 1, got {max_lookahead}")
    if json_out is not None and inputs is None:
        raise ConfigError("--json writes the result of one setting: give latencies and acceptance")
    point = simulate(DSIConfig(*inputs, lookahead, sp_degree), samples, seed) if inputs else None
    surface = grid(lookaheads=range(1, max_lookahead + 1), sp_degree=sp_degree, seed=seed) if heatmap else None
    rows = compare(sp_degree=sp_degree, samples=samples, seed=seed) if paper_table else None
    writes: list[tuple[Path, Callable[[], None]]] = []  # all rendered before anything is written
    if point is not None:
        console.print(_point_table(point))
        if json_out is not None:
            writes.append((json_out, lambda: write_json_atomic(json_out, point.to_json())))
    if surface is not None:
        png = dsi_heatmap_png(surface)
        data = heatmap.with_suffix(".json")
        writes.append((heatmap, lambda: write_png(heatmap, png)))
        writes.append((data, lambda: write_json_atomic(data, surface.to_json())))
        vs_si, vs_best = surface.si / surface.dsi, np.minimum(surface.si, 1.0) / surface.dsi
        console.print(f"heatmap: SI slower than non-SI at {int((surface.si > 1.0).sum())}/"
                      f"{surface.si.size} points; DSI vs SI {vs_si.min():.2f}-{vs_si.max():.2f}x, "
                      f"vs the faster of both {vs_best.min():.2f}-{vs_best.max():.2f}x -> {heatmap}")
    if rows is not None:
        console.print(_paper_rich(rows))
        text = paper_markdown(rows, samples, seed)
        table_data = paper_table.with_suffix(".json")
        writes.append((paper_table, lambda: write_atomic(paper_table, lambda tmp: tmp.write_text(text))))
        writes.append((table_data, lambda: write_json_atomic(table_data, [r.to_json() for r in rows])))
    for path, write in writes:
        try:
            write()
        except OSError as exc:
            raise FileFormatError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_table(r: CheckResult, lookahead: int, sp_degree: int) -> Table:
    table = Table(title=f"Orchestrator on latency-injected tiny models: target {r.target_ms:.1f} ms, "
                  f"drafter {r.drafter_ms:.1f} ms per forward (medians during the DSI runs), "
                  f"acceptance {r.acceptance:.2f} realised", title_justify="left")
    for col in ("", "non-SI ms/token", f"DSI (k {lookahead}, SP {sp_degree}) ms/token", "speed-up"):
        table.add_column(col, justify="right")
    sim = r.simulated
    table.add_row("measured", f"{r.non_si_ms:.2f}", f"{r.dsi_ms:.2f}", f"{r.non_si_ms / r.dsi_ms:.2f}x")
    table.add_row("simulated", f"{sim.non_si:.2f}", f"{sim.dsi.mean:.2f}", f"{sim.dsi_speedup_vs_non_si:.2f}x")
    return table


@app.command("check-dsi")
@handles_errors
def check_dsi(
    target_delay_ms: float = typer.Option(20.0, "--target-delay-ms", help="Sleep added to each target forward."),
    drafter_delay_ms: float = typer.Option(4.0, "--drafter-delay-ms", help="Sleep added to each draft."),
    acceptance: float = typer.Option(0.8, "--acceptance", help="Chance that a draft is the target's token."),
    lookahead: int = typer.Option(3, "--lookahead", help="Drafts per verification."),
    sp_degree: int = typer.Option(4, "--sp-degree", help="Target workers (threads)."),
    tokens: int = typer.Option(64, "--tokens", help="New tokens per prompt."),
    threads: int = typer.Option(1, "--threads", help="torch intra-op threads (process-wide)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the measurement."),
) -> None:
    """Run the real DSI orchestrator on tiny models whose forwards wait like GPU forwards, and
    compare its wall time per token with non-SI and with the simulator."""
    if min(target_delay_ms, drafter_delay_ms) < 0:
        raise ConfigError("delays must be >= 0 ms")
    if tokens < 1 or threads < 1:
        raise ConfigError(f"--tokens and --threads must be >= 1, got {tokens} and {threads}")
    torch.set_num_threads(threads)  # tiny forwards: more threads only contend on a small CPU
    result = check(tiny_llama(seed=0), CHECK_PROMPTS, tokens, target_delay_ms, drafter_delay_ms,
                   acceptance, lookahead, sp_degree)
    console.print(_check_table(result, lookahead, sp_degree))
    console.print("lossless: DSI output == target greedy output" if result.lossless
                  else "[bold red]DSI output differs from the target's greedy output[/]")
    if json_out is not None:
        try:
            write_json_atomic(json_out, result.to_json())
        except OSError as exc:
            raise FileFormatError(f"cannot write {json_out}: {exc.strerror or exc}") from None
