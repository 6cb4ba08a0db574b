"""How good and how cheap a trained draft is: held-out agreement per tree level, cost per level.

*Agreement* at level ``k`` is measured along the target's greedy continuation of held-out
prompts: at each root, with the path to depth ``k - 1`` following the target's own tokens,
does the draft's top-1 (top-4) at depth ``k`` contain the target's greedy token? That is the
greedy acceptance of the first (first four) candidates of a node, given that verification
got that deep -- the quantity the tree solver consumes. ``coverage`` is the share of those
target tokens inside the draft's reduced vocabulary: no candidate list can do better.

With a context mix (:mod:`sequoia.drafts.context_mix`) the agreement is that of the mixed
candidates, as the proposer makes them; the card also keeps the model's own.

*Cost* of a level of ``w`` nodes is measured on the real proposer (context mix included): the
time of a proposal for a root with ``w`` children that each get one child, minus that for a root
with ``w`` children -- i.e. one batched head forward over ``w`` nodes plus choosing their
candidates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from sequoia.device import fingerprint
from sequoia.drafts.base import DraftContext
from sequoia.drafts.context_mix import MAX_NGRAM, ContextMix, components, fit_weights, node_suffixes
from sequoia.drafts.training.features import FeatureCache, FeatureSet
from sequoia.drafts.heads import HeadsProposer
from sequoia.drafts.ngram import NgramIndex, Suffix
from sequoia.drafts.trained import TrainedDraft
from sequoia.drafts.registry import load_context_mix, load_draft, load_trained_proposer
from sequoia.models import LoadedModel
from sequoia.optimizer import STEP_KEY
from sequoia.drafts.registry import trained_draft_dtype
from sequoia.sampling import SamplingConfig
from sequoia.tree import Tree

TOP = (1, 4)
COST_TOKENS = 16  # distinct ids of the context a level is timed in
T = TypeVar("T")


@dataclass(frozen=True)
class LevelAgreement:
    """Agreement of one tree level with the target's greedy tokens."""

    level: int  # 1-based tree depth of the candidates
    positions: int
    top1: float
    top4: float
    coverage: float  # share of the target's tokens inside the reduced vocabulary


@torch.no_grad()
def agreement(
    model: TrainedDraft, features: FeatureSet, max_tokens: int = 4096, mix: ContextMix | None = None,
    levels: int | None = None,
) -> list[LevelAgreement]:
    """Held-out greedy agreement of every level of ``model`` (see the module docstring), of its
    candidates mixed with the context's n-grams by ``mix`` when given, as the proposer does;
    ``levels`` past ``heads`` for a recurrent draft."""
    levels = levels or model.config.heads
    hits = torch.zeros(levels, len(TOP) + 1, dtype=torch.long)  # top-1, top-4, covered
    counts = torch.zeros(levels, dtype=torch.long)
    ids, index = model.vocab.ids.to(model.out.weight.device), model.vocab.index.to(model.out.weight.device)
    lookup = None if mix is None else mix.lookup
    for level, logits, target, parts in scored_positions(model, features, lookup, mix.max_ngram if mix else 0, max_tokens, levels):
        if mix is None:
            best = ids[logits.topk(max(TOP), dim=-1).indices]  # [m, 4] full ids
        else:
            q, columns = mix.mix(logits.float().softmax(-1), parts, model.vocab.rows, ids)
            best = columns[q.topk(max(TOP), dim=-1).indices]
        for j, k in enumerate(TOP):
            hits[level, j] += int((best[:, :k] == target[:, None]).any(-1).sum())
        hits[level, -1] += int((index[target] >= 0).sum())
        counts[level] += len(target)
    rates = hits.double() / counts.clamp(min=1)[:, None]
    return [LevelAgreement(k + 1, int(counts[k]), *(float(x) for x in rates[k])) for k in range(levels)]


def scored_positions(
    model: TrainedDraft,
    features: FeatureSet,
    per_position: Callable[[NgramIndex, Suffix], T] | None = None,
    max_ngram: int = 0,
    max_tokens: int = 4096,
    levels: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[T]]]:
    """``(level, logits [m, r], target's greedy tokens [m], per-position values)`` for every
    level and every position decoding meets, teacher-forced along the target's tokens.

    ``per_position(index, suffix)`` sees what a proposal there would: the n-gram index of the
    sequence up to the root and the last ``max_ngram`` tokens up to the scored node.
    """
    device = model.out.weight.device
    for batch in features.batches(max_tokens):
        batch = batch.to(device)
        states = model.unroll_states(batch.tokens, batch.hidden, levels)
        masks = torch.stack([batch.mask(level, generated_only=True) for level in range(len(states))])  # [L, B, T]
        values: list[list[T]] = [[] for _ in states]  # per level, in the order tensor[mask] lists them
        if per_position is not None:
            for row, (text, scored) in enumerate(zip(batch.tokens.tolist(), masks.cpu().transpose(0, 1).tolist())):
                length = int(batch.lengths[row])
                for level, _, index, suffix in node_suffixes(text[:length], scored, max_ngram):
                    values[level].append(per_position(index, suffix))
        for level, (state, mask) in enumerate(zip(states, masks)):
            yield level, model.out(state[mask]), batch.top1[mask], values[level]


@torch.no_grad()
def fit_context_mix(model: TrainedDraft, features: FeatureSet, max_ngram: int = MAX_NGRAM) -> tuple[ContextMix, int]:
    """The :class:`ContextMix` weights that maximise the likelihood of the target's greedy
    tokens over ``features`` (all levels pooled), and the number of positions fitted on."""
    q_target, p_target, matched = [], [], []
    found = partial(components, max_ngram=max_ngram)
    for _, logits, target, comps in scored_positions(model, features, found, max_ngram):
        rows = model.vocab.index.to(target.device)[target]
        q = logits.float().softmax(-1).gather(1, rows.clamp(min=0)[:, None])[:, 0]
        q_target.append(torch.where(rows >= 0, q, 0.0).cpu())
        p, m = torch.zeros(len(target), max_ngram, dtype=torch.float64), torch.zeros(len(target), max_ngram, dtype=torch.bool)
        for j, (per_n, token) in enumerate(zip(comps, target.tolist())):
            m[j, : len(per_n)] = True
            for n, followers in enumerate(per_n):
                p[j, n] = followers.get(token, 0.0)
        p_target.append(p)
        matched.append(m)
    q_target, p_target, matched = torch.cat(q_target), torch.cat(p_target), torch.cat(matched)
    return fit_weights(q_target, p_target, matched), len(q_target)


STEP_TOKENS = 2  # tokens a decoding step accepts, about: what each timed proposal ingests first
EVICT_BYTES = 128 << 20  # read before each timed proposal: the target's forward evicts the draft from cache


def level_costs(
    proposer: HeadsProposer,
    widths: Sequence[int] = tuple(range(1, 17)),
    prefix: int = 256,
    repeats: int = 20,
    seed: int = 0,
    threads: int | None = None,
) -> dict[int, float]:
    """Milliseconds per tree level of ``w`` nodes, for each ``w`` in ``widths``, of a trained
    draft's ``proposer``, and under key ``0`` its cost per step beyond its levels (see
    :func:`sequoia.optimizer.draft_step_ms`): greedy, the minimum over ``repeats`` interleaved
    timings, which a busy machine inflates least. Each timed proposal first takes in
    :data:`STEP_TOKENS` new context tokens and finds its weights out of the CPU's caches, as it
    does after every decoding step (the target's forward streams through them); the context
    repeats ``COST_TOKENS`` token ids, so a context mix finds matches at every node (its
    slowest case).

    ``threads`` sets torch's CPU threads while timing; the default leaves them as they are,
    which is how the engine runs the draft and how a device profile times the target, so the
    tree optimizer adds like to like.
    """
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _level_costs(proposer, widths, prefix, repeats, seed)
    finally:
        torch.set_num_threads(saved)


@torch.inference_mode()
def _level_costs(proposer: HeadsProposer, widths: Sequence[int], prefix: int, repeats: int, seed: int) -> dict[int, float]:
    model = proposer.model
    gen = torch.Generator().manual_seed(seed)
    total = prefix + 2 * STEP_TOKENS
    tokens = model.vocab.ids[torch.randint(0, min(COST_TOKENS, model.vocab.size), (total,), generator=gen)]
    hidden = torch.randn(total - 1, model.config.hidden_size, generator=gen).to(model.out.weight)

    def context(length: int) -> DraftContext:
        return DraftContext(tokens[:length], SamplingConfig(), gen, hidden_states=hidden[: length - 1])

    proposer.warmup()
    cuda = model.out.weight.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    evict = (lambda: None) if cuda else torch.ones(EVICT_BYTES // 4).sum
    level, flat_ms = {}, {}
    for w in widths:
        deeper, flat = Tree.from_children_counts([w] + [1] * w), Tree.from_children_counts([w])
        best = {deeper: float("inf"), flat: float("inf")}
        for _ in range(repeats + 1):
            proposer.reset()
            proposer.propose(context(prefix), flat)  # the context so far, untimed
            for i, tree in enumerate((deeper, flat), start=1):
                ctx = context(prefix + i * STEP_TOKENS)
                evict()
                sync()
                start = time.perf_counter()
                proposer.propose(ctx, tree)
                sync()
                best[tree] = min(best[tree], time.perf_counter() - start)
        level[w], flat_ms[w] = max(best[deeper] - best[flat], 0.0) * 1e3, best[flat] * 1e3
    proposer.reset()
    first = min(widths)
    return {STEP_KEY: flat_ms[first] - level[first], **level}


def evaluation_record(
    levels: Sequence[LevelAgreement],
    costs: dict[int, float],
    held_out_tokens: int,
    device: torch.device | str,
    draft_only: Sequence[LevelAgreement] | None = None,
) -> dict[str, Any]:
    """The card's ``evaluation`` entry; ``levels`` are the proposer's (context mix included),
    ``draft_only`` the trained model's alone where a context mix is used."""
    return {
        "held_out": f"built-in prompts, target greedy continuations of {held_out_tokens} tokens",
        "positions": levels[0].positions if levels else 0,
        "levels": [asdict(a) for a in levels],
        **({"levels_draft_only": [asdict(a) for a in draft_only]} if draft_only is not None else {}),
        "cost_ms_per_level": {str(w): round(ms, 3) for w, ms in costs.items()},
        "cost_dtype": trained_draft_dtype(str(torch.device(device).type)),
        "cost_device": str(device),
        "cost_threads": torch.get_num_threads(),
        # the costs are used as they are only on this device (sequoia.draft_costs.device_draft_costs)
        "cost_fingerprint": fingerprint(device),
    }


def evaluate_draft(spec: str | os.PathLike, loaded: LoadedModel, work: str | os.PathLike, held_out_tokens: int = 128) -> dict[str, Any]:
    """Held-out agreement per level and bfloat16 cost per level of the draft ``spec`` for the
    target ``loaded`` (held-out features cached in ``work``): the card's ``evaluation``."""
    model = load_draft(spec, loaded.model).to(loaded.device)
    held_out = FeatureCache(work, loaded).held_out(max_new_tokens=held_out_tokens)
    mix = load_context_mix(spec)
    levels = agreement(model, held_out, mix=mix)
    draft_only = None if mix is None else agreement(model, held_out)
    costs = level_costs(load_trained_proposer(spec, loaded.model))
    return evaluation_record(levels, costs, held_out_tokens, loaded.device, draft_only)


def measure_acceptance(
    spec: str | os.PathLike,
    loaded: LoadedModel,
    width: int = 8,
    temperature: float = 1.0,
    limit: int | None = None,
    max_new_tokens: int = 64,
    max_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The draft's positional acceptance vector on the built-in prompts (stochastic at
    ``temperature``, greedy at 0), per tree depth (``by_depth``: its heads differ), and the
    tokens per step the optimal tree of at most ``max_size`` nodes and the draft's depth
    predicts with it: the card's ``acceptance`` entry."""
    from sequoia.acceptance import AcceptanceResult, measure_counts_by_depth
    from sequoia.models import eos_token_ids
    from sequoia.prompts import load_prompts, render_prompt
    from sequoia.solver import solve

    proposer = load_trained_proposer(spec, loaded.model)
    prompts = load_prompts("builtin", limit)
    ids = [torch.tensor(render_prompt(loaded.tokenizer, p.text, True)) for p in prompts]
    depth = proposer.max_depth
    counts, samples = measure_counts_by_depth(
        loaded.model, proposer, ids, width, SamplingConfig(temperature), depth, max_new_tokens,
        eos_token_ids(loaded.model, loaded.tokenizer), seed, progress,
    )
    mode = "greedy" if temperature == 0 else "stochastic"
    result = AcceptanceResult.from_depth_counts(
        counts, samples, target=loaded.name, draft=str(spec), mode=mode, temperature=temperature,
        top_p=1.0, prompts=f"builtin ({len(prompts)} prompts, {max_new_tokens} tokens each)",
    )
    predicted = float(solve(result.for_solver, max_size, depth).values[max_size, depth])
    return {
        **result.to_json(),
        "optimal_tree": {"max_size": max_size, "max_depth": depth, "expected_tokens_per_step": round(predicted, 4)},
    }
