"""``sequoia draft``: build self-distillation data and train drafts on the target's states."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sequoia.drafts.training.data import DataStore, Manifest, generate_data
from sequoia.drafts.training.evaluate import evaluate_draft, measure_acceptance
from sequoia.drafts.context_mix import MAX_NGRAM
from sequoia.drafts.training.train import (
    TrainSettings,
    discard_checkpoint,
    drop_mix,
    open_training_data,
    refit_mix,
    train_from_store,
)
from sequoia.drafts.card import CARD, draft_dir, read_card, update_card
from sequoia.drafts.registry import load_draft
from sequoia.models import eos_token_ids
from sequoia.errors import ConfigError
from sequoia.models import DEFAULT_MODEL, cache_dir, load_model
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


@app.command()
@handles_errors
def train(
    data: list[Path] = typer.Option(..., "--data", help="Data store from `sequoia draft data` (repeat to pool several)."),
    out: Path = typer.Option(..., "--out", help="Draft directory to write (card.json + draft.safetensors)."),
    kind: str = typer.Option("mlp", "--kind", help="mlp (IBM MLP speculator) or chimera."),
    work: Path | None = typer.Option(None, "--work", help="Cached target features + checkpoint [default: OUT.work]."),
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="The target the data was sampled from."),
    minutes: float | None = typer.Option(60.0, "--minutes", help="Training time budget (summed over resumes)."),
    steps: int | None = typer.Option(None, "--steps", help="Step budget (the first budget reached ends the run)."),
    chunk_minutes: float | None = typer.Option(
        None, "--chunk-minutes", help="Stop this run after this long and write the draft; the same command resumes."
    ),
    vocab: int = typer.Option(8192, "--vocab", help="Reduced output vocabulary: the most frequent target outputs."),
    heads: int = typer.Option(4, "--heads", help="Tree levels the draft predicts (its maximum tree depth)."),
    batch_tokens: int = typer.Option(2048, "--batch-tokens", help="Padded tokens per training step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, cosine schedule)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the batch stream."),
    held_out_tokens: int = typer.Option(128, "--held-out-tokens", help="Greedy tokens per held-out prompt."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="dtype of the target pass that extracts features."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads [default: torch's]."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard the checkpoint in the work directory."),
    context_mix: int = typer.Option(MAX_NGRAM, "--context-mix", help="Longest context n-gram mixed into the candidates (0: none)."),
    mix_loss: bool = typer.Option(False, "--mix-loss", help="Train through the context mix, learning its weights alongside."),
    recurrent: bool = typer.Option(False, "--recurrent", help="Chimera: the last head serves every deeper level (any tree depth)."),
    levels: int = typer.Option(0, "--levels", help="Levels unrolled per training step [default: --heads]; more with --recurrent."),
    init_from: str = typer.Option("", "--init-from", help="Fine-tune: start from this draft's weights and vocabulary."),
    sequences: list[int] = typer.Option(None, "--sequences", help="Train on each store's first N sequences only (once for all, or once per --data)."),
) -> None:
    """Train a draft on the target's own hidden states (resumes from the work directory)."""
    settings = TrainSettings(
        kind=kind, heads=heads, vocab=vocab, batch_tokens=batch_tokens, lr=lr, seed=seed, steps=steps, minutes=minutes,
        chunk_minutes=chunk_minutes,
        context_mix=context_mix, mix_loss=mix_loss, recurrent=recurrent, levels=levels, init_from=init_from,
    )
    stores = open_training_data(data)
    work = work or out.with_name(out.name + ".work")
    if fresh:
        discard_checkpoint(work)
    with console.status(f"loading {target}"):
        loaded = load_model(target, dtype=dtype, device=device, threads=threads)
    with progress_bar("training") as update:
        card = train_from_store(loaded, stores, out, work, settings, eos_token_ids(loaded.model, loaded.tokenizer), held_out_tokens, update, sequences or None)
    _show_card(card)
    t = card["training"]
    console.print(f"wrote {out} ({t['steps']} steps, {t['minutes']} min, {t['data_positions']:,} training positions)")
    if t.get("budget_used", 1.0) < 1.0:
        console.print(f"this chunk ended at {t['budget_used']:.0%} of the budget; the same command resumes the run")


@app.command()
@handles_errors
def mix(
    draft: Path = typer.Argument(..., help="Trained draft directory (its card is updated)."),
    data: list[Path] = typer.Option(None, "--data", help="The draft's training data store(s) to fit on."),
    work: Path | None = typer.Option(None, "--work", help="Cached target features [default: DRAFT.work]."),
    max_ngram: int = typer.Option(MAX_NGRAM, "--max-ngram", help="Longest context suffix that is looked up."),
    off: bool = typer.Option(False, "--off", help="Remove the draft's context mix instead."),
    held_out_tokens: int = typer.Option(128, "--held-out-tokens", help="Greedy tokens per held-out prompt."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
) -> None:
    """Fit (or remove) a draft's context mix: its candidates mixed with the context's n-grams."""
    card = read_card(draft_dir(draft) or draft)
    if off:
        drop_mix(draft)
        console.print(f"removed the context mix of {draft}; `sequoia draft eval {draft} --update-card` refreshes its evaluation")
        return
    if max_ngram < 1:
        raise ConfigError(f"--max-ngram must be at least 1, got {max_ngram}")
    if not data:
        raise ConfigError("give the draft's training data with --data (repeat for several stores)")
    stores = open_training_data(data)
    name = card["target"]
    with console.status(f"loading {name}"):
        loaded = load_model(name, dtype=card.get("training", {}).get("target_dtype", "float32"), device=device)
    with progress_bar("fitting the context mix") as update:
        card = refit_mix(draft, loaded, stores, work or draft.with_name(draft.name + ".work"), max_ngram,
                         held_out_tokens=held_out_tokens, progress=update)
    _show_card(card)


@app.command("eval")
@handles_errors
def eval_(
    draft: str = typer.Argument(..., help="Trained draft directory or packaged name."),
    target: str | None = typer.Option(None, "--target", help="Target [default: the one the draft was trained for]."),
    work: Path | None = typer.Option(None, "--work", help="Where held-out target features are cached."),
    held_out_tokens: int = typer.Option(128, "--held-out-tokens", help="Greedy tokens per held-out prompt."),
    acceptance: bool = typer.Option(False, "--acceptance/--no-acceptance", help="Also measure the acceptance vector (slow)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Acceptance: sampling temperature (0 = greedy)."),
    width: int = typer.Option(8, "--width", help="Acceptance: candidates per node."),
    limit: int | None = typer.Option(None, "--limit", help="Acceptance: use only the first N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Acceptance: tokens decoded per prompt."),
    max_size: int = typer.Option(64, "--max-size", help="Tree size for the predicted tokens per step."),
    update: bool = typer.Option(False, "--update-card", help="Write the results into the draft's card."),
    dtype: str | None = typer.Option(None, "--dtype", help="dtype of the target [default: the training's]."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
) -> None:
    """Held-out agreement per tree level, cost per level and (optionally) acceptance of a draft."""
    card = read_card(draft_dir(draft) or Path(draft))
    load_draft(draft)  # a corrupt draft fails here, before the target loads
    name = target or card["target"]
    dtype = dtype or card.get("training", {}).get("target_dtype", "float32")
    with console.status(f"loading {name}"):
        loaded = load_model(name, dtype=dtype, device=device)
    with console.status("held-out agreement and cost per level"):
        records = {"evaluation": evaluate_draft(draft, loaded, work or cache_dir() / "draft-eval", held_out_tokens)}
    if acceptance:
        with progress_bar("measuring acceptance") as bar:
            records["acceptance"] = measure_acceptance(
                draft, loaded, width, temperature, limit, max_new_tokens, max_size,
                progress=lambda done, total: bar(done, total, "prompts"),
            )
    _show_card({**card, **records})
    if update:
        update_card(draft, records)
        console.print(f"updated {draft_dir(draft) / CARD}")


def _show_card(card: dict) -> None:
    """Agreement per level, cost per level and acceptance of a draft card."""
    ev = card.get("evaluation", {})
    table = Table(title=f"{card['kind']} draft for {card['target']}: held-out agreement ({ev.get('positions', 0)} roots)", title_justify="left")
    for col in ("level", "positions", "top-1", "top-4", "in vocab"):
        table.add_column(col, justify="right")
    for a in ev.get("levels", []):
        table.add_row(str(a["level"]), str(a["positions"]), f"{a['top1']:.1%}", f"{a['top4']:.1%}", f"{a['coverage']:.1%}")
    console.print(table)
    mixed = card.get("context_mix")
    if mixed and ev.get("levels_draft_only"):
        alone = ", ".join(f"{a['top1']:.1%}/{a['top4']:.1%}" for a in ev["levels_draft_only"])
        console.print(f"with the context mix (n-grams up to {len(mixed['weights'])}); the model alone, top-1/top-4 by level: {alone}")
    costs = ev.get("cost_ms_per_level", {})
    if costs:
        shown = [w for w in ("1", "2", "4", "8", "16") if w in costs]
        listed = ", ".join(f"{w} nodes {costs[w]:.2f}" for w in shown) + (f"; per step {costs['0']:+.2f}" if "0" in costs else "")
        console.print(f"cost per tree level (ms, bfloat16, {ev.get('cost_threads', '?')} threads): {listed}")
    acc = card.get("acceptance")
    if acc:
        vector = ", ".join(f"{p:.3f}" for p in acc["vector"])
        tree = acc["optimal_tree"]
        console.print(f"acceptance ({acc['mode']}, T={acc['temperature']}, {acc['samples']} positions): [{vector}]")
        for depth, (row, n) in enumerate(zip(acc.get("by_depth", [])[1:], acc.get("depth_samples", [])[1:]), start=2):
            console.print(f"  depth {depth} ({n} positions): [{', '.join(f'{p:.3f}' for p in row)}]")
        console.print(f"optimal tree (<= {tree['max_size']} nodes, depth <= {tree['max_depth']}): "
                      f"{tree['expected_tokens_per_step']:.2f} tokens/step predicted")
