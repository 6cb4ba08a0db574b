"""Draft proposers behind one interface (:class:`Proposer`); a ``--draft`` value resolves once
into a :class:`DraftSpec` that builds the proposer."""

from __future__ import annotations

from sequoia.drafts.base import Draft, DraftContext, NoDraft, Proposer, StepResult
from sequoia.drafts.lm import LMProposer
from sequoia.drafts.ngram import NgramProposer
from sequoia.drafts.spec import DraftSpec

__all__ = ["Draft", "DraftContext", "DraftSpec", "LMProposer", "NgramProposer", "NoDraft", "Proposer", "StepResult"]
