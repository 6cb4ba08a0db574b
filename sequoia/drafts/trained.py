"""Drafts trained on the target's own hidden states: the shared model base and the file format.

A trained draft predicts ``heads`` tree levels from the target's last-layer hidden states and
token embeddings; it scores a *reduced vocabulary* (the ``r`` most frequent target outputs)
and maps its candidates back to full-vocabulary ids, so a level costs an ``r``-row output
layer instead of the target's whole vocabulary. The model never proposes a token outside the
reduced vocabulary: in stochastic mode its ``q`` is zero there, which verification handles like
any other draft distribution (the output stays exactly the target's); only a context mix
(:mod:`sequoia.drafts.context_mix`, recorded in the card) can add such tokens.

On disk a draft is a directory (``sequoia-draft/1``)::

    card.json          kind, config, target, hidden width, vocabulary size, the reduced-
                       vocabulary id list, and free-form training / evaluation records
    draft.safetensors  the draft's own weights (bfloat16). The target's token embedding is
                       shared at load time, never stored.

Drafts that ship with the package live under ``sequoia/data/drafts/<name>/`` and load by name.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sequoia.drafts.context_mix import ContextMix
from sequoia.errors import ConfigError, FileFormatError, ModelError
from sequoia.prepack import prepack_linears
from sequoia.files import read_json, write_atomic, write_json_atomic

DRAFT_FORMAT = "sequoia-draft/1"
CARD, WEIGHTS = "card.json", "draft.safetensors"
DEFAULT_DRAFTS = {"smollm2-135m": "smollm2-135m-chimera"}  # target alias -> packaged draft name
NO_TOKEN = -1  # a token id before the start of the sequence: embeds as zeros


@dataclass(frozen=True)
class ReducedVocab:
    """The full-vocabulary ids a draft can propose, in output-row order."""

    ids: torch.Tensor  # [r] int64, distinct full-vocabulary ids
    vocab_size: int  # the target's full vocabulary

    def __post_init__(self) -> None:
        assert self.ids.ndim == 1 and self.ids.dtype == torch.long
        if len(self.ids) == 0 or len(torch.unique(self.ids)) != len(self.ids):
            raise FileFormatError("the reduced vocabulary must list distinct token ids")
        if int(self.ids.min()) < 0 or int(self.ids.max()) >= self.vocab_size:
            raise FileFormatError(f"the reduced vocabulary holds ids outside 0..{self.vocab_size - 1}")

    @property
    def size(self) -> int:
        return len(self.ids)

    @cached_property
    def index(self) -> torch.Tensor:  # [vocab] int64: row of each full id, -1 if absent
        table = torch.full((self.vocab_size,), -1, dtype=torch.long)
        table[self.ids] = torch.arange(self.size)
        return table

    @cached_property
    def rows(self) -> dict[int, int]:  # full id -> row, for lookups from Python
        return {int(t): row for row, t in enumerate(self.ids.tolist())}

    def to_full_probs(self, q: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:  # [m, c] -> [m, vocab]
        """Scatter probabilities over distinct full ids ``columns`` (default: the reduced
        vocabulary's) into the full vocabulary, zeros elsewhere; float32."""
        columns = self.ids if columns is None else columns
        assert q.ndim == 2 and q.shape[1] == len(columns)
        full = torch.zeros(q.shape[0], self.vocab_size, dtype=torch.float32, device=q.device)
        return full.index_copy_(1, columns.to(q.device), q.float())

    @classmethod
    def most_frequent(cls, tokens: np.ndarray, size: int, vocab_size: int, always: tuple[int, ...] = ()) -> ReducedVocab:
        """The ``size`` most frequent ids of ``tokens`` (ties: lower id first), ``always`` included.

        >>> ReducedVocab.most_frequent(np.array([5, 5, 2, 7, 7, 7]), 2, 10).ids.tolist()
        [7, 5]
        >>> ReducedVocab.most_frequent(np.array([5, 5, 2, 7, 7, 7]), 2, 10, always=(9,)).ids.tolist()
        [9, 7]
        """
        size = min(size, vocab_size)
        counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
        order = np.lexsort((np.arange(vocab_size), -counts))  # by count desc, then id
        forced = [t for t in dict.fromkeys(always) if 0 <= t < vocab_size]
        rest = [int(t) for t in order if int(t) not in set(forced)]
        return cls(torch.tensor((forced + rest)[:size], dtype=torch.long), vocab_size)


@dataclass(frozen=True)
class DraftConfig:
    """What every trained draft has; kinds subclass it with their own fields."""

    hidden_size: int  # the target's width
    vocab_size: int  # the target's full vocabulary
    heads: int  # tree levels the draft predicts = its maximum tree depth

    @classmethod
    def from_json(cls, data: Any, where: str) -> DraftConfig:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not names >= {"hidden_size", "vocab_size", "heads"}:
            raise FileFormatError(f"{where} has no valid 'config' (hidden_size, vocab_size, heads)")
        try:
            config = cls(**{k: int(v) for k, v in data.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise FileFormatError(f"{where} has a malformed 'config': {exc}") from None
        if min(config.hidden_size, config.vocab_size, config.heads) < 1:
            raise FileFormatError(f"{where}: hidden_size, vocab_size and heads must be positive")
        return config


class TrainedDraft(nn.Module):
    """Base of the trained draft models: reduced vocabulary, output layer, shared embedding.

    A subclass implements :meth:`unroll` (every level at once, teacher-forced, for training and
    evaluation) and :meth:`proposer` (the same computation grown level by level over a tree).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[DraftConfig]] = DraftConfig

    def __init__(self, config: DraftConfig, vocab: ReducedVocab) -> None:
        super().__init__()
        assert vocab.vocab_size == config.vocab_size
        self.config, self.vocab = config, vocab
        self.out = nn.Linear(config.hidden_size, vocab.size, bias=False)
        self._embedding: torch.Tensor | None = None  # [vocab, hidden] the target's, never saved

    # ------------------------------------------------------------------ the target's parts
    def attach_target(self, embedding: torch.Tensor) -> None:
        """Share the target's input embedding matrix ([vocab, hidden]); it is not copied."""
        assert embedding.shape == (self.config.vocab_size, self.config.hidden_size)
        self._embedding = embedding.detach()

    @torch.no_grad()
    def init_output_from(self, lm_head: torch.Tensor) -> None:
        """Start the output layer from the target's rows for the reduced vocabulary."""
        assert lm_head.shape == (self.config.vocab_size, self.config.hidden_size)
        self.out.weight.copy_(lm_head[self.vocab.ids.to(lm_head.device)].to(self.out.weight))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., hidden]
        """The target's embeddings of ``tokens`` in the draft's dtype; :data:`NO_TOKEN` -> zeros."""
        assert self._embedding is not None, "call attach_target() first"
        present = tokens >= 0
        rows = self._embedding[tokens.clamp(min=0).to(self._embedding.device)].to(self.out.weight)
        return rows * present.to(rows)[..., None]

    # ------------------------------------------------------------------ per kind
    def unroll_states(self, tokens: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced output-layer inputs of every level: ``[B, T] tokens, [B, T, hidden]
        -> heads x [B, T, hidden]``.

        Entry ``k`` (0-based) at position ``i`` scores token ``i + 1`` for a tree rooted at
        position ``i - k`` whose path follows the sequence; the target's hidden states are
        used up to position ``i - k - 1``, exactly what a proposal at that root has. Training
        applies :attr:`out` only where a loss is taken.
        """
        raise NotImplementedError

    def unroll(self, tokens: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`unroll_states` through the output layer: ``heads x [B, T, r]`` logits."""
        return [self.out(state) for state in self.unroll_states(tokens, hidden)]

    def proposer(self, mix=None):
        """The :class:`~sequoia.drafts.base.Proposer` that grows trees with this model, its
        candidates mixed with the context's n-grams by ``mix`` (a ``ContextMix``) if given."""
        raise NotImplementedError


def shift_right(x: torch.Tensor, steps: int = 1) -> torch.Tensor:  # [B, T, ...] -> [B, T, ...]
    """``out[:, i] = x[:, i - steps]``, zeros where ``i < steps`` (the sequence axis is 1)."""
    assert x.ndim >= 2 and steps >= 0
    if steps == 0:
        return x
    pad = torch.zeros_like(x[:, :steps])
    return torch.cat([pad, x[:, : x.shape[1] - steps]], dim=1)[:, : x.shape[1]]


def draft_kinds() -> dict[str, type[TrainedDraft]]:
    """Every trained-draft kind by name (imported lazily: the kinds import this module)."""
    from sequoia.drafts.chimera import ChimeraDraft
    from sequoia.drafts.mlp import MLPSpeculator

    return {cls.kind: cls for cls in (MLPSpeculator, ChimeraDraft)}


# ---------------------------------------------------------------------------- files
def packaged_drafts_dir() -> Path:
    return Path(str(resources.files("sequoia").joinpath("data/drafts")))


def packaged_drafts() -> list[str]:
    """Names of the drafts that ship inside the package."""
    root = packaged_drafts_dir()
    return sorted(p.name for p in root.iterdir() if (p / CARD).is_file()) if root.is_dir() else []


def default_draft(target: str) -> str:
    """The packaged draft made for ``target`` when it ships, else ``ngram``."""
    name = DEFAULT_DRAFTS.get(target)
    return name if name in packaged_drafts() else "ngram"


@dataclass(frozen=True)
class DraftLimits:
    """What the tree optimizer must know about a draft before it picks a tree."""

    max_depth: int | None = None  # deepest tree the draft can fill; None: any
    level_ms: dict[int, float] = field(default_factory=dict)  # ms per tree level by width; {}: unknown

    def cap(self, depth: int) -> int:
        """``depth``, lowered to the deepest tree the draft can fill."""
        return depth if self.max_depth is None else min(depth, self.max_depth)


def draft_limits(spec: str | os.PathLike) -> DraftLimits:
    """A trained draft's depth limit (its heads) and measured cost per level (from its card's
    evaluation); no limits for any other draft spec. Reads the card only, no weights."""
    directory = draft_dir(spec)
    if directory is None:
        return DraftLimits()
    card = read_card(directory)
    config = DraftConfig.from_json(card.get("config"), str(directory / CARD))
    costs = (card.get("evaluation") or {}).get("cost_ms_per_level") or {}
    try:
        level_ms = {int(w): float(ms) for w, ms in costs.items()}
    except (AttributeError, TypeError, ValueError):
        raise FileFormatError(f"{directory / CARD}: 'cost_ms_per_level' must map widths to milliseconds") from None
    return DraftLimits(config.heads, level_ms)


def draft_dir(spec: str | os.PathLike) -> Path | None:
    """The directory of a trained draft named by ``spec`` (packaged name or path), or None."""
    if str(spec) in packaged_drafts():
        return packaged_drafts_dir() / str(spec)
    path = Path(spec).expanduser()
    return path if (path / CARD).is_file() or (path / WEIGHTS).is_file() else None


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


def read_card(directory: Path) -> dict[str, Any]:
    card = read_json(directory / CARD) if (directory / CARD).is_file() else None
    if card is None:
        raise FileFormatError(f"{directory} is not a trained draft (missing {CARD}); train one with `sequoia draft train`")
    if not isinstance(card, dict) or card.get("format") != DRAFT_FORMAT:
        raise FileFormatError(f"{directory / CARD} is not a {DRAFT_FORMAT} card")
    return card


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


def load_trained_proposer(spec: str | os.PathLike, target, context_mix: bool = True):
    """The proposer of a trained draft for ``target`` (a ``PreTrainedModel``), on the target's
    device, in bfloat16 where that device computes it (else the target's dtype), with its
    linear weights packed once where that helps (:mod:`sequoia.prepack`), and its card's
    context mix (:mod:`sequoia.drafts.context_mix`) unless ``context_mix`` is false."""
    from sequoia.models import check_dtype_runs

    weight = target.get_input_embeddings().weight
    try:
        check_dtype_runs(torch.bfloat16, weight.device)
        dtype = torch.bfloat16
    except ConfigError:
        dtype = weight.dtype
    model = load_draft(spec, target).to(weight.device, dtype)
    prepack_linears(model)
    return model.proposer(load_context_mix(spec) if context_mix else None)


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
