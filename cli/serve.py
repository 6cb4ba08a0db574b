"""``sequoia serve``: an OpenAI-compatible HTTP server decoding with tree speculation."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from sequoia.drafts import DraftSpec
from sequoia.engine import VERIFIERS
from sequoia.errors import ConfigError
from sequoia.planning import plan_for_sampling, plan_tree
from sequoia.profile_cache import Targets
from sequoia.sampling import SamplingConfig
from sequoia.serve import ServedModel, bind, create_app, run
from sequoia_cli.common import (
    ACCEPTANCE_OPTION, BUDGET_OPTION, DRAFT_OPTION, FOREIGN_PROFILE_OPTION, MAX_DEPTH_OPTION, PLAN_DTYPE_OPTION,
    PROFILE_OPTION, TARGET_OPTION, THREADS_OPTION, TREE_OPTION, VERIFIER_OPTION, console, err_console,
    handles_errors, progress_bar, warn,
)


@handles_errors
def serve(
    target: str = TARGET_OPTION,
    draft: str | None = DRAFT_OPTION,
    tree_file: Path | None = TREE_OPTION,
    budget: int | None = BUDGET_OPTION,
    max_depth: int | None = MAX_DEPTH_OPTION,
    acceptance: Path | None = ACCEPTANCE_OPTION,
    profile: list[Path] = PROFILE_OPTION,
    foreign_profile: bool = FOREIGN_PROFILE_OPTION,
    verifier: str = VERIFIER_OPTION,
    dtype: str | None = PLAN_DTYPE_OPTION,
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = THREADS_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait; more get 503."),
    shutdown_timeout: float = typer.Option(
        10.0, "--shutdown-timeout", help="On SIGINT/SIGTERM, seconds open responses may finish before cancelling."
    ),
) -> None:
    """Serve the target over HTTP (OpenAI API: /v1/chat/completions, /v1/completions), lossless.

    With no tree options the dtype and trees are this device's plan, as generate makes it: one
    tree for greedy requests and one for sampled ones (planned at temperature 1), in the dtype best
    for greedy."""
    if verifier not in VERIFIERS:
        raise ConfigError(f"--verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
    if max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {max_queue}")
    if not shutdown_timeout >= 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
    draft = DraftSpec.resolve(draft, target)
    targets = Targets(target, device, threads)
    sock = bind(host, port)
    notes = []
    if tree_file is not None or budget is not None:  # the user's tree, for every request
        tree = plan_tree(draft, tree_file, budget, max_depth, acceptance)
        trees, run_dtype = {True: tree, False: tree}, dtype or str(tree.meta.get("dtype") or "float32")
    else:
        with progress_bar("this device's profile", console=err_console) as report:
            options = {"acceptance": acceptance, "device": device, "profiles": profile, "foreign_ok": foreign_profile,
                       "max_depth": max_depth, "progress": report, "warn": warn}
            greedy = plan_for_sampling(draft, targets, SamplingConfig(0.0), dtype=dtype, **options)
            sampled = plan_for_sampling(draft, targets, SamplingConfig(1.0), dtype=greedy.plan.dtype, **options)
        trees, run_dtype = {True: greedy.plan.tree, False: sampled.plan.tree}, greedy.plan.dtype  # one model
        notes = [f"greedy {greedy.describe()}", f"sampled {sampled.describe()}"]
    if max(t.size for t in trees.values()) == 1:
        draft = DraftSpec.resolve("none", target)  # plain decoding loads no draft
    with console.status(f"loading {target}" + ("" if draft.kind in ("none", "ngram") else f" and {draft}")):
        loaded = targets.get(run_dtype)
        proposer = draft.proposer(loaded, dtype=run_dtype, device=device)
        proposer.warmup()
    served = ServedModel(target, loaded.model, loaded.tokenizer, proposer, lambda s: trees[s.greedy], verifier)
    app = create_app(served, max_queue=max_queue)
    shapes = "; ".join(f"{'greedy' if is_greedy else 'sampled'}: tree of {t.size} nodes, depth {t.depth}"
                       for is_greedy, t in trees.items())
    err_console.print(f"serving {target} on http://{host}:{port}/v1 (draft {draft}, {run_dtype}; {shapes})",
                      highlight=False, soft_wrap=True)
    for note in notes:
        err_console.print(note, highlight=False, soft_wrap=True)
    stopped_by = run(app, sock, shutdown_timeout=shutdown_timeout)
    app.state.worker.stop()  # already stopped by the app's shutdown, unless a second Ctrl-C forced the exit
    reason = f" ({signal.Signals(stopped_by).name})" if stopped_by else ""
    err_console.print(f"stopped{reason}", highlight=False)
