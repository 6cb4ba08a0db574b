"""The context mix: a trained draft's candidates mixed with the context's n-gram statistics.

Oracles: the n-gram part against counting the text by brute force; the mixture against its
formula over the full vocabulary; the proposer against the mixture of the unroll's
distribution; the fitted weights against the weights that generated synthetic data; and the
engine's sampled output against the target's exact joint law (chi-square, as in
``test_engine_stochastic``).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_engine_stochastic import TableLM, chi2_pvalue, exact_joint
from trained_draft_helpers import check_greedy_lossless, context, random_draft

from sequoia.drafts.base import DraftContext
from sequoia.drafts.context_mix import FOLLOWERS, ContextMix, components, fit_weights
from sequoia.drafts.training.evaluate import agreement, fit_context_mix
from sequoia.drafts.training.features import extract_features
from sequoia.drafts.ngram import NgramIndex
from sequoia.drafts.card import CARD, save_draft, update_card
from sequoia.drafts.trained import ReducedVocab
from sequoia.drafts.registry import load_context_mix
from sequoia.engine import Engine
from sequoia.errors import FileFormatError
from sequoia.models import LoadedModel, tiny_llama
from sequoia.sampling import SamplingConfig
from sequoia.tree import Tree


def brute_components(text: list[int], suffix: tuple[int, ...], max_ngram: int) -> list[dict[int, float]]:
    """P_n by scanning ``text`` for every earlier occurrence of each suffix length."""
    found = []
    for n in range(1, min(len(suffix), max_ngram) + 1):
        key = list(suffix[len(suffix) - n :])
        followers = Counter(text[i + n] for i in range(len(text) - n) if text[i : i + n] == key)
        last = {text[i + n]: i for i in range(len(text) - n) if text[i : i + n] == key}
        if not followers:
            break
        top = sorted(followers, key=lambda t: (-followers[t], -last[t]))[:FOLLOWERS]
        found.append({t: followers[t] / sum(followers[u] for u in top) for t in top})
    return found


@pytest.mark.parametrize("seed", range(5))
def test_components_count_the_text(seed):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 4 + 3 * seed, (120,), generator=gen).tolist()  # small alphabets repeat
    index = NgramIndex(5)
    index.extend(text[:60])
    for end in (7, 60):  # memoised shares must not outlive a grown text
        suffix = tuple(text[max(0, end - 5) : end])
        assert components(index, suffix, 5) == brute_components(text[:60], suffix, 5)
    index.extend(text[60:])  # incremental == at once
    for end in (1, 2, 7, 60, 120):
        suffix = tuple(text[max(0, end - 5) : end]) + (text[3],)  # a path token after the context
        got = components(index, suffix, 5)
        expected = brute_components(text, suffix, 5)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-12 for t in a)


def test_the_mixture_is_its_formula():
    vocab = ReducedVocab(torch.tensor([4, 0, 2]), 6)  # 1, 3, 5 are outside
    mix = ContextMix((0.5, 2.0))
    index = NgramIndex(2)
    index.extend([1, 2, 5, 1, 2, 4, 3, 2, 4])  # after (1, 2): 5, 4; after (2,): 5, 4, 4
    q = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    suffixes = [(1, 2), (9, 9)]  # the second matches nothing
    parts = [mix.lookup(index, s) for s in suffixes]
    mixed, columns = mix.mix(q, parts, vocab.rows, vocab.ids)
    assert columns.tolist() == [4, 0, 2, 5] and torch.allclose(mixed.sum(-1), torch.ones(2))
    expected = torch.zeros(2, 6)
    expected[:, vocab.ids] = q
    p1, p2 = {5: 1 / 3, 4: 2 / 3}, {5: 1 / 2, 4: 1 / 2}
    for t in (4, 5):
        expected[0, t] += 0.5 * p1[t] + 2.0 * p2[t]
    expected[0] /= 1 + 0.5 + 2.0
    assert torch.allclose(vocab.to_full_probs(mixed, columns), expected)
    assert parts[1] == ({}, 0.0)


def test_card_weights_are_checked(tiny_target, tmp_path):
    save_draft(random_draft("mlp", tiny_target), tmp_path / "d", "tiny")
    assert load_context_mix(tmp_path / "d") is None
    update_card(tmp_path / "d", {"context_mix": ContextMix((0.1, 2.5)).to_json(positions=7)})
    assert load_context_mix(tmp_path / "d") == ContextMix((0.1, 2.5))
    for bad in ({"weights": [1.0, -2.0]}, {"weights": "heavy"}, {"weights": []}, [0.5]):
        update_card(tmp_path / "d", {"context_mix": bad})
        with pytest.raises(FileFormatError, match=f"{CARD}.*context") as info:
            load_context_mix(tmp_path / "d")
        assert "\n" not in str(info.value)


def test_fitting_recovers_the_generating_weights():
    """Targets drawn from the mixture itself: random draft distributions over 10 tokens, a
    point-mass follower per matched length, known weights."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab, truth = 40_000, 10, torch.tensor([0.3, 2.0])
    matched = torch.rand(rows, 2, generator=gen) < torch.tensor([0.7, 0.35])
    matched[:, 1] &= matched[:, 0]  # a longer suffix matches only where the shorter does
    torch.manual_seed(0)
    q = torch.distributions.Dirichlet(torch.ones(vocab)).sample((rows,))
    follower = torch.randint(0, vocab, (rows, 2), generator=gen)
    mixture = q + torch.zeros(rows, vocab).scatter_add_(1, follower, matched * truth)
    target = torch.multinomial(mixture / mixture.sum(1, keepdim=True), 1, generator=gen)
    p_target = (follower == target) & matched
    fitted = fit_weights(q.gather(1, target)[:, 0], p_target.double(), matched, steps=800)
    assert torch.allclose(torch.tensor(fitted.weights), truth, rtol=0.1), fitted.weights


@pytest.mark.parametrize("kind", ["mlp", "chimera"])
def test_proposals_follow_the_mixed_unroll(kind, tiny_target):
    """Greedy children are the top of the mixture of the unroll's softmax along their path;
    a heavy 1-gram weight makes a follower outside the reduced vocabulary the first child."""
    model = random_draft(kind, tiny_target, heads=2)
    outside = next(t for t in range(64) if t not in model.vocab.rows)
    tokens = torch.tensor([5, 9, outside, 33, 17, 9, outside, 8, 9])  # 9 was followed by `outside` twice
    ctx = context(tiny_target, tokens)
    mix = ContextMix((50.0, 1.0, 0.5))
    tree = Tree.from_children_counts([3, 2, 0, 0])
    draft = model.proposer(mix).propose(ctx, tree)
    assert int(draft.tokens[1]) == outside
    index = NgramIndex(3)
    index.extend(tokens.tolist())
    hidden = torch.zeros(len(tokens) + 1, model.config.hidden_size)
    hidden[: len(ctx.hidden_states)] = ctx.hidden_states
    for node, path in ((0, []), (1, [int(draft.tokens[1])])):
        seq = torch.cat([tokens, torch.tensor(path, dtype=torch.long)])
        with torch.no_grad():
            logits = model.unroll(seq[None], hidden[None, : len(seq)])[len(path)][0, -1]
        part = mix.lookup(index, tuple(seq[-3:].tolist()))
        q, columns = mix.mix(logits.softmax(-1)[None], [part], model.vocab.rows, model.vocab.ids)
        kids = list(tree.children[node])
        assert draft.tokens[kids].tolist() == columns[q[0].topk(len(kids)).indices].tolist(), node


@pytest.mark.parametrize("prompt", [[1, 5, 9, 3, 1, 5, 9], [42]], ids=["repeats", "one"])
def test_greedy_decoding_with_a_mix_is_lossless(tiny_target, prompt):
    check_greedy_lossless(random_draft("chimera", tiny_target), tiny_target, prompt, ContextMix((1.0, 3.0, 9.0)))


def test_sampled_output_with_a_mix_is_the_targets_law():
    """A mixed MLP draft (3 of 8 tokens outside its vocabulary, heavy n-gram weights) through
    the real tiny Llama: the first two tokens' joint law is the target's (chi-square)."""
    vocab_size, prompt = 8, [1, 5, 3, 1, 5, 7, 1, 5]  # 1 5 -> 3 or 7 (outside the vocabulary)
    target = tiny_llama(seed=0, vocab_size=vocab_size)
    model = random_draft("mlp", target, heads=2, seed=1, ids=[0, 2, 3, 5, 6])
    tree = Tree.from_choices([[0], [1], [0, 0]])
    engine = Engine(target, model.proposer(ContextMix((2.0, 4.0))), tree, SamplingConfig(1.0), seed=3)
    counts = torch.zeros(vocab_size**2, dtype=torch.float64)
    for _ in range(800):
        first, second = [t for step in engine.generate(torch.tensor(prompt), 2) for t in step.tokens][:2]
        counts[first * vocab_size + second] += 1
    assert chi2_pvalue(counts, exact_joint(TableLM(target), SamplingConfig(1.0), 2, prompt)) > 1e-3


def test_draft_probabilities_are_the_mixture(tiny_target):
    model = random_draft("chimera", tiny_target, heads=2)
    ctx = context(tiny_target, torch.tensor([5, 9, 2, 9, 2, 9]))
    ctx = DraftContext(ctx.tokens, SamplingConfig(1.0), torch.Generator().manual_seed(0), hidden_states=ctx.hidden_states)
    draft = model.proposer(ContextMix((4.0, 4.0))).propose(ctx, Tree.from_children_counts([3, 2, 0, 0]))
    root = draft.probs[0]
    assert abs(float(root.sum()) - 1) < 1e-5 and float(root[2]) >= 8 / 9 * 0.999  # 9 -> 2 always, weights 8 of 9
    assert bool((root[draft.tokens[1:4]] > 0).all()) and len(set(draft.tokens[1:4].tolist())) == 3


def test_agreement_and_fit_on_features(tiny_target):
    """A zero-weight mix changes nothing; a fitted one is recorded for every length."""
    model = random_draft("mlp", tiny_target)
    seqs = [(torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(s)).numpy(), 5) for s in range(4)]
    feats = extract_features(LoadedModel(tiny_target, None, "tiny", torch.float32, torch.device("cpu")), seqs)
    assert agreement(model, feats, mix=ContextMix((0.0, 0.0))) == agreement(model, feats)
    mix, positions = fit_context_mix(model, feats, max_ngram=3)
    assert mix.max_ngram == 3 and positions == sum(a.positions for a in agreement(model, feats))
    assert agreement(model, feats, mix=mix)[0].top1 >= agreement(model, feats)[0].top1  # a repetitive text


def test_refit_and_drop_a_saved_drafts_mix(tmp_path):
    """`sequoia draft mix` in the library: fit on a store, re-evaluate, record; then remove."""
    from word_tokenizer import word_tokenizer

    from sequoia.drafts.training.data import DataStore, Manifest, generate_data
    from sequoia.drafts.training.train import drop_mix, refit_mix
    from sequoia.drafts.card import read_card

    target = tiny_llama(seed=0)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # held-out prompts are chats
    loaded = LoadedModel(target, tokenizer, "tiny", torch.float32, torch.device("cpu"))
    settings = Manifest(target="tiny", dtype="float32", temperature=1.0, top_p=1.0, max_new_tokens=24, chat=False)
    store = DataStore.open_or_create(tmp_path / "s", settings)
    generate_data(store, loaded, positions=100, batch_size=4)
    save_draft(random_draft("mlp", target, heads=2), tmp_path / "d", "tiny")
    card = refit_mix(tmp_path / "d", loaded, [store], tmp_path / "work", max_ngram=3, held_out_tokens=8)
    assert len(card["context_mix"]["weights"]) == 3 and card["context_mix"]["positions"] > 0
    levels, alone = card["evaluation"]["levels"], card["evaluation"]["levels_draft_only"]
    assert len(levels) == len(alone) == 2 and [a["positions"] for a in levels] == [a["positions"] for a in alone]
    assert load_context_mix(tmp_path / "d") == ContextMix(tuple(card["context_mix"]["weights"]))
    drop_mix(tmp_path / "d")
    assert load_context_mix(tmp_path / "d") is None and "evaluation" in read_card(tmp_path / "d")
