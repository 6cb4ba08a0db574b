"""The trained-draft kinds by name, and loading a saved draft (model or proposer) for a target."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sequoia.drafts.card import CARD, WEIGHTS, draft_dir, packaged_drafts, read_card
from sequoia.drafts.chimera import ChimeraDraft
from sequoia.drafts.context_mix import ContextMix
from sequoia.drafts.mlp import MLPSpeculator
from sequoia.drafts.trained import DraftConfig, ReducedVocab, TrainedDraft
from sequoia.errors import ConfigError, FileFormatError, ModelError
from sequoia.models import check_dtype_runs, resolve_device
from sequoia.prepack import prepack_linears

DEFAULT_DRAFTS = {"smollm2-135m": "smollm2-135m-chimera"}  # target alias -> packaged draft name


def draft_kinds() -> dict[str, type[TrainedDraft]]:
    """Every trained-draft kind by name."""
    return {cls.kind: cls for cls in (MLPSpeculator, ChimeraDraft)}


def default_draft(target: str) -> str:
    """The packaged draft made for ``target`` when it ships, else ``ngram``."""
    name = DEFAULT_DRAFTS.get(target)
    return name if name in packaged_drafts() else "ngram"


def load_draft(spec: str | os.PathLike, target=None) -> TrainedDraft:
    """Load a trained draft (packaged name or directory) in float32 on the CPU.

    With ``target`` (a ``PreTrainedModel``), check it is the width and vocabulary the draft was
    trained for and share its embedding. Raises :class:`FileFormatError` for a missing or
    corrupt draft and :class:`ModelError` for a draft made for another target.
    """
    directory = draft_dir(spec)
    if directory is None:
        raise FileFormatError(f"no trained draft at {spec} (missing {CARD}); train one with `sequoia draft train`")
    card = read_card(directory)
    kinds = draft_kinds()
    if card.get("kind") not in kinds:
        raise FileFormatError(f"{directory / CARD}: unknown draft kind {card.get('kind')!r}; one of {', '.join(kinds)}")
    cls = kinds[card["kind"]]
    config = cls.config_class.from_json(card.get("config"), str(directory / CARD))
    ids = card.get("vocab_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise FileFormatError(f"{directory / CARD} has no valid 'vocab_ids' list")
    if target is not None:
        check_target(config, target, str(card.get("target", "unknown")), directory)
    model = cls(config, ReducedVocab(torch.tensor(ids, dtype=torch.long), config.vocab_size))
    try:
        state = load_file(str(directory / WEIGHTS))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(f"{directory / WEIGHTS} is missing or corrupt: {reason}") from None
    if target is not None:
        model.attach_target(target.get_input_embeddings().weight)
    return model.eval()

def trained_draft_dtype(device: str) -> str:
    """The dtype a trained draft's proposer runs in on ``device`` (bfloat16 where it computes)."""
    try:
        check_dtype_runs(torch.bfloat16, resolve_device(device))
        return "bfloat16"
    except ConfigError:
        return "float32"


def load_trained_proposer(spec: str | os.PathLike, target, context_mix: bool = True, shaper=None):
    """The proposer of a trained draft for ``target`` (a ``PreTrainedModel``), on the target's
    device, in bfloat16 where that device computes it (else the target's dtype), with its
    linear weights packed once where that helps (:mod:`sequoia.prepack`), and its card's
    context mix (:mod:`sequoia.drafts.context_mix`) unless ``context_mix`` is false, and
    per-step trees with ``shaper`` (a :class:`~sequoia.dynamic.TreeShaper`)."""
    weight = target.get_input_embeddings().weight
    try:
        check_dtype_runs(torch.bfloat16, weight.device)
        dtype = torch.bfloat16
    except ConfigError:
        dtype = weight.dtype
    model = load_draft(spec, target).to(weight.device, dtype)
    prepack_linears(model)
    return model.proposer(load_context_mix(spec) if context_mix else None, shaper)


def load_context_mix(spec: str | os.PathLike) -> ContextMix | None:
    """The context mix a trained draft's card records, or None."""
    directory = draft_dir(spec)
    if directory is None:
        raise FileFormatError(f"no trained draft at {spec} (missing {CARD})")
    return ContextMix.from_card(read_card(directory), str(directory / CARD))


def check_target(config: DraftConfig, target, trained_for: str, where: Path | str) -> None:
    """Raise :class:`ModelError` unless ``target`` has the draft's width and vocabulary."""
    embedding = target.get_input_embeddings().weight
    vocab, width = int(embedding.shape[0]), int(embedding.shape[1])
    if (vocab, width) != (config.vocab_size, config.hidden_size):
        raise ModelError(
            f"the draft {where} was trained for {trained_for} (width {config.hidden_size}, "
            f"{config.vocab_size} tokens) but this target has width {width} and {vocab} tokens; "
            "train a draft for this target with `sequoia draft train`"
        )
