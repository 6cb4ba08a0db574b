"""Shared checks for the trained-draft proposers (MLP speculator, Chimera); not a test module.

The oracle for a proposer is its model's teacher-forced :meth:`unroll` (the training path):
the candidates a proposal puts under a node must be the top-c of the unroll along that
node's path.
"""

from __future__ import annotations

import numpy as np
import torch

from sequoia.drafts.base import DraftContext
from sequoia.drafts.trained import ReducedVocab, TrainedDraft
from sequoia.drafts.registry import draft_kinds
from sequoia.engine import Engine
from sequoia.models import tiny_llama
from sequoia.sampling import SamplingConfig
from sequoia.tree import Tree

VOCAB = 64  # tiny_llama's vocabulary


def random_draft(
    kind: str, target, heads: int = 3, reduced: int = 40, seed: int = 0, ids: list[int] | None = None,
    recurrent: bool = False,
) -> TrainedDraft:
    """A draft for ``target`` with random (not small) weights, so its candidates depend on
    every input; its reduced vocabulary is ``ids``, else ``reduced`` random ids."""
    gen = torch.Generator().manual_seed(seed)
    size = target.config.vocab_size
    chosen = torch.randperm(size, generator=gen)[:reduced] if ids is None else torch.tensor(ids, dtype=torch.long)
    cls = draft_kinds()[kind]
    extra = {"attention_heads": 4} if kind == "chimera" else {}
    model = cls(cls.config_class(target.config.hidden_size, size, heads, recurrent, **extra), ReducedVocab(chosen, size))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.attach_target(target.get_input_embeddings().weight)
    return model.eval()


def bigram_target(seed: int = 0):
    """A tiny Llama whose next token depends only on the current one (attention and MLP
    outputs zeroed) and is nearly deterministic: a trivially learnable target."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.mul_(10.0)
    return model


def sampled_sequences(target, count: int, new_tokens: int, seed: int, greedy: bool = False):
    """``(ids, prompt_len)`` pairs: 4 random prompt tokens + the target's continuation."""
    prompts = torch.randint(0, VOCAB, (count, 4), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    out = target.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=not greedy, max_new_tokens=new_tokens, pad_token_id=0
    )
    return [(row.numpy().astype(np.int64), 4) for row in out]


def context(target, tokens: torch.Tensor) -> DraftContext:
    """What the engine gives a proposal after prefilling ``tokens[:-1]``."""
    with torch.no_grad():
        hidden = target(tokens[None], output_hidden_states=True).hidden_states[-1][0, :-1]
    return DraftContext(tokens, SamplingConfig(), torch.Generator(), hidden_states=hidden)


def expected_children(model: TrainedDraft, ctx: DraftContext, path: list[int], count: int) -> list[int]:
    """Top-``count`` full ids the unroll gives after ``ctx.tokens + path`` at depth ``len(path)``."""
    tokens = torch.cat([ctx.tokens, torch.tensor(path, dtype=torch.long)])
    hidden = torch.zeros(len(tokens), model.config.hidden_size)
    hidden[: len(ctx.hidden_states)] = ctx.hidden_states  # the rest is never read at this depth
    with torch.no_grad():
        logits = model.unroll(tokens[None], hidden[None], max(len(path) + 1, model.config.heads))[len(path)][0, len(tokens) - 1]
    return model.vocab.ids[logits.topk(count).indices].tolist()


def check_tree_matches_unroll(model: TrainedDraft, target, tree: Tree | None = None, proposer=None) -> None:
    """Every node's children are the top-c of the unroll along the node's path, in BFS order
    (the tree the proposer chose, if it shapes its own within ``tree``)."""
    tree = tree or Tree.from_children_counts([3, 2, 1, 2, 0, 0, 1])  # depth 3, uneven
    ctx = context(target, torch.tensor([5, 9, 2, 33, 17, 4, 60, 8]))
    proposer = proposer or model.proposer()
    draft = proposer.propose(ctx, tree)
    tree = draft.tree or tree
    assert draft.tokens.shape == (tree.size,) and draft.probs is None and int(draft.tokens[0]) == 8
    for node in range(tree.size):
        kids = tree.children[node]
        if kids:
            path = [int(draft.tokens[v]) for v in tree.path_to(node)[1:]]
            assert draft.tokens[list(kids)].tolist() == expected_children(model, ctx, path, len(kids)), node
    assert proposer.propose(ctx, tree).tokens.tolist() == draft.tokens.tolist()  # repeatable


def check_greedy_lossless(model: TrainedDraft, target, prompt: list[int], mix=None, shaper=None) -> None:
    """Engine output equals the target's greedy ``generate`` for several tree shapes (the
    proposer's candidates mixed with the context's n-grams by ``mix`` if given; its trees
    shaped per step within each by ``shaper`` if given)."""
    ids = torch.tensor([prompt])
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, pad_token_id=0)
    for tree in (Tree((-1, 0, 1, 2)), Tree.from_children_counts([3, 2, 2, 1, 1, 1]), Tree((-1, 0, 0))):
        engine = Engine(target, model.proposer(mix, shaper), tree)
        tokens = [t for step in engine.generate(torch.tensor(prompt), 20) for t in step.tokens]
        assert tokens == expected[0, len(prompt) :].tolist()


def check_stochastic(model: TrainedDraft, target, verifier: str) -> None:
    """Sampled drafts: distinct children drawn from q, q zero outside the reduced vocabulary."""
    tree = Tree.from_children_counts([3, 2, 1])
    proposer = model.proposer()
    ctx = context(target, torch.tensor([5, 9, 2, 33]))
    ctx = DraftContext(ctx.tokens, SamplingConfig(1.0), torch.Generator().manual_seed(0), hidden_states=ctx.hidden_states)
    draft = proposer.propose(ctx, tree)
    assert draft.probs is not None and draft.probs.shape == (tree.size, VOCAB)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[model.vocab.ids] = False
    for node, kids in enumerate(tree.children):
        if kids:
            q = draft.probs[node]
            assert abs(float(q.sum()) - 1) < 1e-4 and float(q[outside].sum()) == 0
            assert len(set(draft.tokens[list(kids)].tolist())) == len(kids) and bool((q[draft.tokens[list(kids)]] > 0).all())
    engine = Engine(target, model.proposer(), tree, SamplingConfig(1.0), verifier=verifier, seed=3)
    steps = list(engine.generate(torch.tensor([1, 5, 9]), 24))
    assert sum(len(s.tokens) for s in steps) == 24 and engine.stats.steps == len(steps)
