"""``sequoia optimize``: pick the fastest tree for this device from a profile and acceptance."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sequoia.acceptance import AcceptanceResult
from sequoia.drafts import DraftSpec
from sequoia.errors import ConfigError
from sequoia.optimizer import Choice, choose
from sequoia.profile import Profile
from sequoia.tree import Tree
from sequoia_cli.common import console, handles_errors


def _label(acc: AcceptanceResult) -> str:
    return "greedy" if acc.mode == "greedy" else f"T={acc.temperature:g}, top-p={acc.top_p:g}"


def _runners_up(choice: Choice) -> Table:
    table = Table(title="Best trees (predicted)", title_justify="left")
    for col in ("rank", "size", "depth", "tokens/step", "draft ms", "target ms", "ms/token", "speed-up"):
        table.add_column(col, justify="right")
    for i, c in enumerate(choice.ranked, 1):
        table.add_row(
            str(i), str(c.size), str(c.depth), f"{c.expected_tokens:.3f}", f"{c.draft_ms:.1f}",
            f"{c.target_ms:.1f}", f"{c.ms_per_token:.2f}", f"{choice.autoregressive_ms / c.ms_per_token:.2f}x",
        )
    return table


@handles_errors
def optimize(
    profile: Path = typer.Option(..., "--profile", help="Target profile (sequoia-profile/1 JSON)."),
    acceptance: list[Path] = typer.Option(
        ..., "--acceptance", help="Acceptance file(s); the tree is written for the first, the others "
        "show how the choice moves with temperature."
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the chosen tree (sequoia-tree/1)."),
    draft_profile: Path | None = typer.Option(None, "--draft-profile", help="Profile of the draft model."),
    prefix_len: int = typer.Option(256, "--prefix-len", help="Context length the latencies are read at."),
    max_size: int | None = typer.Option(None, "--max-size", help="Largest tree (default: largest profiled)."),
    max_depth: int = typer.Option(
        16, "--max-depth", help="Deepest tree considered (a trained draft lowers it to its levels)."
    ),
) -> None:
    """Choose the tree size and depth that minimise predicted time per token on this device."""
    prof = Profile.load(profile)
    draft_prof = Profile.load(draft_profile) if draft_profile else None
    accs = [AcceptanceResult.load(p) for p in acceptance]
    for acc, path in zip(accs, acceptance):
        if acc.target != prof.model:
            raise ConfigError(
                f"{path} was measured for target {acc.target!r} but {profile} profiles "
                f"{prof.model!r}; measure both on the same model"
            )
    choices = []
    for acc in accs:  # a trained draft (named in the acceptance file) caps the depth, brings its cost
        limits = DraftSpec.resolve(acc.draft, acc.target).limits
        choices.append(choose(prof, acc.for_solver, prefix_len, draft_prof, max_size, max_depth, draft=limits))
    best = choices[0].best
    meta = {
        **best.tree.meta,
        "profile": str(profile),
        "acceptance_file": str(acceptance[0]),
        "prefix_len": prefix_len,
        "predicted_ms_per_token": best.ms_per_token,
        "predicted_speedup": choices[0].speedup,
    }
    Tree(best.tree.parents, meta).save(out)

    console.print(
        f"[bold]{prof.model}[/] on {prof.device.get('name', 'this device')} "
        f"(prefix {prefix_len}); autoregressive: {choices[0].autoregressive_ms:.1f} ms/token"
    )
    console.print(_runners_up(choices[0]))
    if len(accs) > 1:
        moves = Table(title="How the choice moves with the sampling setting", title_justify="left")
        for col in ("acceptance", "p[1..3]", "size", "depth", "tokens/step", "speed-up"):
            moves.add_column(col, justify="right")
        for acc, ch in zip(accs, choices):
            head = ", ".join(f"{x:.2f}" for x in acc.vector[:3])
            moves.add_row(_label(acc), head, str(ch.best.size), str(ch.best.depth),
                          f"{ch.best.expected_tokens:.3f}", f"{ch.speedup:.2f}x")
        console.print(moves)
    console.print(f"wrote {out}: size {best.size}, depth {best.depth}, "
                  f"predicted {choices[0].speedup:.2f}x over autoregressive decoding")
