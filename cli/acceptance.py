"""``sequoia acceptance``: measure a (target, draft) pair's positional acceptance vector (per depth on request)."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from sequoia.acceptance import AcceptanceResult, measure_counts_by_depth
from sequoia.drafts import DraftSpec
from sequoia.models import eos_token_ids
from sequoia.errors import ConfigError
from sequoia.models import DEFAULT_MODEL, load_model
from sequoia.prompts import load_prompts, render_prompt
from sequoia.sampling import SamplingConfig
from sequoia_cli.common import DRAFT_HELP, console, handles_errors, progress_bar


@handles_errors
def acceptance(
    out: Path = typer.Option(..., "--out", help="Where to write the sequoia-acceptance/1 JSON."),
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="Alias, .gguf file, model directory or hub id."),
    draft: str | None = typer.Option(None, "--draft", help=DRAFT_HELP),
    prompts: str = typer.Option("builtin", "--prompts", help="'builtin' or a JSONL / JSON / text file."),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N prompts."),
    width: int = typer.Option(8, "--width", help="Candidates per node (length of the vector)."),
    depth: int = typer.Option(
        1, "--depth", help="Also measure depths 2..N (a spine tree): for drafts with one head per level."
    ),
    mode: str = typer.Option("greedy", "--mode", help="greedy or stochastic."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (stochastic mode)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold in (0, 1]."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens decoded per prompt."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Apply the target's chat template."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling generator."),
) -> None:
    """Measure how often the i-th draft candidate is the one the target accepts."""
    if width < 1 or depth < 1:
        raise ConfigError(f"--width and --depth must be at least 1, got {width} and {depth}")
    if mode not in ("greedy", "stochastic"):
        raise ConfigError(f"--mode must be greedy or stochastic, got {mode!r}")
    if mode == "stochastic" and temperature == 0:
        raise ConfigError("stochastic mode needs --temperature > 0 (temperature 0 is greedy)")
    sampling = SamplingConfig(0.0 if mode == "greedy" else temperature, top_p)
    prompt_set = load_prompts(prompts, limit)
    draft = DraftSpec.resolve(draft, target)
    with console.status(f"loading {target} and draft {draft}"):
        loaded = load_model(target, dtype=dtype, device=device)
        proposer = draft.proposer(loaded, dtype=dtype, device=device)
    ids = [torch.tensor(render_prompt(loaded.tokenizer, p.text, chat)) for p in prompt_set]
    with progress_bar("measuring acceptance") as update:
        counts, samples = measure_counts_by_depth(
            loaded.model, proposer, ids, width, sampling, depth, max_new_tokens,
            eos_token_ids(loaded.model, loaded.tokenizer), seed,
            progress=lambda done, total: update(done, total, "prompts"),
        )
    result = AcceptanceResult.from_depth_counts(
        counts, samples, target=loaded.name, draft=draft.name, mode=mode, temperature=sampling.temperature,
        top_p=top_p, prompts=f"{prompts} ({len(prompt_set)} prompts, {max_new_tokens} tokens each)",
    )
    result.save(out)
    table = Table(title=f"Acceptance of {draft} for {loaded.name} ({mode})", title_justify="left")
    for col in ("rank", "P(accepted)", "std. error", "cumulative"):
        table.add_column(col, justify="right")
    total = 0.0
    for i, (p, se) in enumerate(zip(result.vector, result.stderr), 1):
        total += p
        table.add_row(str(i), f"{p:.4f}", f"{se:.4f}", f"{total:.4f}")
    console.print(table)
    for k, (row, n) in enumerate(zip(result.by_depth[1:], result.depth_samples[1:]), start=2):
        console.print(f"depth {k}: first candidate {row[0]:.4f}, any {sum(row):.4f} ({n} positions)")
    dropped = len(result.depth_samples) - len(result.by_depth)
    if result.by_depth and dropped:
        console.print(f"[yellow]the {dropped} deepest depth(s) had too few positions to keep; the solver reuses the last row[/]")
    console.print(f"{result.samples} positions; wrote {out}")
