"""``sequoia bench``: every decoding method side by side; writes JSON, Markdown and a plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sequoia.bench.runner import BenchConfig, benchmark, load_settings
from sequoia.bench.report import agreement_lines, plan_lines, write_report
from sequoia.models import DEFAULT_MODEL
from sequoia_cli.common import DRAFT_HELP, console, handles_errors, progress_bar


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return [float("nan")]


@handles_errors
def bench(
    profile: list[Path] = typer.Option(
        [], "--profile", help="Target profile(s), one per dtype (default: this device's, cached or measured now)."
    ),
    foreign_profile: bool = typer.Option(False, "--foreign-profile", help="Accept a --profile of another device."),
    out: Path = typer.Option(Path("results/bench"), "--out", help="Result stem: writes STEM.json/.md/.png."),
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="Alias, .gguf file, model directory or hub id."),
    draft: str | None = typer.Option(None, "--draft", help=DRAFT_HELP),
    compare: list[str] = typer.Option(
        [], "--compare", help="Another draft (repeatable): one more Sequoia row, its tree planned for it alike."
    ),
    draft_profile: Path | None = typer.Option(None, "--draft-profile", help="Profile of the draft per level."),
    assistant: str | None = typer.Option(
        None, "--assistant", help="Causal-LM draft for HF assisted generation when --draft is not one (e.g. early-exit:8)."
    ),
    prompts: str = typer.Option("builtin", "--prompts", help="'builtin' or a JSONL / JSON / text file."),
    limit: int | None = typer.Option(6, "--limit", help="Use only the first N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens generated per prompt."),
    temperatures: str = typer.Option("0,0.6,1.0", "--temperatures", help="Settings to run; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus threshold for the sampled settings."),
    dtypes: str = typer.Option("float32,bfloat16", "--dtypes", help="dtypes of the plain generate baselines."),
    engine_dtype: str | None = typer.Option(
        None, "--engine-dtype", help="Target dtype of the engine and peers (default: the plan's, per setting)."
    ),
    max_depth: int = typer.Option(12, "--max-depth", help="Deepest tree the optimizer considers."),
    tree: Path | None = typer.Option(None, "--tree", help="Use this tree instead of the optimizer's."),
    replan: bool = typer.Option(True, "--replan/--no-replan", help="The Sequoia row re-plans as generate does."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Apply the target's chat template."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling generators."),
) -> None:
    """Benchmark plain generate, assisted generation, prompt lookup and tree decoding, with the
    dtype and tree this device's plan picks."""
    config = BenchConfig(
        profile=tuple(str(p) for p in profile), target=target, draft=draft, compare=tuple(compare),
        draft_profile=str(draft_profile) if draft_profile else None, assistant=assistant,
        dtypes=tuple(d.strip() for d in dtypes.split(",") if d.strip()), engine_dtype=engine_dtype,
        device=device, threads=threads, prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, chat=chat,
        temperatures=load_settings(_floats(temperatures)), top_p=top_p, max_depth=max_depth,
        tree=str(tree) if tree else None, foreign_profile=foreign_profile, replan=replan, seed=seed,
    )
    with progress_bar("loading models, measuring acceptance") as update:
        report = benchmark(config, update)
    paths = write_report(report, out)
    console.print(f"machine: {report['machine']['processor']}", highlight=False, soft_wrap=True)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for sec in report["sections"]:
        opt = sec["optimizer"]
        table = Table(title=f"{sec['setting']}: plan {opt['dtype']}, {opt['size']} nodes, depth {opt['depth']}, "
                            f"predicted {opt['predicted_speedup']:.2f}x", title_justify="left")
        for col in ("method", "tok/s", "speed-up", "tok/step", "pred.", "ms/tok", "pred. ms/tok"):
            table.add_column(col, justify="right" if col != "method" else "left")
        for row in sec["summary"]:
            pred, ms, pms = row["predicted_tokens_per_step"], row.get("ms_per_token"), row.get("predicted_ms_per_token")
            table.add_row(row["method"], f"{row['tokens_per_s']:.1f}", f"{row['speedup']:.2f}x",
                          f"{row['tokens_per_step']:.2f}", "" if pred is None else f"{pred:.2f}",
                          "" if ms is None else f"{ms:.1f}", "" if pms is None else f"{pms:.1f}")
        console.print(table)
        for line in plan_lines(sec):
            console.print(line, highlight=False, soft_wrap=True)
        for line in agreement_lines(sec["greedy_agreement"]):
            console.print(line, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in paths))
