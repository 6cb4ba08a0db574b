"""Verification: literal cases, exact output distributions at one node, and a tree by sampling.

The exact tests enumerate every random choice: the draft's candidate tuples (weighted by how
the draft samples them) and each candidate's accept/reject outcome (weighted by the
acceptance probabilities :func:`candidate_tests` yields). The resulting next-token
distribution must equal the target's ``p`` to float64 precision.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from sequoia.sampling import sample_with_replacement, sample_without_replacement
from sequoia.tree import Tree
from sequoia.verify import (
    Acceptance,
    candidate_tests,
    try_children,
    verify_greedy,
    verify_sequoia,
    verify_specinfer,
)

P = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08], dtype=torch.float64)
Q = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15], dtype=torch.float64)
Q_SPARSE = torch.tensor([0.0, 0.6, 0.0, 0.4, 0.0], dtype=torch.float64)  # support smaller than k


# ---------------------------------------------------------------- greedy, literal
def _logits_with_argmax(argmax: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(argmax), vocab)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 5.0
    return logits


def test_greedy_follows_the_argmax_child_and_adds_the_argmax_after():
    tree = Tree.from_choices([[0], [1], [0, 0], [1, 0]])  # 0 -> 1, 2; 1 -> 3; 2 -> 4
    tokens = torch.tensor([9, 4, 6, 2, 7])
    # root's argmax 6 = node 2; node 2's argmax 7 = node 4 (a leaf); node 4's argmax 1 = bonus
    assert verify_greedy(tree, tokens, _logits_with_argmax([6, 0, 7, 0, 1])) == Acceptance((0, 2, 4), 1)
    # root's argmax 5 matches no child: nothing accepted, 5 is the next token
    assert verify_greedy(tree, tokens, _logits_with_argmax([5, 0, 7, 0, 1])) == Acceptance((0,), 5)


def test_greedy_ties_take_the_first_maximum():
    logits = torch.zeros(2, 8)
    logits[0, [3, 4]] = 5.0  # tie between 3 and 4: torch.argmax (and generate) picks 3
    assert verify_greedy(Tree((-1, 0)), torch.tensor([0, 4]), logits) == Acceptance((0,), 3)


# ---------------------------------------------------------------- one node, exact
def _draws(q: torch.Tensor | None, k: int, mode: str, fixed: list[int]):
    """Every candidate tuple the draft can produce, with its probability."""
    if mode == "point":
        yield fixed, 1.0
    elif mode == "with":
        for combo in itertools.product(range(len(q)), repeat=k):
            yield list(combo), float(torch.prod(q[list(combo)]))
    else:  # Plackett-Luce over the support, then zero-probability tokens (which ones: irrelevant)
        support = q.nonzero().flatten().tolist()
        zeros = [t for t in range(len(q)) if q[t] == 0]
        for combo in itertools.permutations(support, min(k, len(support))):
            weight, left = 1.0, 1.0
            for token in combo:
                weight, left = weight * float(q[token]) / left, left - float(q[token])
            yield list(combo) + zeros[: k - len(combo)], weight


def _exact_next_token(q, k, mode, fixed=(), without_replacement=None) -> torch.Tensor:
    """The exact distribution of the token verification emits first at one node."""
    if without_replacement is None:
        without_replacement = mode != "with"
    out = torch.zeros_like(P)
    for candidates, weight in _draws(q, k, mode, list(fixed)):
        tests = candidate_tests(P, None if mode == "point" else q, candidates, without_replacement)
        reach = weight
        try:
            for rank in itertools.count():
                accept = next(tests)
                out[candidates[rank]] += reach * accept
                reach *= 1 - accept
        except StopIteration as done:
            out += reach * done.value
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["without", "with"])
def test_one_node_emits_exactly_p(mode, k):
    torch.testing.assert_close(_exact_next_token(Q, k, mode), P, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [3, 4])
def test_without_replacement_past_the_draft_support_emits_exactly_p(k):
    torch.testing.assert_close(_exact_next_token(Q_SPARSE, k, "without"), P, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fixed", [[3], [0, 1], [4, 2, 0], [1, 1, 3]], ids=str)
def test_point_mass_draft_emits_exactly_p(fixed):
    # any deterministic candidate list, duplicates included
    torch.testing.assert_close(_exact_next_token(None, len(fixed), "point", fixed), P, rtol=0, atol=1e-12)


def test_exact_check_catches_the_specinfer_rule_on_draws_without_replacement():
    """Keeping q unchanged after a rejection is only right for i.i.d. draws: prove the exact
    check can fail."""
    wrong = _exact_next_token(Q, 3, "without", without_replacement=False)
    assert (wrong - P).abs().sum() > 0.01


def test_candidate_tests_literal():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    tests = candidate_tests(p, q, [1, 0, 2])
    # token 1: 0.3 / 0.6. Rejected: p <- norm(max(p - q, 0)) = [1, 0, 0], q <- [0.5, 0, 0.5]
    assert next(tests) == pytest.approx(0.5)
    assert next(tests) == pytest.approx(1.0)  # token 0: 1 / 0.5, capped at 1
    assert next(tests) == pytest.approx(0.0)  # token 2: p = 0 there now
    with pytest.raises(StopIteration) as done:
        next(tests)
    torch.testing.assert_close(done.value.value, torch.tensor([1.0, 0.0, 0.0]))


def test_try_children_accepts_or_returns_the_residual():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 1.0, 0.0])
    assert try_children(p, torch.tensor([0.5, 0.5, 0.0]), [1, 0], g) == (0, None)  # p/q = 2
    rank, rest = try_children(p, None, [0, 2], g)  # point masses where p = 0: both rejected
    assert rank is None and rest.tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- a tree, by sampling
TREE = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])  # 0 -> 1, 2; 1 -> 3, 4; 2 -> 5


VOCAB = 6


def _tables(seed: int) -> torch.Tensor:  # [3, VOCAB, VOCAB]: row x = distribution after token x
    raw = torch.rand(3, VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) ** 3
    return raw / raw.sum(-1, keepdim=True)


def _draft_children(q: torch.Tensor, k: int, mode: str, g: torch.Generator) -> list[int]:
    if k == 0:
        return []
    if mode == "point":  # a deterministic draft: the k least likely tokens under q, say
        return q.argsort()[:k].tolist()
    if mode == "with":
        return sample_with_replacement(q, k, g).tolist()
    return sample_without_replacement(q, k, g).tolist()


@pytest.mark.parametrize("mode", ["without", "with", "point"])
def test_tree_first_token_and_second_given_first_follow_the_target(mode):
    """Target and draft are token-level Markov tables (p and q of a node depend on its token).
    The first emitted token must follow p at the root; when a step emits a second token, it
    must follow p after the first."""
    target, draft = _tables(0), _tables(1)
    verify = verify_specinfer if mode == "with" else verify_sequoia
    g = torch.Generator().manual_seed(2)
    first = torch.zeros(VOCAB)
    second = torch.zeros(VOCAB, VOCAB)
    root_token = 0
    for _ in range(3000):
        tokens = [root_token]
        for node in range(TREE.size):  # BFS: draw each node's children from q after its token
            tokens += _draft_children(draft[1][tokens[node]], len(TREE.children[node]), mode, g)
        p = torch.stack([target[min(int(d), 2)][t] for d, t in zip(TREE.depths, tokens)])
        q = None if mode == "point" else torch.stack([draft[1][t] for t in tokens])
        result = verify(TREE, torch.tensor(tokens), q, p, g)
        emitted = [tokens[n] for n in result.nodes[1:]] + [result.next_token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[0], emitted[1]] += 1
    assert stats.chisquare(first.numpy(), (target[0][root_token] * first.sum()).numpy()).pvalue > 1e-3
    expected = second.sum(-1, keepdim=True) * target[1]
    rows = second.sum(-1) > 0
    statistic = ((second - expected)[rows] ** 2 / expected[rows]).sum().item()
    assert stats.chi2.sf(statistic, int(rows.sum()) * (VOCAB - 1)) > 1e-3
