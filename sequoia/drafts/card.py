"""Where trained drafts live and their card: the ``sequoia-draft/1`` directory format.

On disk a draft is a directory (``sequoia-draft/1``)::

    card.json          kind, config, target, hidden width, vocabulary size, the reduced-
                       vocabulary id list, and free-form training / evaluation records
    draft.safetensors  the draft's own weights (bfloat16). The target's token embedding is
                       shared at load time, never stored.

Drafts that ship with the package live under ``sequoia/data/drafts/<name>/`` and load by name.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sequoia.drafts.trained import TrainedDraft
from sequoia.errors import FileFormatError
from sequoia.files import read_json, write_atomic, write_json_atomic

DRAFT_FORMAT = "sequoia-draft/1"
CARD, WEIGHTS = "card.json", "draft.safetensors"


def packaged_drafts_dir() -> Path:
    return Path(str(resources.files("sequoia").joinpath("data/drafts")))


def packaged_drafts() -> list[str]:
    """Names of the drafts that ship inside the package."""
    root = packaged_drafts_dir()
    return sorted(p.name for p in root.iterdir() if (p / CARD).is_file()) if root.is_dir() else []


def draft_dir(spec: str | os.PathLike) -> Path | None:
    """The directory of a trained draft named by ``spec`` (packaged name or path), or None."""
    if str(spec) in packaged_drafts():
        return packaged_drafts_dir() / str(spec)
    path = Path(spec).expanduser()
    return path if (path / CARD).is_file() or (path / WEIGHTS).is_file() else None


def read_card(directory: Path) -> dict[str, Any]:
    card = read_json(directory / CARD) if (directory / CARD).is_file() else None
    if card is None:
        raise FileFormatError(f"{directory} is not a trained draft (missing {CARD}); train one with `sequoia draft train`")
    if not isinstance(card, dict) or card.get("format") != DRAFT_FORMAT:
        raise FileFormatError(f"{directory / CARD} is not a {DRAFT_FORMAT} card")
    return card


def draft_card(model: TrainedDraft, target: str) -> dict[str, Any]:
    c = model.config
    return {
        "format": DRAFT_FORMAT,
        "kind": model.kind,
        "target": target,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "config": asdict(c),
        "vocab_ids": model.vocab.ids.tolist(),
    }


def save_draft(
    model: TrainedDraft, out: str | os.PathLike, target: str, records: dict[str, Any] | None = None
) -> None:
    """Write ``model`` as a ``sequoia-draft/1`` directory (weights first, then the card)."""
    out = Path(out)
    weights = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp))
        tmp.chmod(0o644)  # safetensors creates it private; a draft is shipped and shared

    write_atomic(out / WEIGHTS, write)
    write_json_atomic(out / CARD, {**draft_card(model, target), **(records or {})})


def update_card(spec: str | os.PathLike, records: dict[str, Any]) -> None:
    """Merge ``records`` (e.g. evaluation results) into a saved draft's card."""
    directory = draft_dir(spec)
    if directory is None:
        raise FileFormatError(f"no trained draft at {spec} (missing {CARD})")
    write_json_atomic(directory / CARD, {**read_card(directory), **records})
