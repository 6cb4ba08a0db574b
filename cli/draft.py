"""``sequoia draft``: build self-distillation data and train drafts on the target's states."""

from __future__ import annotations

from pathlib import Path

import typer

from sequoia.drafts.data import DataStore, Manifest, generate_data
from sequoia.models import DEFAULT_MODEL, load_model
from sequoia_cli.common import console, handles_errors, progress_bar

app = typer.Typer(help="Build distillation data and train drafts from the target itself.", no_args_is_help=True)


@app.command()
@handles_errors
def data(
    out: Path = typer.Option(..., "--out", help="Data store directory (created, or resumed and grown)."),
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="Alias, .gguf file, model directory or hub id."),
    positions: int = typer.Option(1_000_000, "--positions", help="Grow the store to this many generated tokens."),
    minutes: float | None = typer.Option(None, "--minutes", help="Stop after this long (resume later)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Prompts sampled together."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Tokens sampled per prompt."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="dtype the target samples in."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
) -> None:
    """Sample the target's own continuations of the training prompts into a resumable store."""
    settings = Manifest(target, dtype, temperature, top_p, max_new_tokens)
    store = DataStore.open_or_create(out, settings)
    with console.status(f"loading {target}"):
        loaded = load_model(target, dtype=dtype, device=device)
    if loaded.name != store.manifest.target:
        settings.target = loaded.name
        store = DataStore.open_or_create(out, settings)
    with progress_bar("sampling") as update:
        generate_data(store, loaded, positions, batch_size, minutes, update)
    m = store.manifest
    console.print(
        f"{out}: {m.positions:,} positions in {m.sequences:,} sequences, {len(m.shards)} shards, "
        f"{m.seconds / 60:.1f} min of sampling ({m.positions / max(m.seconds, 1e-9):.0f} tokens/s)"
    )
