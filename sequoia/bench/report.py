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
        f"# Sequoia bench — {cfg['target']} with draft `{cfg['draft']}`"
        + "".join(f" and `{name}`" for name in cfg.get("compare") or ()),
        "",
        f"{report['date']} · {report['machine']['processor']} · torch {report['machine']['torch']} · "
        f"{report['machine']['threads']} threads · {len(report['prompts'])} prompts × {cfg['max_new_tokens']} "
        f"new tokens · engine dtype {cfg['engine_dtype'] or 'the plan’s'} · medians over prompts (min–max)"
        + (" · load average {before} → {after}".format(**report["machine"]["load_average"])
           if report["machine"].get("load_average") else ""),
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
        plan = f"plan: {opt['dtype']}, " if opt.get("dtype") else "optimizer: "
        lines += ["", f"## {sec['setting']}", "",
                  f"Acceptance p[1..4] = {vec} ({acc['samples']} positions){deeper}; {plan}"
                  f"{opt['size']} nodes, depth {opt['depth']}, predicted {opt['predicted_tokens_per_step']:.2f} "
                  f"tokens/step, {opt['predicted_speedup']:.2f}x"
                  + (f" over plain {opt['plain_dtype']}" if opt.get("plain_dtype") else ""),
                  *([f"\n{opt['reason']}"] if opt.get("reason") else []),
                  *(f"\n{line}" for line in plan_lines(sec)), "",
                  "| method | tokens/s | speed-up | tokens/step | predicted | ms/token | predicted ms/token |",
                  "|---|---|---|---|---|---|---|"]
        for row in sec["summary"]:
            pred, ms, pms = row["predicted_tokens_per_step"], row.get("ms_per_token"), row.get("predicted_ms_per_token")
            lines.append(
                f"| {row['method']} | {row['tokens_per_s']:.1f} ({row['tokens_per_s_min']:.1f}–"
                f"{row['tokens_per_s_max']:.1f}) | {row['speedup']:.2f}x | {row['tokens_per_step']:.2f} | "
                f"{'' if pred is None else f'{pred:.2f}'} | {'' if ms is None else f'{ms:.1f}'} | "
                f"{'' if pms is None else f'{pms:.1f}'} |"
            )
        agreement = agreement_lines(sec["greedy_agreement"])
        if agreement:
            lines += ["", *(line + "  " for line in agreement)]
    return "\n".join(lines) + "\n"


def plan_lines(section: dict[str, Any]) -> list[str]:
    """The re-plans of the Sequoia row, then each compared draft's plan and re-plans."""
    lines = [f"Re-plan: {event}" for event in section["optimizer"].get("replans") or []]
    for other in section.get("compared", ()):
        opt, acc = other["optimizer"], other["acceptance"]
        lines.append(f"`{other['draft']}`: acceptance p[1] = {acc['vector'][0]:.3f} ({acc['samples']} positions); "
                     f"plan {opt['dtype']}, {opt['size']} nodes, depth {opt['depth']}, predicted "
                     f"{opt['predicted_tokens_per_step']:.2f} tokens/step, {opt['predicted_speedup']:.2f}x")
        lines += [f"Re-plan (`{other['draft']}`): {event}" for event in opt.get("replans") or []]
    return lines


def agreement_lines(agreement: dict[str, Any] | None) -> list[str]:
    """The greedy check in words. Every lossless method must reproduce plain ``generate`` in its
    own dtype token for token; in float32 it does, and a float32 difference is reported as the
    bug it would be. In bfloat16 the engine's tree-mask attention and any pass over several
    tokens round differently from ``generate``'s one-token passes, so where two tokens are
    nearly tied a method -- ours and HF's prompt lookup alike -- can take the other one: those
    rows are listed with the first diverging token of each prompt, not as failures."""
    if agreement is None:
        return []
    same = [k for k, v in agreement.items() if v["identical"]]
    differ = {k: v for k, v in agreement.items() if not v["identical"]}
    lines = ["Greedy outputs identical to plain `generate` in the same dtype: "
             + ("all methods, every prompt." if not differ else (", ".join(same) or "none") + ".")]
    by_dtype: dict[str, list[str]] = {}
    for name, v in differ.items():
        first = ", ".join(f"prompt {p} @ token {t}" for p, t in zip(v["mismatched_prompts"], v["first_difference_at"]))
        by_dtype.setdefault(v["reference"].split()[-1], []).append(f"{name.split(' (')[0]}: {first}")
    for dtype, rows in by_dtype.items():
        if dtype == "float32":
            lines.append(f"DIFFERENT from generate float32 (float32 decoding must be exact: a bug): {'; '.join(rows)}")
        else:
            lines.append(f"First divergence from generate {dtype}: {'; '.join(rows)} -- {dtype} rounds tree-masked "
                         "and multi-token passes differently from one-token passes, so a near-tie can go the "
                         "other way (HF prompt lookup too); lossless means the target's output in the dtype "
                         "it runs in, and float32 stays exact.")
    return lines


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
        ax.barh(names[::-1], speed[::-1], color=["tab:green" if n.startswith("sequoia") else "tab:blue" for n in names[::-1]])
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
