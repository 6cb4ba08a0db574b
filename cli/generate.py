"""``sequoia generate``: decode one prompt with tree speculation, streaming the text."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.table import Table

from sequoia.drafts import DraftSpec
from sequoia.engine import VERIFIERS, Engine
from sequoia.models import eos_token_ids
from sequoia.errors import ConfigError, FileFormatError
from sequoia.models import DEFAULT_MODEL, load_model
from sequoia.prompts import render_prompt
from sequoia.sampling import SamplingConfig
from sequoia.planning import plan_tree
from sequoia.tree import Tree
from sequoia_cli.common import DRAFT_HELP, console, err_console, handles_errors

@handles_errors
def generate(
    prompt: str | None = typer.Option(None, "--prompt", help="The prompt text."),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="Alias, .gguf file, model directory or hub id."),
    draft: str | None = typer.Option(None, "--draft", help=DRAFT_HELP),
    tree_file: Path | None = typer.Option(None, "--tree", help="Tree file (sequoia-tree/1 JSON or growmap .pt)."),
    budget: int | None = typer.Option(None, "--budget", help="Tree size for the solver (with --acceptance)."),
    max_depth: int | None = typer.Option(None, "--max-depth", help="Tree depth limit for the solver."),
    acceptance: Path | None = typer.Option(None, "--acceptance", help="sequoia-acceptance/1 file for the solver."),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Apply the target's chat template."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Stop after this many new tokens."),
    mode: str | None = typer.Option(
        None, "--mode", help="greedy or stochastic (default: stochastic iff --temperature > 0)."
    ),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus threshold in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    verifier: str = typer.Option("sequoia", "--verifier", help="Stochastic verification: sequoia or specinfer."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling generator."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: all)."),
) -> None:
    """Generate text with the target, speculating with a draft on a token tree (lossless)."""
    sampling = _sampling(mode, temperature, top_p, top_k)
    text = _prompt_text(prompt, prompt_file)
    draft = DraftSpec.resolve(draft, target)
    tree = plan_tree(draft, tree_file, budget, max_depth, acceptance)
    if verifier not in VERIFIERS:
        raise ConfigError(f"--verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
    with console.status(f"loading {target}" + ("" if draft.kind in ("none", "ngram") else f" and {draft}")):
        loaded = load_model(target, dtype=dtype, device=device, threads=threads)
        proposer = draft.proposer(loaded, dtype=dtype, device=device)
        proposer.warmup()
    ids = torch.tensor(render_prompt(loaded.tokenizer, text, chat), dtype=torch.long)
    engine = Engine(
        loaded.model, proposer, tree, sampling, verifier=verifier, seed=seed,
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
    )
    start = time.perf_counter()
    engine.start(ids, max_new_tokens)
    prefill = time.perf_counter() - start
    shown = ""
    while engine.stop is None:
        engine.step()
        decoded = loaded.tokenizer.decode(engine.tokens, skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):  # hold back a character whose bytes are incomplete
            typer.echo(decoded[len(shown):], nl=False)
            shown = decoded
    typer.echo("")
    _summary(engine, tree, prefill)


def _sampling(mode: str | None, temperature: float | None, top_p: float, top_k: int) -> SamplingConfig:
    """``--mode greedy`` or temperature 0 decode greedily; stochastic defaults to temperature 1."""
    if mode not in (None, "greedy", "stochastic"):
        raise ConfigError(f"--mode must be greedy or stochastic, got {mode!r}")
    if temperature is not None and not temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if mode is None:
        mode = "stochastic" if temperature else "greedy"
    chosen = 0.0 if mode == "greedy" else (1.0 if temperature is None else temperature)
    return SamplingConfig(chosen, top_p, top_k)


def _prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt and --prompt-file")
    if prompt_file is None:
        return prompt
    if not prompt_file.is_file():
        raise FileFormatError(f"prompt file not found: {prompt_file}")
    return prompt_file.read_text(errors="replace")


def _summary(engine: Engine, tree: Tree, prefill: float) -> None:
    stats, parts = engine.stats, engine.timer.breakdown()
    seconds = parts["step"]
    err_console.print(
        f"{stats.emitted} tokens in {seconds:.2f} s: [bold]{stats.emitted / max(seconds, 1e-9):.1f} tokens/s[/] "
        f"(prefill {prefill * 1e3:.0f} ms); {stats.steps} steps, tree of {tree.size} nodes, depth {tree.depth}; "
        f"mean accepted {stats.mean_accepted:.2f} + 1 = {stats.tokens_per_step:.2f} tokens/step",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(title="time per step", title_justify="left")
    for col in ("part", "ms/step", "share"):
        table.add_column(col, justify="right" if col != "part" else "left")
    for name in ("draft", "target", "verify", "cache", "other"):
        table.add_row(name, f"{parts[name] / stats.steps * 1e3:.2f}", f"{parts[name] / max(seconds, 1e-9):.1%}")
    err_console.print(table)
