"""The bench report on disk: one ``sequoia-bench/1`` JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sequoia.files import write_atomic, write_json_atomic

def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table per sampling setting, then the agreement check."""
    cfg = report["config"]
    lines = [
        f"# Sequoia bench — {cfg['target']} with draft `{cfg['draft']}`",
        "",
        f"{report['date']} · {report['machine']['processor']} · torch {report['machine']['torch']} · "
        f"{report['machine']['threads']} threads · {len(report['prompts'])} prompts × {cfg['max_new_tokens']} "
        f"new tokens · engine dtype {cfg['engine_dtype']} · medians over prompts (min–max)",
        *(f"\nNote: {note}" for note in report.get("notes", [])),
    ]
    for sec in report["sections"]:
        opt = sec["optimizer"]
        acc = sec["acceptance"]
        vec = ", ".join(f"{x:.3f}" for x in acc["vector"][:4])
        deeper = "".join(
            f"; depth {k}: p[1] = {row[0]:.3f} ({n} positions)"
            for k, (row, n) in enumerate(zip(acc.get("by_depth", [])[1:], acc.get("depth_samples", [])[1:]), start=2)
        )
        lines += ["", f"## {sec['setting']}", "",
                  f"Acceptance p[1..4] = {vec} ({acc['samples']} positions){deeper}; optimizer: "
                  f"{opt['size']} nodes, depth {opt['depth']}, predicted {opt['predicted_tokens_per_step']:.2f} "
                  f"tokens/step, {opt['predicted_speedup']:.2f}x", "",
                  "| method | tokens/s | speed-up | tokens/step | predicted |", "|---|---|---|---|---|"]
        for row in sec["summary"]:
            pred = row["predicted_tokens_per_step"]
            lines.append(
                f"| {row['method']} | {row['tokens_per_s']:.1f} ({row['tokens_per_s_min']:.1f}–"
                f"{row['tokens_per_s_max']:.1f}) | {row['speedup']:.2f}x | {row['tokens_per_step']:.2f} | "
                f"{'' if pred is None else f'{pred:.2f}'} |"
            )
        if sec["greedy_agreement"] is not None:
            bad = {k: v for k, v in sec["greedy_agreement"].items() if not v["identical"]}
            lines += ["", "Greedy outputs identical to plain `generate` in the same dtype: "
                      + ("all methods, every prompt." if not bad else
                         "; ".join(f"{k}: prompts {v['mismatched_prompts']} differ from token "
                                   f"{v['first_difference_at']}" for k, v in bad.items()))]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Bar chart of speed-up per method, one panel per sampling setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = report["sections"]
    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 4.5), squeeze=False)
    for ax, sec in zip(axes[0], sections):
        names = [r["method"].split(" (")[0] for r in sec["summary"]]
        speed = [r["speedup"] for r in sec["summary"]]
        ax.barh(names[::-1], speed[::-1], color=["tab:green" if n == "sequoia" else "tab:blue" for n in names[::-1]])
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(sec["setting"])
        ax.set_xlabel("speed-up over fastest plain generate")
    fig.suptitle(f"{report['config']['target']} + {report['config']['draft']} on {report['machine']['processor']}")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report(report: dict[str, Any], stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.json``, ``stem.md`` and ``stem.png``, each atomically."""
    stem = Path(stem)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    write_json_atomic(paths[0], report)
    write_atomic(paths[1], lambda tmp: Path(tmp).write_text(markdown(report)))
    plot(report, paths[2])
    return paths
