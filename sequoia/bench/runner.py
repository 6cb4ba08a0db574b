"""``sequoia bench``: measure -> solve -> decode, every method side by side; write ``results/``.

For each sampling setting (greedy, and each temperature) the benchmark takes the acceptance
vector (measured here on the benchmark prompts unless given; per tree depth for a trained
draft, whose deeper heads are less accurate -- :func:`sequoia.acceptance.measure_counts_by_depth`),
asks the optimizer for the
fastest tree on the profiled device, builds the best chain, k-ary and k-chains trees of the
same size, and runs them against Hugging Face ``generate`` (each dtype), assisted generation
and prompt lookup on the same prompts, interleaved (:mod:`sequoia.bench.methods`). The report holds
every run, the medians, the speed-ups over the fastest plain ``generate``, measured against
predicted tokens/step, and the greedy token-for-token agreement check.
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from sequoia.acceptance import measure_counts_by_depth, rates_by_depth
from sequoia.drafts import DraftSpec, LMProposer, Proposer
from sequoia.models import eos_token_ids
from sequoia.errors import ConfigError
from sequoia.bench.methods import Setting, greedy_agreement, run_bench, setting_methods, summarize
from sequoia.models import DEFAULT_MODEL, load_model
from sequoia.optimizer import choose
from sequoia.kernels import fast_copy
from sequoia.profile import Profile
from sequoia.prompts import load_prompts, render_prompt
from sequoia.sampling import SamplingConfig
from sequoia.tree import Tree

RESULT_FORMAT = "sequoia-bench/1"
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run depends on (stored in the result for reproducibility)."""

    profile: str  # target profile (sequoia-profile/1) in the engine's dtype
    target: str = DEFAULT_MODEL
    draft: str | None = None  # None: the target's default draft (see DraftSpec.resolve)
    draft_profile: str | None = None
    assistant: str | None = None  # causal-LM draft for HF assisted generation when ``draft`` is not one
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # plain generate baselines
    engine_dtype: str = "bfloat16"  # the engine's and the HF peers' target dtype
    device: str = "cpu"
    prompts: str = "builtin"
    limit: int | None = 6
    max_new_tokens: int = 64
    chat: bool = True
    temperatures: tuple[float, ...] = (0.0, 0.6, 1.0)  # 0 = greedy
    top_p: float = 1.0
    acceptance_width: int = 8
    acceptance_tokens: int = 32
    max_depth: int = 12
    tree: str | None = None  # a fixed tree instead of the optimizer's
    seed: int = 0


def benchmark(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole comparison; returns the ``sequoia-bench/1`` report (nothing is written)."""
    draft = DraftSpec.resolve(config.draft, config.target)
    config = replace(config, draft=draft.name)
    limits = draft.limits
    max_depth = limits.cap(config.max_depth)
    if config.engine_dtype not in config.dtypes:
        raise ConfigError(f"the engine dtype {config.engine_dtype} must be one of --dtypes {config.dtypes}")
    profile = Profile.load(config.profile)
    draft_profile = Profile.load(config.draft_profile) if config.draft_profile else None
    fixed_tree = Tree.load(config.tree) if config.tree else None
    targets = {d: load_model(config.target, dtype=d, device=config.device, prepack=False) for d in config.dtypes}
    main = targets[config.engine_dtype]
    engine_main = replace(main, model=fast_copy(main.model))
    if profile.model != main.name:
        raise ConfigError(f"{config.profile} profiles {profile.model!r}, not the target {main.name!r}")
    prompt_set = load_prompts(config.prompts, config.limit)
    prompts = [torch.tensor(render_prompt(main.tokenizer, p.text, config.chat)) for p in prompt_set]
    eos = eos_token_ids(main.model, main.tokenizer)
    probe = draft.proposer(engine_main, dtype=config.engine_dtype, device=config.device)
    shared = probe.model if isinstance(probe, LMProposer) else None
    assistant_spec = config.draft if shared is not None else config.assistant
    assistant = None
    if assistant_spec is not None:  # HF's peers run plain models, as their users would
        assistant = DraftSpec.resolve(assistant_spec, config.target).causal_lm(
            main, dtype=config.engine_dtype, device=config.device
        )

    def factory() -> Proposer:
        """A fresh proposer per engine; an LM draft's weights are loaded once and shared."""
        if shared is not None:
            return LMProposer(shared)
        return draft.proposer(engine_main, dtype=config.engine_dtype, device=config.device)
    prefix_len = int(sum(len(p) for p in prompts) / len(prompts) + config.max_new_tokens / 2)
    notes = []
    if engine_main.model is not main.model:
        notes.append("the engine (`engine, no draft` and the tree rows) runs the target with its linear weights "
                     "packed once or on the kernels measured fastest here (sequoia.prepack, sequoia.kernels); `generate` "
                     "and the HF peers run the model as Hugging Face loads it")
    if assistant is None:
        notes.append(f"hf-assisted not run: the draft {config.draft!r} is not a causal LM (assisted generation "
                     "needs one: pass --assistant early-exit:N or a draft model)")
    elif shared is None:
        notes.append(f"hf-assisted drafts with {config.assistant!r} (the tree draft {config.draft!r} is not a causal LM)")

    sections = []
    for temperature in config.temperatures:
        sampling = SamplingConfig(temperature, config.top_p if temperature else 1.0)
        label = "greedy" if sampling.greedy else f"T={temperature:g}" + (f", top-p={config.top_p:g}" if config.top_p < 1 else "")
        counts, samples = measure_counts_by_depth(
            engine_main.model, factory(), prompts, config.acceptance_width, sampling,
            1 if limits.max_depth is None else max(max_depth, 1), config.acceptance_tokens, eos, config.seed,
        )
        rates = rates_by_depth(counts, samples)
        setting = Setting(label, sampling, rates if len(rates) > 1 else rates[0])
        choice = choose(profile, setting.acceptance, prefix_len, draft_profile, max_depth=config.max_depth,
                        draft=limits)
        tree = fixed_tree or choice.best.tree
        methods = setting_methods(setting, {d: t.model for d, t in targets.items()}, config.engine_dtype,
                                  engine_main.model, factory, tree, eos, assistant, limits.max_depth)
        step = (lambda done, total, name, lbl=label: progress(done, total, f"{lbl}: {name}")) if progress else None
        results = run_bench(methods, prompts, config.max_new_tokens, prompts[0][:8], step)
        baselines = [f"generate {d}" for d in config.dtypes]
        sections.append({
            "setting": label,
            "temperature": temperature,
            "top_p": sampling.top_p,
            "acceptance": {"vector": rates[0].tolist(), "samples": int(samples[0]),
                           "by_depth": rates.tolist(), "depth_samples": samples.tolist()},
            "optimizer": {"size": choice.best.size, "depth": choice.best.depth,
                          "predicted_tokens_per_step": choice.best.expected_tokens,
                          "predicted_speedup": choice.speedup},
            "summary": summarize(results, baselines),
            "greedy_agreement": greedy_agreement(results, {d: f"generate {d}" for d in config.dtypes})
            if sampling.greedy else None,
            "runs": {r.method.name: [{"new_tokens": len(x.tokens), "seconds": x.seconds, "steps": x.steps}
                                     for x in r.runs] for r in results},
        })
    return {
        "format": RESULT_FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": config.device},
        "config": asdict(config),
        "prompts": [p.id for p in prompt_set],
        "notes": notes,
        "sections": sections,
    }



def load_settings(temperatures: Sequence[float]) -> tuple[float, ...]:
    """Validate the list of temperatures (0 = greedy)."""
    if not temperatures or any(not t >= 0 for t in temperatures):
        raise ConfigError("--temperatures takes numbers >= 0 (0 = greedy), e.g. 0,0.6,1.0")
    return tuple(float(t) for t in temperatures)
