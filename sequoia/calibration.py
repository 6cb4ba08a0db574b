"""Measuring a draft's confidence against the target's acceptance, and tokens per step, through
the engine on held-out prompts.

Every tree node with children was scored by the target (one forward scores the whole tree), so
each of its children -- reached by verification or not -- gives one labelled *slot*: its depth,
the draft's confidence feature (:func:`sequoia.dynamic.slot_features`, recorded by the proposer
in ``features``) and how likely the target was to accept it, given its parent:

* greedy: 1 if the child's token is the target's argmax at the parent, else 0;
* stochastic: ``prod_{j < i} (1 - t_j) * t_i`` for the parent's i-th child, where ``t_j`` is the
  exact probability that verification accepts the j-th candidate once the earlier ones were
  rejected (:func:`sequoia.verify.candidate_tests`, no coin flipped): the probability that this
  child is the accepted one.

A slot's *weight* is the probability that verification reaches its parent (the product of the
labels on the parent's path; greedy: 1 on the target's own path, else 0). The quantities the
tree needs are conditional on reaching the parent, and a node under a rejected token sees a
context the target never continues: unweighted, such slots pull the deep rates down (by a
third at depth 4 here, 2026-12-06 in docs/experiments.md).

:func:`measure` decodes prompts with a trained proposer and returns those slots plus the
tokens per step (and, for a proposer that shapes its trees, what it predicted per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sequoia.drafts.base import Draft
from sequoia.dynamic import Calibration
from sequoia.engine import Engine, StepTimer
from sequoia.sampling import NodeProbs, SamplingConfig
from sequoia.tree import Tree
from sequoia.verify import Acceptance, candidate_tests


def slot_labels(
    tree: Tree,
    draft: Draft,
    target_logits: torch.Tensor,  # [n, vocab]
    sampling: SamplingConfig,
) -> tuple[np.ndarray, np.ndarray]:  # [n] labels (NaN at the root and childless parents' ...), [n] weights
    """Each node's acceptance label given its parent, and its weight: the probability that
    verification reaches its parent (module docstring). The root has label NaN."""
    assert target_logits.ndim == 2 and target_logits.shape[0] == tree.size
    labels = np.full(tree.size, np.nan)
    tokens = draft.tokens.tolist()
    p = None if sampling.greedy else NodeProbs(target_logits, sampling)
    for node, kids in enumerate(tree.children):
        if not kids:
            continue
        if sampling.greedy:
            best = int(target_logits[node].argmax())
            labels[list(kids)] = [float(tokens[c] == best) for c in kids]
            continue
        q = None if draft.probs is None else draft.probs[node]
        rejected_all = 1.0
        for child, accept in zip(kids, candidate_tests(p[node], q, [tokens[c] for c in kids])):
            labels[child] = rejected_all * accept
            rejected_all *= 1.0 - accept
    reach = np.ones(tree.size)  # P(verification reaches each node)
    weights = np.zeros(tree.size)
    for node in range(1, tree.size):
        weights[node] = reach[tree.parents[node]]
        reach[node] = weights[node] * labels[node]
    return labels, weights


@dataclass
class Measurement:
    """What :func:`measure` saw over all prompts."""

    steps: int = 0
    accepted: int = 0  # accepted draft tokens
    nodes: int = 0  # tree nodes verified (size of the trees drafted)
    predicted: list[float] = field(default_factory=list)  # per shaped step: 1 + sum of the kept values
    sorted_values: list[np.ndarray] = field(default_factory=list)  # per shaped step, every slot's value
    depths: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # the engine's sections

    @property
    def tokens_per_step(self) -> float:
        return 1.0 + self.accepted / max(self.steps, 1)

    def slots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(depths, features, labels, weights) of every labelled slot."""
        d, f, y, w = (np.concatenate(x) if x else np.zeros(0) for x in (self.depths, self.features, self.labels, self.weights))
        return d.astype(np.int64), f, y, w

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "tokens_per_step": round(self.tokens_per_step, 4),
            "mean_tree_size": round(self.nodes / max(self.steps, 1), 2),
            **({"predicted_tokens_per_step": round(float(np.mean(self.predicted)), 4)} if self.predicted else {}),
            "draft_ms_per_step": round(1e3 * self.seconds.get("draft", 0.0) / max(self.steps, 1), 2),
            "target_ms_per_step": round(1e3 * self.seconds.get("target", 0.0) / max(self.steps, 1), 2),
        }


class _RecordingEngine(Engine):
    """The engine, recording each step's labelled slots before verifying."""

    record: Measurement

    def _verify(self, tree: Tree, draft: Draft, logits: torch.Tensor) -> Acceptance:
        proposer, rec = self.proposer, self.record
        labels, weights = slot_labels(tree, draft, logits, self.sampling)
        keep = ~np.isnan(labels)
        rec.depths.append(tree.depths[keep])
        rec.features.append(proposer.features.numpy()[keep])
        rec.labels.append(labels[keep])
        rec.weights.append(weights[keep])
        if draft.tree is not None and proposer.slot_values is not None:
            values = proposer.slot_values.numpy()
            rec.sorted_values.append(values)
            rec.predicted.append(1.0 + float(values[: tree.size - 1].sum()))
        rec.nodes += tree.size
        return super()._verify(tree, draft, logits)


@torch.inference_mode()
def measure(
    target,
    proposer,
    prompts: Sequence[torch.Tensor],  # each [L] int64
    tree: Tree,
    sampling: SamplingConfig,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    seed: int = 0,
) -> Measurement:
    """Decode every prompt with ``proposer`` (a trained draft's, which records its slots'
    features) within ``tree``; the steps' acceptance, labelled slots and predictions."""
    record = Measurement()
    timer = StepTimer()
    for i, prompt in enumerate(prompts):
        engine = _RecordingEngine(target, proposer, tree, sampling, eos_token_ids=eos_token_ids, seed=seed + i, timer=timer)
        engine.record = record
        for _ in engine.generate(prompt, max_new_tokens):
            pass
        record.steps += engine.stats.steps
        record.accepted += sum(k * c for k, c in enumerate(engine.stats.accept_hist))
    record.seconds = timer.breakdown()
    return record


def fit(measurement: Measurement, mode: str, max_depth: int = 4, meta: dict[str, Any] | None = None) -> Calibration:
    """The calibration of the slots ``measurement`` labelled (depths past ``max_depth`` pooled:
    few slots are reached that deep, and acceptance given the parent hardly moves there)."""
    depths, features, labels, weights = measurement.slots()
    meta = {**(meta or {}), "slots": int(len(labels)), "weight": round(float(weights.sum()), 1)}
    return Calibration.fit(mode, features, depths, labels, max_depth, meta=meta, weights=weights)


def reliability(calibration: Calibration, measurement: Measurement) -> list[dict[str, Any]]:
    """Predicted vs measured acceptance per confidence bin (all depths pooled, slots weighted
    by the probability of reaching their parent) on slots not used for fitting: one row per
    bin that has slots."""
    depths, features, labels, weights = measurement.slots()
    predicted = np.concatenate([
        calibration.factor(torch.from_numpy(features[depths == d]).float(), int(d)).numpy() for d in np.unique(depths)
    ]) if len(depths) else np.zeros(0)
    order = np.concatenate([np.nonzero(depths == d)[0] for d in np.unique(depths)]) if len(depths) else np.zeros(0, int)
    labels, weights = labels[order], weights[order]
    edges = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001])
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        at = (predicted >= lo) & (predicted < hi) & (weights > 0)
        if weights[at].sum() > 0:
            w = weights[at]
            rows.append({"predicted": round(float((predicted[at] * w).sum() / w.sum()), 4),
                         "measured": round(float((labels[at] * w).sum() / w.sum()), 4),
                         "slots": int(at.sum()), "weight": round(float(w.sum()), 1)})
    return rows
