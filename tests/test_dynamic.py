"""Per-step trees (sequoia/dynamic.py) and the recurrent Chimera that fills any depth.

The stochastic checks reuse the chi-square machinery of test_engine_stochastic: an 8-token
target whose exact joint law of the first 3 tokens is enumerated. The draft is a random
recurrent Chimera over all 8 tokens, so its q depends on every path token; its per-step trees
use a calibration that makes the shape vary from step to step. A shaping policy that peeks at
the target (keeping only the children the target would surely accept) must fail the test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sequoia.calibration import fit, measure, reliability, slot_labels
from sequoia.drafts.base import Draft
from sequoia.drafts.card import save_draft, update_card
from sequoia.drafts.spec import DraftSpec
from sequoia.dynamic import Calibration, TreeShaper, expected_tokens_curve, selected_tree, slot_features, top_slots
from sequoia.engine import Engine
from sequoia.errors import ConfigError, FileFormatError, ModelError
from sequoia.models import LoadedModel, tiny_llama
from sequoia.sampling import SamplingConfig, logits_to_probs
from sequoia.tree import Tree
from test_engine_stochastic import PROMPT, VOCAB, TableLM, chi2_pvalue, engine_counts, exact_joint
from trained_draft_helpers import check_greedy_lossless, check_tree_matches_unroll, random_draft

BUDGET = Tree.from_children_counts([3, 1, 1, 1, 1])  # 6 nodes, depth 3: the per-step trees' budget
# Steep calibration: a confident draft goes deep, a hesitant one goes wide.
STEEP = Calibration("stochastic", (0.0, 0.2, 0.4, 1.0), ((0.05, 0.4, 0.9),) * 2, ((1, 1, 1),) * 2)
SHAPER = TreeShaper(Calibration("greedy", STEEP.edges, STEEP.table, STEEP.counts), STEEP, width=3, beam=2)


class HiddenTableLM(TableLM):
    """TableLM that reports zero hidden states of the reference's width (a trained draft reads them)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None,
                output_hidden_states=False, logits_to_keep=0):
        out = super().forward(input_ids, attention_mask, position_ids, use_cache, cache, output_hidden_states, logits_to_keep)
        if output_hidden_states:
            out.hidden_states = (torch.zeros(1, input_ids.shape[1], self.config.hidden_size),)
        return out


@pytest.fixture(scope="module")
def table_target():
    return HiddenTableLM(tiny_llama(seed=0, vocab_size=VOCAB))


@pytest.fixture(scope="module")
def small_draft(table_target):
    return random_draft("chimera", table_target.reference, heads=2, ids=list(range(VOCAB)), seed=5, recurrent=True)


@pytest.fixture(scope="module")
def recurrent(tiny_target):
    return random_draft("chimera", tiny_target, heads=2, recurrent=True)


# ---------------------------------------------------------------------- selection
def test_top_slots_break_ties_toward_the_earlier_slot():
    values = torch.tensor([0.5, 0.2, 0.5, 0.1, 0.2])
    assert top_slots(values, 3).tolist() == [0, 1, 2]  # 0.5, 0.5, then the first 0.2
    assert top_slots(values, 9).tolist() == [0, 1, 2, 3, 4]


def test_the_selected_slots_form_the_best_tree():
    # root -> slots 0, 1 (depth 1); slot 0 -> slots 2, 3; slot 1 -> slot 4 (depth 2); monotone values
    parents, depths = [-1, -1, 0, 0, 1], [1, 1, 2, 2, 2]
    values = torch.tensor([0.6, 0.3, 0.5, 0.1, 0.25])
    tree, slots = selected_tree(parents, depths, top_slots(values, 3))
    assert tree.parents == (-1, 0, 0, 1) and slots == [-1, 0, 1, 2]  # 0.6 + 0.5 + 0.3
    best = max(  # brute force over all connected 3-slot subsets
        sum(float(values[s]) for s in subset)
        for subset in itertools.combinations(range(5), 3)
        if all(parents[s] == -1 or parents[s] in subset for s in subset)
    )
    assert abs(float(values[slots[1:]].sum()) - best) < 1e-6


def test_slot_features():
    q = torch.tensor([[0.5, 0.3, 0.2]])
    assert torch.equal(slot_features(q, torch.tensor([[0, 2]]), greedy=True), torch.tensor([[0.5, 0.2]]))
    stochastic = slot_features(q, torch.tensor([[1, 0]]), greedy=False)  # before each draw
    assert torch.allclose(stochastic, torch.tensor([[0.38, 0.38 - 0.09]]))


def test_calibration_fit_is_monotone_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.random(4000)
    labels = (rng.random(4000) < f).astype(float)  # acceptance = the feature itself
    cal = Calibration.fit("greedy", f, rng.integers(1, 4, 4000), labels, max_depth=3)
    for row in cal.table:
        assert all(a <= b + 1e-12 for a, b in zip(row, row[1:]))
    assert abs(float(cal.factor(torch.tensor([0.85]), 2)) - 0.85) < 0.08
    cal.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == cal


def test_expected_tokens_curve():
    curve = expected_tokens_curve([np.array([0.9, 0.5, 0.1])], 4)
    assert np.allclose(curve[1:], [1.0, 1.9, 2.4, 2.5])


# ---------------------------------------------------------------------- recurrent draft
def test_a_recurrent_draft_fills_trees_deeper_than_its_heads(recurrent, tiny_target):
    deep = Tree.from_children_counts([2, 1, 1, 2, 1, 1, 1])  # depth 5 > 2 heads
    check_tree_matches_unroll(recurrent, tiny_target, deep)


def test_a_plain_draft_still_refuses_deeper_trees(tiny_target):
    plain = random_draft("chimera", tiny_target, heads=2)
    with pytest.raises(ConfigError, match="--max-depth 2"):
        check_tree_matches_unroll(plain, tiny_target, Tree((-1, 0, 1, 2)))


def test_only_chimera_can_be_recurrent(tiny_target):
    with pytest.raises(FileFormatError, match="cannot be recurrent"):
        random_draft("mlp", tiny_target, recurrent=True)


def test_a_recurrent_draft_for_another_target_is_refused(recurrent, tmp_path):
    save_draft(recurrent, tmp_path / "d", "tiny")
    spec = DraftSpec.resolve(tmp_path / "d", "tiny")
    assert spec.limits.max_depth is None  # the optimizer may pick any depth
    other = tiny_llama(hidden_size=48)
    with pytest.raises(ModelError, match="width 48") as info:
        spec.proposer(LoadedModel(other, None, "other", torch.float32, torch.device("cpu")))
    assert "\n" not in str(info.value)


def test_per_step_spec_needs_a_calibrated_card(recurrent, tmp_path):
    save_draft(recurrent, tmp_path / "d", "tiny")
    with pytest.raises(FileFormatError, match="no per-step tree calibration"):
        DraftSpec.resolve(f"{tmp_path / 'd'}:per-step", "tiny")


def test_a_per_step_cards_gain_is_read_per_mode_and_checked(recurrent, tmp_path):
    save_draft(recurrent, tmp_path / "d", "tiny")
    shaper = TreeShaper(Calibration.identity("greedy"), Calibration.identity("stochastic")).to_json()
    update_card(tmp_path / "d", {"per_step_trees": {**shaper, "gain": {"greedy": {"32": 1.1, "16": 1.05}}}})
    spec = DraftSpec.resolve(f"{tmp_path / 'd'}:per-step", "tiny")
    assert spec.per_step_gain(greedy=True) == ((16, 1.05), (32, 1.1)) and spec.per_step_gain(greedy=False) == ()
    assert DraftSpec.resolve(tmp_path / "d", "tiny").per_step_gain(greedy=True) == ()  # static: no gain
    update_card(tmp_path / "d", {"per_step_trees": {**shaper, "gain": {"greedy": {"many": 1.1}}}})
    with pytest.raises(FileFormatError, match="per_step_trees.gain") as info:
        DraftSpec.resolve(f"{tmp_path / 'd'}:per-step", "tiny")
    assert "\n" not in str(info.value)


def test_the_shipped_chimera_prices_its_per_step_trees():
    spec = DraftSpec.resolve("smollm2-135m-chimera:per-step", "smollm2-135m")
    sizes = [n for n, _ in spec.per_step_gain(greedy=True)]
    assert sizes == [16, 32, 64] and all(g > 1.0 for _, g in spec.per_step_gain(greedy=True))


# ---------------------------------------------------------------------- per-step trees
def test_shaped_trees_follow_the_unroll_within_the_budget(recurrent, tiny_target):
    budget = Tree.from_children_counts([4, 1, 1, 1, 1, 1, 1, 1, 1])  # 10 nodes, depth 5
    proposer = recurrent.proposer(shaper=SHAPER)
    check_tree_matches_unroll(recurrent, tiny_target, budget, proposer)


@pytest.mark.parametrize("prompt", [[1, 2, 3], [7, 7, 7, 7, 9]])
def test_shaped_greedy_decoding_is_lossless(recurrent, tiny_target, prompt):
    check_greedy_lossless(recurrent, tiny_target, prompt, shaper=SHAPER)


def test_shapes_vary_and_measurement_labels_every_slot(small_draft, table_target):
    proposer = small_draft.proposer(shaper=SHAPER)
    m = measure(table_target, proposer, [torch.tensor(PROMPT)], BUDGET, SamplingConfig(1.0), max_new_tokens=12)
    depths, features, labels, weights = m.slots()
    assert len(labels) and np.all((labels >= 0) & (labels <= 1)) and 0 < len(m.predicted) <= m.steps
    assert np.all(weights[depths == 1] == 1) and np.all(weights <= 1)
    assert len(set(map(tuple, (np.round(v[:3], 3) for v in m.sorted_values)))) > 1  # the values vary per step
    cal = fit(m, "stochastic", max_depth=3)
    assert cal.depths == 3 and reliability(cal, m)


def test_greedy_slot_labels_are_argmax_matches():
    tree = Tree((-1, 0, 0))
    logits = torch.zeros(3, 5)
    logits[0, 4] = 1.0
    tree = Tree((-1, 0, 0, 1, 2))
    logits = torch.zeros(5, 5)
    logits[0, 4] = 1.0
    labels, weights = slot_labels(tree, Draft(torch.tensor([0, 4, 2, 1, 1])), logits, SamplingConfig())
    assert np.isnan(labels[0]) and labels[1:].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert weights.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # node 4's parent (token 2) is never reached


def test_stochastic_labels_sum_to_the_dp_acceptance():
    """Labels of a node's children are P(child i accepted) and sum to <= 1."""
    tree = Tree((-1, 0, 0))
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0] * 3, [0.0] * 3])
    q = torch.tensor([[0.2, 0.3, 0.5], [1 / 3] * 3, [1 / 3] * 3])
    labels, _ = slot_labels(tree, Draft(torch.tensor([0, 2, 1]), q), logits, SamplingConfig(1.0))
    p = logits_to_probs(logits[0], SamplingConfig(1.0))
    assert abs(labels[1] - min(1.0, float(p[2] / q[0, 2]))) < 1e-6 and labels[1:].sum() <= 1 + 1e-9


class TargetPeekingProposer:
    """Broken on purpose: shapes its tree by the target -- at each node it keeps children only
    while the target would accept them for sure (p >= q), then cuts the rest of the siblings."""

    needs_hidden_states = True

    def __init__(self, inner, target: TableLM, sampling: SamplingConfig) -> None:
        self.inner, self.target, self.sampling = inner, target, sampling

    def reset(self):
        self.inner.reset()

    def observe(self, step):
        self.inner.observe(step)

    def propose(self, ctx, tree):
        draft = self.inner.propose(ctx, tree)
        if draft.tree is None:  # a bare root
            return draft
        full, tokens = draft.tree, draft.tokens.tolist()
        keep = [0]
        for node in range(full.size):
            if node not in keep:
                continue
            path = tuple(ctx.tokens.tolist()) + tuple(tokens[v] for v in full.path_to(node)[1:])
            p = logits_to_probs(self.target.next_logits(path), self.sampling)
            for child in full.children[node]:
                if float(p[tokens[child]]) < float(draft.probs[node, tokens[child]]):
                    break
                keep.append(child)
        keep.sort()
        index = {v: i for i, v in enumerate(keep)}
        tree = Tree(tuple(-1 if v == 0 else index[full.parents[v]] for v in keep))
        return Draft(draft.tokens[keep], draft.probs[keep], tree)


@pytest.mark.parametrize("verifier", ["sequoia", "specinfer"])
def test_shaped_stochastic_decoding_samples_the_target_joint(small_draft, table_target, verifier):
    sampling = SamplingConfig(1.0)
    engine = Engine(table_target, small_draft.proposer(shaper=SHAPER), BUDGET, sampling, verifier=verifier, seed=7)
    counts = engine_counts(engine, 3, 2500 if verifier == "sequoia" else 1500)
    assert chi2_pvalue(counts, exact_joint(table_target, sampling, 3)) > 1e-3


def test_the_check_catches_a_shape_that_peeks_at_the_target(small_draft, table_target):
    sampling = SamplingConfig(1.0)
    peeking = TargetPeekingProposer(small_draft.proposer(shaper=SHAPER), table_target, sampling)
    engine = Engine(table_target, peeking, BUDGET, sampling, seed=7)
    counts = engine_counts(engine, 2, 2500)  # first-token law off by TV ~0.11 here
    assert chi2_pvalue(counts, exact_joint(table_target, sampling, 2)) < 1e-6
