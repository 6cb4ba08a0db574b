"""The figures the tool draws (matplotlib, headless), as PNG bytes written atomically.

Each function takes the library's own objects (a :class:`~sequoia.profile.Profile`, scaling
curves, a DSI grid) and returns the PNG's bytes, so reports are built here and the CLI only
says where they go.
"""

from __future__ import annotations

import io
import os
import textwrap

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from sequoia.dsi.simulator import Grid
from sequoia.files import write_atomic
from sequoia.profile import Profile


def write_png(path: str | os.PathLike, png: bytes) -> None:
    """Write PNG bytes atomically (no partial file on failure)."""
    write_atomic(path, lambda tmp: tmp.write_bytes(png))


def _png(figure: Figure, **savefig) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig)
    return buffer.getvalue()


def profile_png(profile: Profile) -> bytes:
    """Latency vs token count, one line (median, IQR band) per prefix length, and the draft's
    cost per tree level where the profile has it."""
    grids = [("target", profile.target)] + ([("draft per level", profile.draft)] if profile.draft else [])
    figure = Figure(figsize=(6.5 * len(grids), 4.5))
    axes = figure.subplots(1, len(grids), squeeze=False)[0]
    for ax, (label, grid) in zip(axes, grids):
        for p, prefix_len in enumerate(grid.prefix_lengths):
            ax.plot(grid.tokens, grid.median[p], marker=".", label=f"prefix {prefix_len}")
            ax.fill_between(grid.tokens, grid.stats["p25"][p], grid.stats["p75"][p], alpha=0.25)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("new tokens per forward pass" if label == "target" else "tree level width")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{label}: {grid.model}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("\n".join(textwrap.wrap(profile.describe(), 100)), fontsize=9)
    figure.tight_layout()
    return _png(figure, dpi=110)


def scaling_png(curves: dict[str, np.ndarray], p: np.ndarray, max_depth: int) -> bytes:
    """Expected tokens per step vs tree size, one line per tree shape."""
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    sizes = np.arange(1, len(curves["sequoia"]) + 1)
    for name, values in curves.items():
        axes.plot(sizes, values, label=name, linewidth=2 if name == "sequoia" else 1.2)
    axes.set(xscale="log", xlabel="tree size (tokens verified per step)", ylabel="expected tokens per step",
             title=f"p = {', '.join(f'{x:.2f}' for x in p[:4])}{', ...' if p.size > 4 else ''}; depth <= {max_depth}")
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure, bbox_inches="tight")


def dsi_heatmap_png(g: Grid) -> bytes:
    """Three speed-up panels over drafter latency x acceptance, log colour scales centred on
    1 (red: slower, blue: faster), the 1.0 line drawn where a panel crosses it."""
    panels = (
        ("SI vs non-SI (red: SI is slower)", 1.0 / g.si),
        ("DSI vs SI", g.si / g.dsi),
        ("DSI vs the faster of SI and non-SI", np.minimum(g.si, 1.0) / g.dsi),
    )
    x, y = np.asarray(g.drafter_fractions), np.asarray(g.acceptances)
    figure = Figure(figsize=(16, 4.6), constrained_layout=True)
    for ax, (title, speedup) in zip(figure.subplots(1, 3), panels):
        extreme = max(speedup.max(), 1.0 / speedup.min(), 1.05)
        norm = LogNorm(vmin=1.0 / extreme, vmax=extreme)
        mesh = ax.pcolormesh(x, y, speedup, cmap="RdBu", norm=norm, shading="nearest")
        if speedup.min() < 1.0 < speedup.max():
            ax.contour(x, y, speedup, levels=[1.0], colors="black", linewidths=1.2)
        ax.set(title=f"{title}: {speedup.min():.2f}-{speedup.max():.2f}x",
               xlabel="drafter latency / target latency", ylabel="acceptance rate")
        bar = figure.colorbar(mesh, ax=ax, label="speed-up (log scale)")
        ticks = np.geomspace(1.0 / extreme, extreme, 5)
        bar.set_ticks(ticks, labels=[f"{t:.2f}x" for t in ticks], minor=False)
        bar.ax.minorticks_off()
    figure.suptitle(f"Simulated speed-ups, SP degree {g.sp_degree}, best lookahead in "
                    f"{min(g.lookaheads)}..{max(g.lookaheads)} per algorithm")
    return _png(figure, dpi=110)


def calibration_png(reliability: dict[str, list[dict]]) -> bytes:
    """Predicted vs measured acceptance per confidence bin (:func:`sequoia.calibration.reliability`),
    one line per run, the diagonal for reference; marker area grows with the bin's slots."""
    figure = Figure(figsize=(6.5, 5.5))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for label, rows in reliability.items():
        x = [r["predicted"] for r in rows]
        y = [r["measured"] for r in rows]
        size = [10 + 90 * np.sqrt(r["slots"] / max(max(q["slots"] for q in rows), 1)) for r in rows]
        line = ax.plot(x, y, linewidth=1, label=label)[0]
        ax.scatter(x, y, s=size, color=line.get_color(), alpha=0.7)
    ax.set_xlabel("predicted acceptance of a slot (calibrated draft confidence)")
    ax.set_ylabel("measured acceptance (held-out prompts)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("per-step trees: calibration on held-out prompts", fontsize=10)
    figure.tight_layout()
    return _png(figure, dpi=110)


def training_curve_png(runs: dict[str, tuple[float, list[dict]]], levels: tuple[int, ...] = (1, 4, 8)) -> bytes:
    """Held-out top-1 agreement against training minutes, one panel per tree level in
    ``levels``: each run is ``(minutes its draft had trained before, its card's training
    curve)`` -- a fine-tuned draft's curve continues its starting draft's time."""
    figure = Figure(figsize=(4.2 * len(levels), 4))
    axes = figure.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels):
        values = []
        for label, (offset, curve) in runs.items():
            points = [(offset + c["minutes"], 100 * c["top1"][level - 1]) for c in curve if len(c["top1"]) >= level]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker=".", label=label)
                values += y
        if values:  # at least 10 points tall: a held-out top-1 moves by about one point from noise alone
            middle, half = (min(values) + max(values)) / 2, max(5.0, (max(values) - min(values)) / 2 + 1.0)
            ax.set_ylim(middle - half, middle + half)
        ax.set_xlabel("training minutes (2-core CPU)")
        ax.set_ylabel(f"held-out top-1 at level {level} (%)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("draft agreement with the target against training time (built-in prompts, held out)", fontsize=10)
    figure.tight_layout()
    return _png(figure, dpi=110)
