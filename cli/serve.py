"""``sequoia serve``: an OpenAI-compatible HTTP server decoding with tree speculation."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from sequoia.drafts import DraftSpec
from sequoia.engine import VERIFIERS
from sequoia.errors import ConfigError
from sequoia.models import DEFAULT_MODEL, load_model
from sequoia.planning import plan_tree
from sequoia.serve import ServedModel, bind, create_app, run
from sequoia_cli.common import DRAFT_HELP, console, err_console, handles_errors


@handles_errors
def serve(
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="Alias, .gguf file, model directory or hub id."),
    draft: str | None = typer.Option(None, "--draft", help=DRAFT_HELP),
    tree_file: Path | None = typer.Option(None, "--tree", help="Tree file (sequoia-tree/1 JSON or growmap .pt)."),
    budget: int | None = typer.Option(None, "--budget", help="Tree size for the solver (with --acceptance)."),
    max_depth: int | None = typer.Option(None, "--max-depth", help="Tree depth limit for the solver."),
    acceptance: Path | None = typer.Option(None, "--acceptance", help="sequoia-acceptance/1 file for the solver."),
    verifier: str = typer.Option("sequoia", "--verifier", help="Stochastic verification: sequoia or specinfer."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: all)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait; more get 503."),
    shutdown_timeout: float = typer.Option(
        10.0, "--shutdown-timeout", help="On SIGINT/SIGTERM, seconds open responses may finish before cancelling."
    ),
) -> None:
    """Serve the target over HTTP (OpenAI API: /v1/chat/completions, /v1/completions), lossless."""
    if verifier not in VERIFIERS:
        raise ConfigError(f"--verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
    if max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {max_queue}")
    if not shutdown_timeout >= 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
    draft = DraftSpec.resolve(draft, target)
    tree = plan_tree(draft, tree_file, budget, max_depth, acceptance)  # the tree generate decodes with
    sock = bind(host, port)
    with console.status(f"loading {target}" + ("" if draft.kind in ("none", "ngram") else f" and {draft}")):
        loaded = load_model(target, dtype=dtype, device=device, threads=threads)
        proposer = draft.proposer(loaded, dtype=dtype, device=device)
        proposer.warmup()
    served = ServedModel(target, loaded.model, loaded.tokenizer, proposer, lambda sampling: tree, verifier)
    app = create_app(served, max_queue=max_queue)
    err_console.print(
        f"serving {target} on http://{host}:{port}/v1 (draft {draft}, tree of {tree.size} nodes, depth {tree.depth})",
        highlight=False, soft_wrap=True,
    )
    stopped_by = run(app, sock, shutdown_timeout=shutdown_timeout)
    app.state.worker.stop()  # already stopped by the app's shutdown, unless a second Ctrl-C forced the exit
    reason = f" ({signal.Signals(stopped_by).name})" if stopped_by else ""
    err_console.print(f"stopped{reason}", highlight=False)
