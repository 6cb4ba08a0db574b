"""The decode loop: grow a tree with the draft, verify it with the target in one forward pass,
keep the accepted path in both KV caches.

One :meth:`Engine.step` emits the accepted draft tokens plus one token from the target, and its
output has exactly the distribution of the target decoding alone (token for token the same
when greedy). The target cache holds every accepted token but the last (the root of the next
tree); only the prefill, like ``generate``'s, takes the whole prompt, and it scores the first
tree's root. Generation stops where the target's own ``generate`` would: after an EOS token,
after ``max_new_tokens``, or when the sequence fills the context; near the last two limits the
tree is cut to the depth that can still be used.

    >>> from sequoia.drafts import NgramProposer
    >>> from sequoia.models import tiny_llama
    >>> engine = Engine(tiny_llama(), NgramProposer(), Tree((-1, 0, 1)))
    >>> steps = list(engine.generate(torch.tensor([1, 2, 3]), max_new_tokens=5))
    >>> sum(len(s.tokens) for s in steps), steps[-1].stop
    (5, 'max_new_tokens')
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from sequoia.drafts.base import Draft, DraftContext, Proposer, StepResult
from sequoia.errors import ConfigError
from sequoia.forward import cache_kwargs, keep_path, model_dtype_device, tree_forward
from sequoia.sampling import NodeProbs, SamplingConfig
from sequoia.tree import Tree
from sequoia.verify import Acceptance, verify_greedy, verify_sequoia, verify_specinfer


class Replan(Protocol):
    """Consulted between steps (e.g. :class:`sequoia.planning.Replanner`): sees the step's tree,
    its accepted path and its seconds per section; returns a new tree to decode with, or None."""

    def observe(self, tree: Tree, accepted_nodes: Sequence[int], seconds: Mapping[str, float]) -> Tree | None: ...

VERIFIERS = {"sequoia": verify_sequoia, "specinfer": verify_specinfer}
STOP_EOS, STOP_LENGTH, STOP_CONTEXT = "eos", "max_new_tokens", "context"
SECTIONS = ("draft", "target", "verify", "cache")


class StepTimer:
    """Wall time per step section, summed over steps; ``other`` is what no section covers."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sync = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.last: dict[str, float] = {}  # seconds per section of the latest step
        self.steps = 0

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.last[name] = time.perf_counter() - start
        self.totals[name] += self.last[name]

    def breakdown(self) -> dict[str, float]:
        """Seconds per section over all steps: draft, target, verify, cache, other, step."""
        parts = {name: self.totals[name] for name in SECTIONS}
        parts["other"] = max(self.totals["step"] - sum(parts.values()), 0.0)
        parts["step"] = self.totals["step"]
        return parts


@dataclass
class DecodeStats:
    """Acceptance statistics of one generation.

    ``tokens_per_step`` *includes the bonus token*: it is the mean of accepted draft tokens + 1
    per step, the quantity the solver's expected tokens per step predicts (the final step's
    cut at EOS or a limit does not lower it).
    """

    steps: int = 0
    emitted: int = 0  # tokens actually emitted (after cuts)
    accept_hist: list[int] = field(default_factory=list)  # [k]: steps accepting k draft tokens
    depth_tried: list[int] = field(default_factory=list)  # [d]: steps testing a depth-(d+1) child
    depth_accepted: list[int] = field(default_factory=list)  # [d]: ... and accepting one

    def observe_step(self, step: StepResult) -> None:
        k = step.num_accepted
        tried = k + bool(step.tree.children[step.accepted_nodes[-1]])  # the last node's kids failed
        self.accept_hist.extend([0] * (k + 1 - len(self.accept_hist)))
        for counts in (self.depth_tried, self.depth_accepted):
            counts.extend([0] * (tried - len(counts)))
        self.accept_hist[k] += 1
        for d in range(tried):
            self.depth_tried[d] += 1
            self.depth_accepted[d] += int(d < k)
        self.steps += 1
        self.emitted += len(step.tokens)

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per step (no bonus token)."""
        return sum(k * c for k, c in enumerate(self.accept_hist)) / max(self.steps, 1)

    @property
    def tokens_per_step(self) -> float:
        return self.mean_accepted + 1 if self.steps else 0.0

    def acceptance_by_depth(self) -> list[float]:
        """P(a child is accepted at depth d + 1 | verification got that deep)."""
        return [a / t for a, t in zip(self.depth_accepted, self.depth_tried)]


class Engine:
    """Speculative tree decoding of one sequence (batch size 1) with a target and a proposer."""

    def __init__(
        self,
        target: PreTrainedModel,
        proposer: Proposer,
        tree: Tree,
        sampling: SamplingConfig = SamplingConfig(),
        *,
        verifier: str = "sequoia",
        eos_token_ids: Sequence[int] = (),
        max_context: int | None = None,
        seed: int = 0,
        timer: StepTimer | None = None,
        replanner: Replan | None = None,
    ) -> None:
        if verifier not in VERIFIERS:
            raise ConfigError(f"unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")
        self.target, self.proposer, self.tree, self.sampling = target, proposer, tree, sampling
        self.verifier = verifier
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_context = int(max_context or target.config.max_position_embeddings)
        self.device = model_dtype_device(target)[1]
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.timer = timer or StepTimer(self.device)
        self.replanner = replanner  # consulted between steps; may change the tree
        self._trees: dict[int, Tree] = {}  # the tree cut to each depth limit met so far
        self._cache: DynamicCache | None = None
        self._root: tuple[torch.Tensor, torch.Tensor | None] | None = None  # prefill's root scores
        self.stats = DecodeStats()
        self.stop: str | None = None

    # ------------------------------------------------------------------ public loop
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> Iterator[StepResult]:
        """Prefill ``prompt_ids`` ([L] int64) and yield steps until generation stops."""
        self.start(prompt_ids, max_new_tokens)
        while self.stop is None:
            yield self.step()

    @torch.inference_mode()
    def start(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> None:
        """Reset the proposer and stats and prefill the whole prompt, as ``generate`` does: the
        last prompt token is the first tree's root, already scored."""
        assert prompt_ids.ndim == 1 and prompt_ids.dtype == torch.long
        length = len(prompt_ids)
        if length == 0:
            raise ConfigError("the prompt is empty; give at least one token")
        if length >= self.max_context:
            raise ConfigError(
                f"the prompt has {length} tokens but the target's context holds {self.max_context}; "
                "shorten the prompt"
            )
        if max_new_tokens < 1:
            raise ConfigError(f"max new tokens must be at least 1, got {max_new_tokens}")
        self.proposer.reset()
        self.stats, self.stop = DecodeStats(), None
        self._tokens = torch.zeros(self.max_context, dtype=torch.long)  # [max_context]
        self._tokens[:length] = prompt_ids
        self._length, self._prompt_length, self._max_new = length, length, int(max_new_tokens)
        self._cache = DynamicCache()
        wants_hidden = self.proposer.needs_hidden_states
        out = self.target(
            input_ids=prompt_ids[None].to(self.device),
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=wants_hidden,
            **cache_kwargs(self.target, self._cache),
        )
        hidden = out.hidden_states[-1][0] if wants_hidden else None  # [length, hidden]
        self._hidden = hidden[:-1] if wants_hidden else None
        self._root = (out.logits[0], hidden[-1:] if wants_hidden else None)  # [1, vocab], [1, hidden]

    @property
    def tokens(self) -> torch.Tensor:  # [generated] int64
        """The tokens generated so far."""
        return self._tokens[self._prompt_length : self._length].clone()

    @torch.inference_mode()
    def step(self) -> StepResult:
        assert self._cache is not None and self.stop is None, "call start(); generation has stopped"
        with self.timer.section("step"):
            tree = self._tree_within(self._room())
            prefix_len = self._length - 1
            ctx = DraftContext(
                tokens=self._tokens[: self._length],
                sampling=self.sampling,
                generator=self.generator,
                with_replacement=self.verifier == "specinfer",
                hidden_states=self._hidden,
            )
            # 1. grow tree with draft
            with self.timer.section("draft"):
                draft = self.proposer.propose(ctx, tree)
                tree = self._drafted(draft, tree)
            # 2. one target forward with tree mask
            with self.timer.section("target"):
                logits, hidden = self._score(draft.tokens, tree, prefix_len)
            # 3. verify
            with self.timer.section("verify"):
                acceptance = self._verify(tree, draft, logits)
            # 4. keep accepted path in both KV caches
            with self.timer.section("cache"):
                keep_path(self._cache, prefix_len, acceptance.nodes)
                hidden = None if hidden is None else hidden[list(acceptance.nodes)]
                result = self._advance(tree, draft, acceptance, hidden)
                self.proposer.observe(result)
            # 5. observe/stats
            self.stats.observe_step(result)
        self.timer.steps += 1
        # 6. between steps: a plan that measured itself wrong picks another tree
        if self.replanner is not None and self.stop is None:
            new_tree = self.replanner.observe(result.tree, result.accepted_nodes, self.timer.last)
            if new_tree is not None:
                self.set_tree(new_tree)
        return result

    def set_tree(self, tree: Tree) -> None:
        """Decode with ``tree`` from the next step on (between steps; the output stays the
        target's: verification does not depend on the tree's shape)."""
        self.tree, self._trees = tree, {}

    # ------------------------------------------------------------------ step helpers
    def _room(self) -> int:
        """Tokens that may still be emitted before a length limit."""
        generated = self._length - self._prompt_length
        return min(self._max_new - generated, self.max_context - self._length)

    def _tree_within(self, room: int) -> Tree:
        """The tree cut to depth ``room - 1``, so a step never emits more than ``room`` tokens."""
        if self.tree.depth < room:
            return self.tree
        if room not in self._trees:
            last = self.tree.levels[room - 1][-1]
            self._trees[room] = Tree(self.tree.parents[: last + 1], self.tree.meta)
        return self._trees[room]

    def _drafted(self, draft: Draft, budget: Tree) -> Tree:
        """The tree the draft filled: the engine's, or a per-step tree within its size and depth."""
        if draft.tree is None:
            return budget
        assert draft.tree.size <= budget.size and draft.tree.depth <= budget.depth, "a per-step tree over budget"
        return draft.tree

    def _score(
        self, tokens: torch.Tensor, tree: Tree, prefix_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # [n, vocab], [n, hidden] | None
        """The target's logits (and hidden states, if the proposer wants them) at every node.

        The first tree's root was scored by the prefill, so that step feeds only nodes 1..n-1.
        """
        wants_hidden = self.proposer.needs_hidden_states
        root, self._root = self._root, None
        if root is not None and tree.size == 1:
            return root
        start = 0 if root is None else 1
        out = tree_forward(self.target, tokens[start:], tree, self._cache, prefix_len, wants_hidden, start)
        logits, hidden = out.logits[0], out.hidden_states[-1][0] if wants_hidden else None
        if root is not None:
            logits = torch.cat([root[0], logits])
            hidden = torch.cat([root[1], hidden]) if wants_hidden else None
        return logits, hidden

    def _verify(self, tree: Tree, draft: Draft, logits: torch.Tensor) -> Acceptance:  # [n, vocab]
        if self.sampling.greedy:
            return verify_greedy(tree, draft.tokens, logits)
        target_probs = NodeProbs(logits, self.sampling)
        return VERIFIERS[self.verifier](tree, draft.tokens, draft.probs, target_probs, self.generator)

    def _advance(
        self, tree: Tree, draft: Draft, acceptance: Acceptance, hidden: torch.Tensor | None
    ) -> StepResult:
        """Append the step's tokens (cut after EOS), decide whether to stop, record the step."""
        new = draft.tokens[list(acceptance.nodes[1:])].tolist() + [acceptance.next_token]
        stop = None
        eos_at = next((i for i, t in enumerate(new) if t in self.eos_token_ids), None)
        if eos_at is not None:
            new, stop = new[: eos_at + 1], STOP_EOS
        self._tokens[self._length : self._length + len(new)] = torch.tensor(new)
        self._length += len(new)
        if stop is None and self._length - self._prompt_length >= self._max_new:
            stop = STOP_LENGTH
        elif stop is None and self._length >= self.max_context:
            stop = STOP_CONTEXT
        self.stop, self._hidden = stop, hidden
        return StepResult(tuple(new), acceptance.nodes, tree, draft.tokens, hidden, stop)
