"""Stochastic losslessness of the engine: the joint law of the first tokens equals the target's.

Design. The target and draft have a vocabulary of 8, so the exact joint distribution of the
first ``T`` generated tokens (8**T cells) is computed by enumeration: the product of the
target's processed next-token distributions along each sequence. The engine then generates
``T`` tokens ``N`` times from the same prompt, and a chi-square test (cells with expected
count < 5 pooled) compares the counts with the exact law. Seeds are fixed, so the outcome is
deterministic; the threshold is p > 1e-3.

Speed. A tiny Llama costs ~1 ms a forward through transformers, ~8 ms per engine run. The
models here are :class:`TableLM`: a causal LM whose logits after a context are the tiny
Llama's logits after exactly that context (memoised). It reconstructs each fed token's
context from its own KV cache (which stores token ids), the 4D tree mask and causality, and
checks the position ids, so a wrong mask, position or kept cache slot changes what it
returns or fails. One test runs the real tiny Llama end to end at a smaller ``N``.

Power. The same test must fail for broken verifiers: one that always accepts the first child
(gross), and the SpecInfer rule applied to children drawn without replacement (subtle: the
draft's q is not renormalised after a rejection, the paper's reason for its own rule). With
3 children at the root that bug moves the first token's law by TV 0.077 (chi-square distance
0.043, exact enumeration as in test_verify). At N = 3000 runs, over engine seeds 100-103, it
gave p-values 6e-14 .. 1.3e-9 while the correct verifier gave 0.011 .. 0.19.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from scipy import stats

import sequoia.engine as engine_module
from sequoia.drafts import LMProposer, NgramProposer
from sequoia.engine import Engine
from sequoia.models import tiny_llama
from sequoia.sampling import SamplingConfig, logits_to_probs, sample
from sequoia.tree import Tree
from sequoia.verify import Acceptance, verify_specinfer

VOCAB = 8
PROMPT = [1, 5, 3]
DRAFT_SEED = 11  # the draft among seeds 1-15 on which the subtle broken verifier shows most
TREE = Tree.from_choices([[0], [1], [2], [0, 0], [0, 1], [1, 0]])  # 3 + 2 + 1 children


class TableLM(torch.nn.Module):
    """A causal LM defined by a reference model's next-token logits per exact context."""

    def __init__(self, reference: torch.nn.Module) -> None:
        super().__init__()
        self.reference, self.config = reference, reference.config
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}

    def get_input_embeddings(self):
        return self.reference.get_input_embeddings()

    def get_output_embeddings(self):
        return self.reference.get_output_embeddings()

    @torch.no_grad()
    def next_logits(self, context: tuple[int, ...]) -> torch.Tensor:  # [vocab]
        if context not in self.memo:
            self.memo[context] = self.reference(input_ids=torch.tensor([context])).logits[0, -1]
        return self.memo[context]

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None,
                output_hidden_states=False, logits_to_keep=0):
        new = input_ids[0].tolist()
        past = cache.layers[0].keys[0, 0, :, 0].long().tolist() if cache.get_seq_length() else []
        columns = past + new
        if attention_mask is None:  # causal
            contexts = [columns[: len(past) + i + 1] for i in range(len(new))]
        else:
            allowed = (attention_mask[0, 0] == 0).tolist()  # [new, past + new]
            contexts = [[c for c, ok in zip(columns, row) if ok] for row in allowed]
        if position_ids is not None:
            assert position_ids[0].tolist() == [len(c) - 1 for c in contexts], "wrong position ids"
        ids = torch.tensor(new, dtype=torch.float32).view(1, 1, -1, 1)
        cache.update(ids, ids, 0)
        logits = torch.stack([self.next_logits(tuple(c)) for c in contexts])[None]
        logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        hidden = (torch.zeros(1, len(new), 1),) if output_hidden_states else None
        return SimpleNamespace(logits=logits, hidden_states=hidden)


@pytest.fixture(scope="module")
def models():
    target = TableLM(tiny_llama(seed=0, vocab_size=VOCAB))
    draft = TableLM(tiny_llama(seed=DRAFT_SEED, vocab_size=VOCAB))
    return target, draft


def exact_joint(target: TableLM, config: SamplingConfig, length: int, prompt: list[int] = PROMPT) -> torch.Tensor:
    """P(first ``length`` tokens after ``prompt``) by enumeration ([8**length], in the order
    of itertools.product)."""
    joint = []
    for seq in itertools.product(range(VOCAB), repeat=length):
        prob = 1.0
        for t in range(length):
            prob *= float(logits_to_probs(target.next_logits(tuple(prompt) + seq[:t]), config)[seq[t]])
        joint.append(prob)
    return torch.tensor(joint, dtype=torch.float64)


def engine_counts(engine: Engine, length: int, runs: int) -> torch.Tensor:  # [8**length]
    counts = torch.zeros(VOCAB**length, dtype=torch.float64)
    for _ in range(runs):
        tokens = [t for step in engine.generate(torch.tensor(PROMPT), length) for t in step.tokens]
        counts[sum(t * VOCAB ** (length - 1 - i) for i, t in enumerate(tokens))] += 1
    return counts


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected below 5 are pooled into one."""
    expected = probs / probs.sum() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    if (observed[~keep] > 0).any():  # an impossible sequence was generated
        return 0.0
    return float(stats.chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue)


CASES = {  # name: (draft, verifier, sampling, tokens, runs)
    "sequoia-T0.3": ("lm", "sequoia", SamplingConfig(0.3), 3, 2000),
    "sequoia-T1": ("lm", "sequoia", SamplingConfig(1.0), 3, 3000),
    "sequoia-T2": ("lm", "sequoia", SamplingConfig(2.0), 3, 3000),
    "sequoia-T1-top-p0.9": ("lm", "sequoia", SamplingConfig(1.0, top_p=0.9), 3, 3000),
    "specinfer-T1": ("lm", "specinfer", SamplingConfig(1.0), 3, 3000),
    "ngram-point-mass-T1": ("ngram", "sequoia", SamplingConfig(1.0), 3, 3000),
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_samples_the_target_joint(models, name):
    draft_kind, verifier, sampling, length, runs = CASES[name]
    target, draft = models
    proposer = LMProposer(draft) if draft_kind == "lm" else NgramProposer()
    engine = Engine(target, proposer, TREE, sampling, verifier=verifier, seed=7)
    counts = engine_counts(engine, length, runs)
    assert chi2_pvalue(counts, exact_joint(target, sampling, length)) > 1e-3


def _always_accept(tree, draft_tokens, draft_probs, target_probs, generator):
    """Broken on purpose: accept the first child all the way down, then a bonus token."""
    path = [0]
    while tree.children[path[-1]]:
        path.append(tree.children[path[-1]][0])
    return Acceptance(tuple(path), int(sample(target_probs[path[-1]], generator)))


@pytest.mark.parametrize(
    "broken, runs",
    [(_always_accept, 500), (verify_specinfer, 3000)],
    ids=["always-accept", "specinfer-rule-without-replacement"],
)
def test_the_check_fails_for_a_broken_verifier(models, monkeypatch, broken, runs):
    monkeypatch.setitem(engine_module.VERIFIERS, "sequoia", broken)  # draws stay w/o replacement
    target, draft = models
    sampling = SamplingConfig(1.0)
    engine = Engine(target, LMProposer(draft), TREE, sampling, verifier="sequoia", seed=7)
    counts = engine_counts(engine, 3, runs)
    assert chi2_pvalue(counts, exact_joint(target, sampling, 3)) < 1e-6


def test_real_tiny_llama_end_to_end():
    """The same check through transformers' Llama (2 tokens, fewer runs: ~8 ms a run)."""
    target, draft = tiny_llama(seed=0, vocab_size=VOCAB), tiny_llama(seed=1, vocab_size=VOCAB)
    sampling = SamplingConfig(1.0)
    engine = Engine(target, LMProposer(draft), Tree.from_choices([[0], [1], [2]]), sampling, seed=3)
    counts = engine_counts(engine, 2, 800)
    assert chi2_pvalue(counts, exact_joint(TableLM(target), sampling, 2)) > 1e-3
