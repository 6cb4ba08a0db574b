"""A ``--draft`` value resolved once into what every layer needs.

The spec string is parsed here and nowhere else; commands make one :class:`DraftSpec` at the
edge and pass it down::

    spec = DraftSpec.resolve(None, "smollm2-135m")   # the target's default: its packaged draft
    spec.kind                                         # "trained"
    spec.limits.cap(8)                                # 4: a trained draft fills its heads' levels
                                                      # (its cost per level is priced per device:
                                                      # sequoia.draft_costs.device_draft_costs)
    proposer = spec.proposer(loaded_target)           # weights load only here

Kinds: ``none`` (plain decoding), ``ngram`` (prompt lookup), ``early-exit`` (the target's first
N layers, ``early-exit:N``), ``trained`` (a packaged name or a ``sequoia draft train``
directory; ``NAME:per-step`` shapes its tree every step with the calibration in its card,
:mod:`sequoia.dynamic`) and ``lm`` (any other model spec, a causal LM sharing the target's tokenizer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sequoia.drafts.base import NoDraft, Proposer
from sequoia.drafts.card import CARD, draft_dir, read_card
from sequoia.drafts.early_exit import early_exit_model, parse_spec
from sequoia.drafts.lm import LMProposer, check_same_vocabulary
from sequoia.drafts.ngram import NgramProposer
from sequoia.drafts.trained import DraftConfig
from sequoia.errors import FileFormatError
from sequoia.optimizer import DraftLimits

KINDS = ("none", "ngram", "early-exit", "trained", "lm")
PER_STEP = ":per-step"  # suffix of a trained draft's spec: per-step trees (sequoia.dynamic)


@dataclass(frozen=True)
class DraftSpec:
    """What a draft spec names: its kind, where a trained draft lives, and its limits."""

    name: str  # the spec as given (or the target's default)
    kind: str  # one of KINDS
    directory: Path | None = None  # a trained draft's directory
    card: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # its card
    limits: DraftLimits = field(default_factory=DraftLimits)
    per_step: bool = False  # a trained draft shaping its tree every step

    def __str__(self) -> str:
        return self.name

    @classmethod
    def resolve(cls, spec: str | os.PathLike | None, target: str) -> DraftSpec:
        """Parse ``spec``; None names ``target``'s default draft (its packaged trained draft
        where one ships, else ``ngram``). Reads a trained draft's card, never its weights."""
        from sequoia.drafts.registry import default_draft

        name = default_draft(target) if spec is None else str(spec)
        if name in ("none", "ngram"):
            return cls(name, name)
        if parse_spec(name) is not None:
            return cls(name, "early-exit")
        per_step = name.endswith(PER_STEP)
        directory = draft_dir(name.removesuffix(PER_STEP))
        if directory is None:
            if per_step:
                raise FileFormatError(f"{name}: {PER_STEP} follows a trained draft's name or directory")
            return cls(name, "lm")
        card = read_card(directory)
        if per_step and "per_step_trees" not in card:
            raise FileFormatError(
                f"{directory / CARD} has no per-step tree calibration; measure one with scripts/per_step_trees.py"
            )
        if per_step:
            _per_step_gains(card, directory / CARD)  # a malformed entry fails here, in one line
        return cls(name, "trained", directory, card, _card_limits(card, directory / CARD), per_step)

    def per_step_gain(self, greedy: bool) -> tuple[tuple[int, float], ...]:
        """For a per-step draft, its card's measured tokens per step of per-step trees over static
        ones by tree size, greedy or sampled (:attr:`DraftLimits.per_step_gain`); else ()."""
        if not self.per_step or self.card is None:
            return ()
        return _per_step_gains(self.card, self.directory / CARD)["greedy" if greedy else "stochastic"]

    def proposer(self, target, dtype: str = "float32", device: str = "cpu") -> Proposer:
        """The proposer for ``target`` (a :class:`~sequoia.models.LoadedModel`): a trained draft
        runs in bfloat16 where the device can; a draft with another tokenizer or vocabulary
        raises :class:`~sequoia.errors.ModelError`."""
        if self.kind == "none":
            return NoDraft()
        if self.kind == "ngram":
            return NgramProposer()
        if self.kind == "trained":
            from sequoia.drafts.registry import load_trained_proposer

            shaper = None
            if self.per_step:
                from sequoia.dynamic import TreeShaper

                shaper = TreeShaper.from_json(self.card["per_step_trees"], str(self.directory / CARD))
            return load_trained_proposer(self.directory, target.model, shaper=shaper)
        return LMProposer(self.causal_lm(target, dtype, device))

    def causal_lm(self, target, dtype: str = "float32", device: str = "cpu"):
        """The causal LM behind an ``early-exit`` or ``lm`` draft (early exit shares the
        target's weights; a model is checked to share its tokenizer and vocabulary)."""
        layers = parse_spec(self.name)
        if layers is not None:
            return early_exit_model(target.model, layers)
        from sequoia.models import check_tokenizers_match, load_model

        draft = load_model(self.name, dtype=dtype, device=device, tokenizer=target.tokenizer is not None)
        if target.tokenizer is not None and draft.tokenizer is not None:
            check_tokenizers_match(target.tokenizer, draft.tokenizer)
        check_same_vocabulary(target.model, draft.model)
        return draft.model


def _card_limits(card: dict[str, Any], where: Path) -> DraftLimits:
    """A trained draft's depth limit (its heads; none if recurrent). Its card's cost per level is
    checked here but priced only on the device it was measured on
    (:func:`sequoia.draft_costs.device_draft_costs` reads it with the card's fingerprint), so the
    limits carry no cost."""
    config = DraftConfig.from_json(card.get("config"), str(where))
    costs = (card.get("evaluation") or {}).get("cost_ms_per_level") or {}
    try:
        {int(w): float(ms) for w, ms in costs.items()}
    except (AttributeError, TypeError, ValueError):
        raise FileFormatError(f"{where}: 'cost_ms_per_level' must map widths to milliseconds") from None
    return DraftLimits(config.max_depth)


def _per_step_gains(card: dict[str, Any], where: Path) -> dict[str, tuple[tuple[int, float], ...]]:
    """``per_step_trees.gain`` of a card: ``{"greedy": {size: gain}, "stochastic": {...}}``
    (either may be missing: no gain known)."""
    gains = card.get("per_step_trees", {}).get("gain") or {}
    try:
        return {mode: tuple(sorted((int(n), float(g)) for n, g in (gains.get(mode) or {}).items()))
                for mode in ("greedy", "stochastic")}
    except (AttributeError, TypeError, ValueError):
        raise FileFormatError(f"{where}: 'per_step_trees.gain' must map modes to {{tree size: gain}}") from None
