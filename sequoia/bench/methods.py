"""The decoding methods the benchmark compares, and running them side by side.

Methods (each a :class:`Method`: a name, a runner, and for tree methods the tree and its
predicted tokens/step):

* ``generate <dtype>`` -- Hugging Face ``generate``, plain autoregressive decoding, in each
  dtype asked for (the speed-up baseline is the fastest of them);
* ``hf-assisted`` -- ``generate(assistant_model=draft)`` with the same draft (LM drafts only);
* ``hf-prompt-lookup`` -- ``generate(prompt_lookup_num_tokens=...)``;
* ``engine, no draft`` -- this engine decoding one token per step: what the engine gains (or
  loses) over ``generate`` before any speculation, e.g. from packed weights (:mod:`sequoia.prepack`);
* ``chain`` / ``k-ary`` / ``k-chains`` / ``sequoia`` -- this engine with the best tree of each
  family at the Sequoia tree's size, and the optimizer's tree itself.

Fairness: methods are interleaved prompt by prompt (the order rotates each prompt), so a burst
of machine load hits all of them alike; each method runs once untimed first. Steps are counted
by a forward hook on the target, the same way for every method: tokens/step = new tokens /
target forwards (for the engine, the prefill forward is not a step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from sequoia.drafts.base import NoDraft, Proposer
from sequoia.engine import Engine
from sequoia.errors import ConfigError
from sequoia.optimizer import LatencyFn, evaluate
from sequoia.sampling import SamplingConfig
from sequoia.solver import best_baseline, expected_tokens
from sequoia.tree import Tree

if TYPE_CHECKING:
    from sequoia.planning import Replanner

BASELINE_SHAPES = {"chain": "chain", "k-ary": "kary", "k-chains": "chains"}
PROMPT_LOOKUP_TOKENS = 10
ENGINE_ALONE = "engine, no draft"


@dataclass(frozen=True)
class Run:
    """One method on one prompt."""

    tokens: list[int]
    seconds: float
    steps: int  # target forwards that produced tokens
    decode_seconds: float | None = None  # the engine's decode steps alone (no prefill); None for HF

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return len(self.tokens) / max(self.steps, 1)


Runner = Callable[[torch.Tensor, int], tuple]  # (prompt [L], max new) -> (tokens, steps[, decode seconds])


@dataclass(frozen=True)
class Method:
    """A decoding method under test; ``group`` names the target dtype whose greedy output it
    must reproduce token for token (None: no losslessness claim to check)."""

    name: str
    run: Runner
    group: str | None
    tree: Tree | None = None
    predicted_tokens_per_step: float | None = None
    predicted_ms_per_token: float | None = None  # the profile's prediction of a decode step's time per token


@dataclass
class MethodResult:
    method: Method
    runs: list[Run] = field(default_factory=list)

    def summary(self, baseline_tps: float | None) -> dict[str, Any]:
        tps = [r.tokens_per_second for r in self.runs]
        med = statistics.median(tps)
        decode = [r.decode_seconds for r in self.runs if r.decode_seconds is not None]
        decoded = sum(len(r.tokens) for r in self.runs if r.decode_seconds is not None)
        return {
            "method": self.method.name,
            "tokens_per_s": med,
            "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps),
            "speedup": med / baseline_tps if baseline_tps else None,
            "tokens_per_step": sum(len(r.tokens) for r in self.runs) / max(sum(r.steps for r in self.runs), 1),
            "predicted_tokens_per_step": self.method.predicted_tokens_per_step,
            "ms_per_token": 1e3 * sum(decode) / decoded if decode and decoded else None,
            "predicted_ms_per_token": self.method.predicted_ms_per_token,
            "tree_size": self.method.tree.size if self.method.tree else None,
            "tree_depth": self.method.tree.depth if self.method.tree else None,
        }


class ForwardCounter:
    """Counts forward calls of a model (a hook), to measure target forwards per method."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def hf_runner(model: PreTrainedModel, sampling: SamplingConfig, eos: Sequence[int], **extra: Any) -> Runner:
    """Hugging Face ``generate`` (plain, assisted or prompt lookup) as a :data:`Runner`."""
    options: dict[str, Any] = {"do_sample": False}
    if not sampling.greedy:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}

    def run(prompt: torch.Tensor, max_new_tokens: int) -> tuple[list[int], int]:
        counter = ForwardCounter(model)
        try:
            out = model.generate(
                prompt[None].to(model.device), attention_mask=torch.ones_like(prompt[None]).to(model.device),
                max_new_tokens=max_new_tokens, eos_token_id=list(eos) or None,
                pad_token_id=eos[0] if eos else None, **options, **extra,
            )
        finally:
            counter.close()
        return out[0, len(prompt):].tolist(), counter.calls

    return run


def engine_runner(engine: Engine) -> Runner:
    """This project's engine as a :data:`Runner` (steps = engine steps, prefill excluded; the
    decode steps' own seconds too, what the profile predicts)."""

    def run(prompt: torch.Tensor, max_new_tokens: int) -> tuple[list[int], int, float]:
        before = engine.timer.totals["step"]
        tokens = [t for step in engine.generate(prompt, max_new_tokens) for t in step.tokens]
        return tokens, engine.stats.steps, engine.timer.totals["step"] - before

    return run


@dataclass(frozen=True)
class TreeRows:
    """What the engine's tree rows of one setting share: the target, the acceptance the trees
    are priced with, the sampling, the dtype whose greedy ``generate`` they must reproduce and
    the latency model (target ms by tokens, draft ms by level width, draft ms per step) that
    predicts each row's time per token."""

    target: PreTrainedModel
    acceptance: Sequence[float] | np.ndarray  # [k], or [L, k] by tree depth
    sampling: SamplingConfig
    eos: Sequence[int]
    group: str
    latency: tuple[LatencyFn, LatencyFn, float] | None = None
    seed: int = 0

    def method(self, name: str, proposer: Proposer, tree: Tree, replanner: Replanner | None = None,
               gain: float = 1.0) -> Method:
        """The engine decoding with ``tree`` (the budget of a per-step draft, whose expected
        tokens per step are the static tree's times its measured ``gain``), with its predictions."""
        engine = Engine(self.target, proposer, tree, self.sampling, eos_token_ids=self.eos, seed=self.seed,
                        replanner=replanner)
        expected = expected_tokens(tree, self.acceptance) * gain
        predicted = evaluate(tree, expected, *self.latency).ms_per_token if self.latency else None
        return Method(f"{name} ({tree.size} nodes, depth {tree.depth})", engine_runner(engine), self.group, tree,
                      expected, predicted)


def tree_methods(
    rows: TreeRows,
    proposer_factory: Callable[[], Proposer],
    sequoia_tree: Tree,
    max_depth: int | None = None,
    replanner: Replanner | None = None,
    sequoia_proposer: Proposer | None = None,
    gain: float = 1.0,
) -> list[Method]:
    """The optimizer's tree and the best chain, k-ary and k-chains trees within its size (and
    ``max_depth``: the deepest tree the draft can fill, e.g. a trained draft's heads); only the
    first when it is one node (plain decoding: the others would be the same). ``replanner``
    goes with the optimizer's tree, as in ``sequoia generate``. ``sequoia_proposer`` (default:
    a static one from the factory) runs the optimizer's tree, e.g. a per-step draft shaping its
    trees within it, with ``gain`` (see :meth:`TreeRows.method`); the baselines keep their
    static shapes."""
    methods = [rows.method("sequoia", sequoia_proposer or proposer_factory(), sequoia_tree, replanner, gain)]
    depth = max(sequoia_tree.size - 1, 0)
    if max_depth is not None:
        depth = min(depth, max_depth)
    if sequoia_tree.size > 1:
        for label, shape in BASELINE_SHAPES.items():
            tree = best_baseline(shape, rows.acceptance, sequoia_tree.size, depth)
            methods.append(rows.method(label, proposer_factory(), tree))
    return methods


def run_bench(
    methods: Sequence[Method],
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    warmup_prompt: torch.Tensor | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[MethodResult]:
    """Run every method on every prompt, interleaved, the order rotating per prompt."""
    if not prompts:
        raise ConfigError("the benchmark needs at least one prompt")
    if not methods:
        raise ConfigError("the benchmark needs at least one method")
    if warmup_prompt is not None:
        for method in methods:
            method.run(warmup_prompt, 4)
    results = [MethodResult(m) for m in methods]
    total, done = len(prompts) * len(methods), 0
    for p, prompt in enumerate(prompts):
        order = [(p + k) % len(methods) for k in range(len(methods))]
        for index in order:
            method = methods[index]
            if progress is not None:
                progress(done, total, method.name)
            torch.manual_seed(1000 + p)
            start = time.perf_counter()
            tokens, steps, *decode = method.run(prompt, max_new_tokens)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            results[index].runs.append(Run(tokens, time.perf_counter() - start, steps, *decode))
            done += 1
    if progress is not None:
        progress(done, total, "done")
    return results


def greedy_agreement(results: Sequence[MethodResult], reference: dict[str, str]) -> dict[str, dict[str, Any]]:
    """For each lossless method: does its greedy output equal its group's reference method's
    (``reference[group]`` = name of the plain ``generate`` in that dtype), prompt by prompt?"""
    by_name = {r.method.name: r for r in results}
    report = {}
    for r in results:
        ref_name = reference.get(r.method.group or "")
        if ref_name is None or ref_name == r.method.name:
            continue
        ref = by_name[ref_name]
        mismatched = [i for i, (a, b) in enumerate(zip(r.runs, ref.runs)) if a.tokens != b.tokens]
        first = [
            next((k for k, (x, y) in enumerate(zip(r.runs[i].tokens, ref.runs[i].tokens)) if x != y),
                 min(len(r.runs[i].tokens), len(ref.runs[i].tokens)))
            for i in mismatched
        ]
        report[r.method.name] = {"reference": ref_name, "identical": not mismatched,
                                 "mismatched_prompts": mismatched, "first_difference_at": first}
    return report


def summarize(results: Sequence[MethodResult], baseline_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-method summaries; the speed-up is over the fastest ``baseline_names`` method."""
    medians = {r.method.name: statistics.median(x.tokens_per_second for x in r.runs) for r in results}
    base = max((medians[n] for n in baseline_names if n in medians), default=None)
    return [r.summary(base) for r in results]


@dataclass(frozen=True)
class Setting:
    """One sampling setting of a benchmark and the acceptance measured for it."""

    label: str  # "greedy", "T=0.6", ...
    sampling: SamplingConfig
    acceptance: np.ndarray  # [k] one vector, or [L, k] one row per tree depth


def setting_methods(
    setting: Setting,
    targets: dict[str, PreTrainedModel],  # dtype name -> target model, as Hugging Face loads it
    engine_dtype: str,
    engine_target: PreTrainedModel,  # the engine's target in engine_dtype (packed where that helps)
    proposer_factory: Callable[[], Proposer],
    sequoia_tree: Tree,
    eos: Sequence[int],
    assistant: PreTrainedModel | None,
    max_depth: int | None = None,
    replanner: Replanner | None = None,
    latency: tuple[LatencyFn, LatencyFn, float] | None = None,
    sequoia_proposer: Proposer | None = None,
    gain: float = 1.0,
) -> list[Method]:
    """Every method for one setting: ``generate`` per dtype, the HF peers, this engine without a
    draft (what the engine alone gains), and the trees (see :func:`tree_methods`)."""
    target = targets[engine_dtype]
    methods = [Method(f"generate {d}", hf_runner(m, setting.sampling, eos), d) for d, m in targets.items()]
    if assistant is not None:
        methods.append(Method("hf-assisted", hf_runner(target, setting.sampling, eos, assistant_model=assistant),
                              engine_dtype))
    methods.append(Method("hf-prompt-lookup", hf_runner(
        target, setting.sampling, eos, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS), engine_dtype))
    alone = Engine(engine_target, NoDraft(), Tree((-1,)), setting.sampling, eos_token_ids=eos)
    methods.append(Method(ENGINE_ALONE, engine_runner(alone), engine_dtype, alone.tree, 1.0,
                          latency[0](1.0) if latency else None))
    rows = TreeRows(engine_target, setting.acceptance, setting.sampling, eos, engine_dtype, latency)
    methods += tree_methods(rows, proposer_factory, sequoia_tree, max_depth, replanner, sequoia_proposer, gain)
    return methods
