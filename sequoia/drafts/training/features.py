"""What a trained draft learns from: the target's last hidden states over token sequences.

One teacher-forced target pass over each sequence gives, per position ``i``: the last-layer
hidden state ``h[i]`` (after the final norm, so ``logits = W_out @ h``), the log-sum-exp of
those logits (so the target's log-probability of any token is ``W_out[t] @ h[i] - lse[i]``
without storing the logits) and the target's greedy token ``top1[i]``.

A :class:`FeatureSet` holds them flat for many sequences; :class:`FeatureCache` keeps them on
disk in a training work directory (safetensors chunks), so repeated epochs, resumed runs and
a grown data store never recompute the target. Held-out data is the built-in evaluation
prompts (disjoint from the training prompts) with the target's *greedy* continuations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sequoia.drafts.training.data import DataStore, left_padded
from sequoia.drafts.trained import NO_TOKEN
from sequoia.errors import ConfigError, FileFormatError
from sequoia.models import LoadedModel, dtype_name
from sequoia.prompts import load_prompts, render_prompt
from sequoia.files import read_json, write_atomic, write_json_atomic

CHUNK = 64  # sequences per cached feature file
LOGIT_ROWS = 1024  # positions whose full logits are formed at once (memory bound)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class FeatureBatch:
    """Padded sequences with the target's features (padding: token ``NO_TOKEN``, zeros)."""

    tokens: torch.Tensor  # [B, T] int64
    hidden: torch.Tensor  # [B, T, hidden] the target's last hidden state at each position
    lse: torch.Tensor  # [B, T] float32 log-sum-exp of the target's logits
    top1: torch.Tensor  # [B, T] int64 the target's greedy token after each position
    lengths: torch.Tensor  # [B] int64
    prompt_lens: torch.Tensor  # [B] int64

    def __post_init__(self) -> None:
        assert self.tokens.ndim == 2 and self.hidden.shape[:2] == self.tokens.shape
        assert self.lse.shape == self.top1.shape == self.tokens.shape and self.lengths.ndim == 1

    def mask(self, level: int, generated_only: bool) -> torch.Tensor:  # [B, T] bool
        """Positions ``i`` that score token ``i + 1`` at tree level ``level + 1``: the token
        exists and the root ``i - level`` is in the sequence; ``generated_only`` keeps the roots
        decoding meets (the last prompt token onwards: ``i - level >= prompt_len - 1``)."""
        i = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :]
        keep = (i >= level) & (i <= self.lengths[:, None] - 2)
        if generated_only:
            keep &= i - level >= self.prompt_lens[:, None] - 1
        return keep

    def to(self, device: torch.device | str) -> FeatureBatch:
        return FeatureBatch(*(t.to(device) for t in (self.tokens, self.hidden, self.lse, self.top1, self.lengths, self.prompt_lens)))


@dataclass(frozen=True)
class FeatureSet:
    """Target features of many sequences, stored flat."""

    tokens: torch.Tensor  # [N] int64, all sequences concatenated
    hidden: torch.Tensor  # [N, hidden] bfloat16
    lse: torch.Tensor  # [N] float32
    top1: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [S + 1] int64, sequence s is offsets[s]:offsets[s + 1]
    prompt_lens: torch.Tensor  # [S] int64

    def __post_init__(self) -> None:
        assert self.tokens.ndim == 1 and self.hidden.shape[0] == len(self.tokens) == len(self.lse) == len(self.top1)
        assert len(self.offsets) == len(self.prompt_lens) + 1

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> torch.Tensor:  # [S]
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def generated_positions(self) -> int:
        """Continuation tokens: what the data store counts as positions."""
        return int((self.lengths - self.prompt_lens).sum())

    def generated_tokens(self) -> np.ndarray:  # [generated_positions] int64
        starts = (self.offsets[:-1] + self.prompt_lens).tolist()
        ends = self.offsets[1:].tolist()
        return torch.cat([self.tokens[a:b] for a, b in zip(starts, ends)]).numpy()

    def batch(self, indices: Sequence[int]) -> FeatureBatch:
        """Sequences ``indices`` padded to the longest."""
        lengths = self.lengths[list(indices)]
        size, width = len(indices), int(lengths.max())
        tokens = torch.full((size, width), NO_TOKEN, dtype=torch.long)
        hidden = torch.zeros(size, width, self.hidden.shape[1], dtype=self.hidden.dtype)
        lse, top1 = torch.zeros(size, width), torch.zeros(size, width, dtype=torch.long)
        for row, s in enumerate(indices):
            a, b = int(self.offsets[s]), int(self.offsets[s + 1])
            tokens[row, : b - a], hidden[row, : b - a] = self.tokens[a:b], self.hidden[a:b]
            lse[row, : b - a], top1[row, : b - a] = self.lse[a:b], self.top1[a:b]
        return FeatureBatch(tokens, hidden, lse, top1, lengths, self.prompt_lens[list(indices)])

    def sample(self, sequences: int, seed: int = 0) -> FeatureSet:
        """``sequences`` sequences drawn at random without replacement (all when fewer)."""
        order = torch.randperm(self.num_sequences, generator=torch.Generator().manual_seed(seed))[:sequences]
        parts = []
        for s in sorted(order.tolist()):
            a, b = int(self.offsets[s]), int(self.offsets[s + 1])
            flat = {name: getattr(self, name)[a:b] for name in _FIELDS if name not in ("offsets", "prompt_lens")}
            parts.append(FeatureSet(offsets=torch.tensor([0, b - a]), prompt_lens=self.prompt_lens[s : s + 1], **flat))
        return FeatureSet.concat(parts)

    def random_batch(self, generator: torch.Generator, max_tokens: int) -> FeatureBatch:
        """Random sequences (at least one) until the padded batch would exceed ``max_tokens``."""
        order = torch.randperm(self.num_sequences, generator=generator).tolist()
        chosen, longest = [order[0]], int(self.lengths[order[0]])
        for s in order[1:]:
            longest_if = max(longest, int(self.lengths[s]))
            if longest_if * (len(chosen) + 1) > max_tokens:
                break
            chosen.append(s)
            longest = longest_if
        return self.batch(chosen)

    def batches(self, max_tokens: int) -> Iterable[FeatureBatch]:
        """Every sequence once, in order, in batches of about ``max_tokens`` padded tokens."""
        start = 0
        while start < self.num_sequences:
            end = start + 1
            while end < self.num_sequences and int(self.lengths[start : end + 1].max()) * (end + 1 - start) <= max_tokens:
                end += 1
            yield self.batch(range(start, end))
            start = end

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        tensors = {name: getattr(self, name).contiguous() for name in _FIELDS}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        try:
            tensors = load_file(str(path))
            return cls(**{name: tensors[name] for name in _FIELDS})
        except (OSError, SafetensorError, KeyError, AssertionError) as exc:
            raise FileFormatError(f"cached features {path} are corrupt ({exc}); delete the file to recompute") from None

    @classmethod
    def concat(cls, parts: Sequence[FeatureSet]) -> FeatureSet:
        if not parts:
            raise ConfigError("no sequences to train on: the data store is empty; run `sequoia draft data` first")
        shift = torch.cumsum(torch.tensor([0] + [len(p.tokens) for p in parts[:-1]]), 0)
        offsets = torch.cat([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
        flat = {name: torch.cat([getattr(p, name) for p in parts]) for name in _FIELDS if name != "offsets"}
        return cls(offsets=offsets, **flat)


_FIELDS = ("tokens", "hidden", "lse", "top1", "offsets", "prompt_lens")


@torch.inference_mode()
def extract_features(
    loaded: LoadedModel, sequences: Sequence[tuple[np.ndarray, int]], max_tokens: int = 4096
) -> FeatureSet:
    """One teacher-forced target pass over ``(token ids, prompt length)`` pairs, batched."""
    model, device = loaded.model, loaded.device
    head = model.get_output_embeddings()
    parts = []
    for batch in _length_batches(sequences, max_tokens):
        width = max(len(s) for s, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (seq, _) in enumerate(batch):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.as_tensor(seq), 1
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for row, (seq, plen) in enumerate(batch):
            h = hidden[row, : len(seq)]
            lse, top1 = zip(*(_lse_top1(head(h[a : a + LOGIT_ROWS])) for a in range(0, len(seq), LOGIT_ROWS)))
            parts.append(
                FeatureSet(
                    torch.as_tensor(seq, dtype=torch.long), h.to("cpu", torch.bfloat16), torch.cat(lse).cpu(),
                    torch.cat(top1).cpu(), torch.tensor([0, len(seq)]), torch.tensor([plen]),
                )
            )
    return FeatureSet.concat(parts)


def _lse_top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [m, vocab] -> [m], [m]
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1), logits.argmax(dim=-1)


def _length_batches(sequences: Sequence[tuple[np.ndarray, int]], max_tokens: int):
    batch: list[tuple[np.ndarray, int]] = []
    for item in sequences:
        if batch and max(len(s) for s, _ in batch + [item]) * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.inference_mode()
def greedy_continuations(
    loaded: LoadedModel, prompt_ids: Sequence[list[int]], max_new_tokens: int, batch_size: int = 8
) -> list[tuple[np.ndarray, int]]:
    """The target's greedy continuations (cut after EOS) of tokenised prompts."""
    tok, model = loaded.tokenizer, loaded.model
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = []
    for a in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[a : a + batch_size]
        ids, mask, pad = left_padded(chunk, tok)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad,
        )[:, width:].cpu().tolist()
        for x, cont in zip(chunk, gen):
            stop = next((i for i, t in enumerate(cont) if t in eos_ids), None)
            cont = cont if stop is None else cont[: stop + 1]
            out.append((np.asarray(x + cont, dtype=np.int64), len(x)))
    return out


class FeatureCache:
    """Cached target features in a training work directory, made for one target."""

    def __init__(self, root: str | os.PathLike, loaded: LoadedModel) -> None:
        self.root, self.loaded = Path(root) / "features", loaded
        emb = loaded.model.get_input_embeddings().weight
        meta = {"target": loaded.name, "dtype": dtype_name(loaded.dtype), "hidden_size": int(emb.shape[1]), "vocab_size": int(emb.shape[0])}
        path = self.root / "meta.json"
        if path.is_file() and read_json(path) != meta:
            raise ConfigError(f"{self.root} holds features of another target or dtype ({read_json(path)}); use another --work directory")
        write_json_atomic(path, meta)

    def train(
        self, stores: Sequence[DataStore], progress: Progress | None = None, limit: int | Sequence[int] | None = None
    ) -> FeatureSet:
        """Features of every sequence of ``stores`` (with ``limit``: of each store's first
        ``limit`` sequences -- one number for all or one per store -- rounded up to whole cached
        chunks), in order; chunks already cached are read back."""
        limits = limit if isinstance(limit, Sequence) else [limit] * len(stores)
        if len(limits) != len(stores):
            raise ConfigError(f"give one sequence limit per data store ({len(stores)}), or one for all")
        return FeatureSet.concat([self._store(store, progress, n) for store, n in zip(stores, limits)])

    def _store(self, store: DataStore, progress: Progress | None, limit: int | None = None) -> FeatureSet:
        """One store's features, cached in a folder named after the store's directory."""
        if store.manifest.target != self.loaded.name:
            raise ConfigError(f"the data store {store.root} was sampled from {store.manifest.target}, not {self.loaded.name}")
        folder = self.root / _file_name(store.root.resolve().name)
        source = folder / "source.json"
        if source.is_file() and read_json(source) != store.manifest.identity():
            raise ConfigError(
                f"{folder} caches another data store named {store.root.name!r} (made with {read_json(source)}); "
                "rename the store or use another --work directory"
            )
        write_json_atomic(source, store.manifest.identity())
        sequences = list(store.sequences())
        if limit is not None:
            sequences = sequences[: -(-limit // CHUNK) * CHUNK]  # a partial chunk would overwrite the cached one
        parts, total = [], len(sequences)
        for index, start in enumerate(range(0, total, CHUNK)):
            chunk = sequences[start : start + CHUNK]
            path = folder / f"train-{index:05d}.safetensors"
            part = FeatureSet.load(path) if path.is_file() else None
            if part is None or part.num_sequences != len(chunk):
                part = extract_features(self.loaded, chunk)
                part.save(path)
            parts.append(part)
            if progress is not None:
                progress(start + len(chunk), total, f"target features of {store.root.name} (sequences)")
        return FeatureSet.concat(parts)

    def held_out(self, prompts: str = "builtin", max_new_tokens: int = 128, chat: bool = True) -> FeatureSet:
        """Features of the target's greedy continuations of the evaluation prompts."""
        path = self.root / f"eval-{_file_name(Path(prompts).name)}-{max_new_tokens}-{'chat' if chat else 'plain'}.safetensors"
        if path.is_file():
            return FeatureSet.load(path)
        ids = [render_prompt(self.loaded.tokenizer, p.text, chat) for p in load_prompts(prompts)]
        features = extract_features(self.loaded, greedy_continuations(self.loaded, ids, max_new_tokens))
        features.save(path)
        return features


def _file_name(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
