"""``sequoia generate``: decode one prompt with tree speculation, streaming the text."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.table import Table

from sequoia.drafts import DraftSpec
from sequoia.engine import VERIFIERS, Engine
from sequoia.errors import ConfigError, FileFormatError
from sequoia.models import eos_token_ids
from sequoia.planning import plan_for_sampling, plan_tree
from sequoia.profile_cache import Targets
from sequoia.prompts import render_prompt
from sequoia.sampling import SamplingConfig
from sequoia_cli.common import (
    ACCEPTANCE_OPTION, BUDGET_OPTION, DRAFT_OPTION, FOREIGN_PROFILE_OPTION, MAX_DEPTH_OPTION, PLAN_DTYPE_OPTION,
    PROFILE_OPTION, TARGET_OPTION, THREADS_OPTION, TREE_OPTION, VERIFIER_OPTION, console, err_console,
    handles_errors, progress_bar, warn,
)


@handles_errors
def generate(
    prompt: str | None = typer.Option(None, "--prompt", help="The prompt text."),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    target: str = TARGET_OPTION,
    draft: str | None = DRAFT_OPTION,
    tree_file: Path | None = TREE_OPTION,
    budget: int | None = BUDGET_OPTION,
    max_depth: int | None = MAX_DEPTH_OPTION,
    acceptance: Path | None = ACCEPTANCE_OPTION,
    profile: list[Path] = PROFILE_OPTION,
    foreign_profile: bool = FOREIGN_PROFILE_OPTION,
    replan: bool = typer.Option(True, "--replan/--no-replan", help="Re-plan when steps measure slower than planned."),
    chat: bool | None = typer.Option(
        None, "--chat/--no-chat", help="Apply the target's chat template (default: when it has one)."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Stop after this many new tokens."),
    mode: str | None = typer.Option(
        None, "--mode", help="greedy or stochastic (default: stochastic iff --temperature > 0)."
    ),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus threshold in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    verifier: str = VERIFIER_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling generator."),
    dtype: str | None = PLAN_DTYPE_OPTION,
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = THREADS_OPTION,
) -> None:
    """Generate text with the target, speculating with a draft on a token tree (lossless).

    With no tree options the dtype and tree are the best for this device: planned from its
    profiles (cached; measured on first use) and the draft's acceptance, and re-planned while
    decoding when the steps measure slower than plain decoding."""
    sampling = _sampling(mode, temperature, top_p, top_k)
    text = _prompt_text(prompt, prompt_file)
    draft_spec = DraftSpec.resolve(draft, target)
    if verifier not in VERIFIERS:
        raise ConfigError(f"--verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
    targets = Targets(target, device, threads)
    replanner, notes = None, []
    if tree_file is not None or budget is not None:  # the user's tree: no profile, no re-planning
        tree = plan_tree(draft_spec, tree_file, budget, max_depth, acceptance)
        run_dtype = dtype or str(tree.meta.get("dtype") or "float32")
    else:
        with progress_bar("this device's profile", console=err_console) as report:
            planned = plan_for_sampling(draft_spec, targets, sampling, acceptance, dtype, device, profile,
                                        foreign_profile, max_depth, len(text) // 4 + max_new_tokens // 2,
                                        report, warn)
        notes.append(planned.describe())
        if planned.plan.reason and draft_spec.kind != "none":
            notes.append(planned.plan.reason)
        tree, run_dtype = planned.plan.tree, planned.plan.dtype
        replanner = planned.replanner() if replan else None
    if tree.size == 1:
        draft_spec = DraftSpec.resolve("none", target)  # plain decoding loads no draft
    with console.status(f"loading {target}" + ("" if draft_spec.kind in ("none", "ngram") else f" and {draft_spec}")):
        loaded = targets.get(run_dtype)
        proposer = draft_spec.proposer(loaded, dtype=run_dtype, device=device)
        proposer.warmup()
    use_chat = bool(getattr(loaded.tokenizer, "chat_template", None)) if chat is None else chat
    ids = torch.tensor(render_prompt(loaded.tokenizer, text, use_chat), dtype=torch.long)
    engine = Engine(
        loaded.model, proposer, tree, sampling, verifier=verifier, seed=seed,
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer), replanner=replanner,
    )
    start = time.perf_counter()
    engine.start(ids, max_new_tokens)
    prefill = time.perf_counter() - start
    for note in notes:  # once the prompt is accepted: a refused one gets its error line alone
        err_console.print(note, highlight=False, soft_wrap=True)
    shown = ""
    while engine.stop is None:
        engine.step()
        decoded = loaded.tokenizer.decode(engine.tokens, skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):  # hold back a character whose bytes are incomplete
            typer.echo(decoded[len(shown):], nl=False)
            shown = decoded
    typer.echo("")
    _summary(engine, prefill, run_dtype)


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


def _summary(engine: Engine, prefill: float, dtype: str) -> None:
    stats, parts = engine.stats, engine.timer.breakdown()
    seconds, tree = parts["step"], engine.tree
    err_console.print(
        f"{stats.emitted} tokens in {seconds:.2f} s: [bold]{stats.emitted / max(seconds, 1e-9):.1f} tokens/s[/] "
        f"(prefill {prefill * 1e3:.0f} ms); {stats.steps} steps in {dtype}, tree of {tree.size} nodes, depth "
        f"{tree.depth}; mean accepted {stats.mean_accepted:.2f} + 1 = {stats.tokens_per_step:.2f} tokens/step",
        highlight=False,
        soft_wrap=True,
    )
    for event in engine.replanner.events if engine.replanner else []:
        err_console.print(f"re-plan: {event}", highlight=False, soft_wrap=True)
    table = Table(title="time per step", title_justify="left")
    for col in ("part", "ms/step", "share"):
        table.add_column(col, justify="right" if col != "part" else "left")
    for name in ("draft", "target", "verify", "cache", "other"):
        table.add_row(name, f"{parts[name] / max(stats.steps, 1) * 1e3:.2f}", f"{parts[name] / max(seconds, 1e-9):.1%}")
    err_console.print(table)
