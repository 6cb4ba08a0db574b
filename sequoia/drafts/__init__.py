"""Draft proposers behind one interface (:class:`Proposer`), and :func:`make_proposer`."""

from __future__ import annotations

from sequoia.drafts.base import Draft, DraftContext, NoDraft, Proposer
from sequoia.drafts.early_exit import early_exit_model, parse_spec
from sequoia.drafts.lm import LMProposer, check_same_vocabulary
from sequoia.drafts.ngram import NgramProposer

BUILTIN_DRAFTS = ("none", "ngram")

__all__ = [
    "BUILTIN_DRAFTS",
    "Draft",
    "DraftContext",
    "LMProposer",
    "NgramProposer",
    "NoDraft",
    "Proposer",
    "load_draft_model",
    "make_proposer",
    "resolve_draft",
]


def resolve_draft(spec: str | None, target: str) -> str:
    """``spec``, or when it is None the default draft of ``target`` (a model alias): its
    packaged trained draft where one ships, else ``ngram``."""
    if spec is not None:
        return spec
    from sequoia.drafts.trained import default_draft

    return default_draft(target)


def make_proposer(spec: str, target, dtype: str = "float32", device: str = "cpu") -> Proposer:
    """``none``, ``ngram``, ``early-exit:N`` (the target's first N layers), a trained draft
    (packaged name such as ``smollm2-135m-mlp`` or a ``sequoia draft train`` directory, run in
    bfloat16 where the device can), or a model spec loaded as an :class:`LMProposer` for ``target``
    (a :class:`~sequoia.models.LoadedModel`); a draft with another tokenizer or vocabulary
    raises :class:`~sequoia.errors.ModelError`."""
    if spec == "none":
        return NoDraft()
    if spec == "ngram":
        return NgramProposer()
    from sequoia.drafts.trained import draft_dir, load_trained_proposer

    if draft_dir(spec) is not None:  # a packaged name or a `sequoia draft train` directory
        return load_trained_proposer(spec, target.model)
    return LMProposer(load_draft_model(spec, target, dtype, device))


def load_draft_model(spec: str, target, dtype: str = "float32", device: str = "cpu"):
    """The causal LM behind an LM draft spec: ``early-exit:N`` (shares the target's weights)
    or a model spec, checked to share the target's tokenizer and vocabulary."""
    layers = parse_spec(spec)
    if layers is not None:
        return early_exit_model(target.model, layers)
    from sequoia.models import check_tokenizers_match, load_model

    draft = load_model(spec, dtype=dtype, device=device, tokenizer=target.tokenizer is not None)
    if target.tokenizer is not None and draft.tokenizer is not None:
        check_tokenizers_match(target.tokenizer, draft.tokenizer)
    check_same_vocabulary(target.model, draft.model)
    return draft.model
