"""``sequoia optimize``: pick the fastest dtype and tree for this device from its profiles and
the draft's acceptance."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sequoia.acceptance import AcceptanceResult
from sequoia.device import fingerprint_key
from sequoia.drafts import DraftSpec
from sequoia.errors import ConfigError
from sequoia.optimizer import Choice
from sequoia.planning import DevicePlan, plan_on_device
from sequoia.profile import Profile
from sequoia.profile_cache import Targets, check_profile, here
from sequoia.tree import Tree
from sequoia_cli.common import console, handles_errors, progress_bar, warn


def _label(acc: AcceptanceResult) -> str:
    return "greedy" if acc.mode == "greedy" else f"T={acc.temperature:g}, top-p={acc.top_p:g}"


def _runners_up(choice: Choice, dtype: str, plain_ms: float) -> Table:
    table = Table(title=f"Best trees in {dtype} (predicted)", title_justify="left")
    for col in ("rank", "size", "depth", "tokens/step", "draft ms", "target ms", "ms/token", "speed-up"):
        table.add_column(col, justify="right")
    for i, c in enumerate(choice.ranked, 1):
        table.add_row(
            str(i), str(c.size), str(c.depth), f"{c.expected_tokens:.3f}", f"{c.draft_ms:.1f}",
            f"{c.target_ms:.1f}", f"{c.ms_per_token:.2f}", f"{plain_ms / c.ms_per_token:.2f}x",
        )
    return table


@handles_errors
def optimize(
    acceptance: list[Path] = typer.Option(
        ..., "--acceptance", help="Acceptance file(s); the tree is written for the first, the others "
        "show how the choice moves with temperature."
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the chosen tree (sequoia-tree/1)."),
    profile: list[Path] = typer.Option(
        [], "--profile", help="Target profile(s), one per dtype (default: this device's, cached or measured now)."
    ),
    foreign_profile: bool = typer.Option(
        False, "--foreign-profile", help="Accept a --profile measured on another device (with a warning)."
    ),
    target: str | None = typer.Option(None, "--target", help="The target (default: the acceptance file's)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Force this dtype (default: the fastest plan's)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: all)."),
    draft_profile: Path | None = typer.Option(None, "--draft-profile", help="Profile of the draft model."),
    prefix_len: int = typer.Option(256, "--prefix-len", help="Context length the latencies are read at."),
    max_size: int | None = typer.Option(None, "--max-size", help="Largest tree (default: largest profiled)."),
    max_depth: int = typer.Option(
        16, "--max-depth", help="Deepest tree considered (a trained draft lowers it to its levels)."
    ),
) -> None:
    """Choose the dtype, tree size and depth that minimise predicted time per token on this device
    (plain decoding when no tree beats it by 5%)."""
    accs = [AcceptanceResult.load(p) for p in acceptance]
    target = target or accs[0].target
    for acc, path in zip(accs, acceptance):
        if acc.target != target:
            raise ConfigError(f"{path} was measured for target {acc.target!r}, not {target!r}; "
                              "measure acceptance and profile on the same model")
    targets = Targets(target, device, threads, tokenizer=False)
    level_ms = _draft_profile_costs(draft_profile, prefix_len, device, foreign_profile) if draft_profile else None
    plans: list[DevicePlan] = []
    with progress_bar("this device's profile") as report:
        for acc, path in zip(accs, acceptance):  # a trained draft (named in the file) caps the depth
            plans.append(plan_on_device(
                target, DraftSpec.resolve(acc.draft, acc.target), acc.for_solver, str(path),
                [dtype] if dtype else None, device, targets, prefix_len, max_depth, profile, foreign_profile,
                report, warn, max_size=max_size, level_ms=level_ms,
            ))
    first = plans[0]
    plan = first.plan
    shown = plan.dtype if not plan.plain else min(plan.choices, key=lambda d: plan.choices[d].best.ms_per_token)
    meta = {
        **plan.tree.meta,
        "dtype": plan.dtype,
        "profiles": {d: str(c.path) for d, c in first.profiles.items()},
        "fingerprint_key": fingerprint_key(next(iter(first.profiles.values())).profile.fingerprint),
        "draft_cost_source": first.draft_costs[plan.dtype].source,
        "acceptance_file": str(acceptance[0]),
        "prefix_len": prefix_len,
        "predicted_ms_per_token": plan.predicted_ms_per_token,
        "predicted_speedup": plan.speedup,
        "plain_decoding": {"dtype": plan.plain_dtype, "ms_per_token": plan.plain_ms},
        **({"reason": plan.reason} if plan.reason else {}),
    }
    Tree(plan.tree.parents, meta).save(out)

    console.print(f"[bold]{target}[/] (prefix {prefix_len}); plain decoding: "
                  + ", ".join(f"{d} {c.autoregressive_ms:.1f} ms/token" for d, c in plan.choices.items()))
    console.print(_runners_up(plan.choices[shown], shown, plan.plain_ms))
    if len(accs) > 1:
        moves = Table(title="How the choice moves with the sampling setting", title_justify="left")
        for col in ("acceptance", "p[1..3]", "dtype", "size", "depth", "tokens/step", "speed-up"):
            moves.add_column(col, justify="right")
        for acc, p in zip(accs, plans):
            head = ", ".join(f"{x:.2f}" for x in acc.vector[:3])
            best = p.plan.choice.best if not p.plan.plain else None
            moves.add_row(_label(acc), head, p.plan.dtype, str(p.plan.tree.size), str(p.plan.tree.depth),
                          f"{best.expected_tokens:.3f}" if best else "1.000", f"{p.plan.speedup:.2f}x")
        console.print(moves)
    console.print(first.describe(), highlight=False, soft_wrap=True)
    if plan.reason:
        console.print(plan.reason, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}: {plan.dtype}, size {plan.tree.size}, depth {plan.tree.depth}, "
                  f"predicted {plan.speedup:.2f}x over plain decoding in {plan.plain_dtype}")


def _draft_profile_costs(path: Path, prefix_len: int, device: str, foreign: bool) -> dict[int, float]:
    """A draft profile's cost per level (its draft section, or its own grid), checked to be of
    this device."""
    prof = Profile.load(path)
    check_profile(prof, path, here(device), foreign, warn)
    grid = prof.draft or prof.target
    return {int(w): grid.latency(w, prefix_len) for w in grid.tokens}
