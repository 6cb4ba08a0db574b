"""``sequoia bench``: measure -> solve -> decode, every method side by side; write ``results/``.

For each sampling setting (greedy, and each temperature) the benchmark measures the acceptance
vector on the benchmark prompts (per tree depth for a trained draft, whose deeper heads are less
accurate -- :func:`sequoia.acceptance.measure_counts_by_depth`), asks for this device's plan
(:func:`sequoia.planning.plan_on_device`: the dtype and tree with the least predicted time per
token from this device's profiles, cached or measured now; plain decoding when no tree pays),
builds the best chain, k-ary and k-chains trees of the same size, and runs them against Hugging
Face ``generate`` (each dtype), assisted generation and prompt lookup on the same prompts,
interleaved (:mod:`sequoia.bench.methods`). Each ``compare`` draft adds one more Sequoia row, its
acceptance measured and its tree planned the same way, so two drafts (or a draft with static and
with per-step trees) meet in one interleaved run. A per-step draft's acceptance is measured, and
its baseline trees run, with static trees; its Sequoia row shapes trees within the plan's budget,
predicted with the card's measured gain. The report holds every run, the medians, the
speed-ups over the fastest plain ``generate``, predicted against measured tokens/step and time
per token, and the greedy token-for-token agreement check.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from sequoia import device as devices
from sequoia.acceptance import measure_counts_by_depth, rates_by_depth
from sequoia.bench.methods import Setting, TreeRows, greedy_agreement, run_bench, setting_methods, summarize
from sequoia.drafts import DraftSpec, LMProposer, NoDraft, Proposer
from sequoia.errors import ConfigError
from sequoia.models import DEFAULT_MODEL, eos_token_ids, load_model
from sequoia.planning import DevicePlan, plan_on_device
from sequoia.kernel_tuning import fast_copy
from sequoia.profile import Profile
from sequoia.profile_cache import Targets, check_profile, here
from sequoia.prompts import load_prompts, render_prompt
from sequoia.sampling import SamplingConfig
from sequoia.solver import expected_tokens
from sequoia.tree import Tree

RESULT_FORMAT = "sequoia-bench/1"
RECURRENT_DEPTHS = 4  # levels of a recurrent draft measured apart (deeper ones agree within a point or two)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run depends on (stored in the result for reproducibility)."""

    profile: tuple[str, ...] = ()  # target profiles (one per dtype); (): this device's, cached or measured now
    target: str = DEFAULT_MODEL
    draft: str | None = None  # None: the target's default draft (see DraftSpec.resolve)
    compare: tuple[str, ...] = ()  # more drafts, one Sequoia row each (planned for each alike)
    draft_profile: str | None = None
    assistant: str | None = None  # causal-LM draft for HF assisted generation when ``draft`` is not one
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # plain generate baselines (and the dtypes planned over)
    engine_dtype: str | None = None  # the engine's and the HF peers' dtype; None: the plan's choice
    device: str = "cpu"
    threads: int | None = None
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
    foreign_profile: bool = False  # accept profiles of another device
    replan: bool = True  # the Sequoia row re-plans as generate does
    seed: int = 0


def benchmark(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole comparison; returns the ``sequoia-bench/1`` report (nothing is written)."""
    draft = DraftSpec.resolve(config.draft, config.target)
    config = replace(config, draft=draft.name, profile=tuple(config.profile), compare=tuple(config.compare))
    load_before = _load_average()
    limits = draft.limits
    if config.engine_dtype is not None and config.engine_dtype not in config.dtypes:
        raise ConfigError(f"the engine dtype {config.engine_dtype} must be one of --dtypes {config.dtypes}")
    fixed_tree = Tree.load(config.tree) if config.tree else None
    engines = Targets(config.target, config.device, config.threads)
    targets = {d: load_model(config.target, dtype=d, device=config.device, threads=config.threads, prepack=False)
               for d in config.dtypes}
    for d, loaded in targets.items():  # the engine runs the same weights, packed where that helps
        engines.models[d] = replace(loaded, model=fast_copy(loaded.model))
    main = next(iter(targets.values()))
    fp = here(config.device)
    notes: list[str] = []
    planned_dtypes = [config.engine_dtype] if config.engine_dtype else [d for d in fp.get("dtypes", ()) if d in config.dtypes]
    planned_dtypes = planned_dtypes or list(config.dtypes[:1])
    prompt_set = load_prompts(config.prompts, config.limit)
    prompts = [torch.tensor(render_prompt(main.tokenizer, p.text, config.chat)) for p in prompt_set]
    eos = eos_token_ids(main.model, main.tokenizer)
    proposers = _Proposers(draft, engines, config)
    prefix_len = int(sum(len(p) for p in prompts) / len(prompts) + config.max_new_tokens / 2)
    level_ms = _draft_profile_costs(config, prefix_len, fp, notes) if config.draft_profile else None
    measure_dtype = config.engine_dtype or ("float32" if "float32" in config.dtypes else config.dtypes[0])
    if any(engines.models[d].model is not targets[d].model for d in config.dtypes):
        notes.append("the engine (`engine, no draft` and the tree rows) runs the target with its linear weights "
                     "packed once or on the kernels measured fastest here (sequoia.prepack, sequoia.kernels); `generate` "
                     "and the HF peers run the model as Hugging Face loads it")
    if proposers.assistant(measure_dtype) is None:
        notes.append(f"hf-assisted not run: the draft {config.draft!r} is not a causal LM (assisted generation "
                     "needs one: pass --assistant early-exit:N or a draft model)")
    elif proposers.shared(measure_dtype) is None:
        notes.append(f"hf-assisted drafts with {config.assistant!r} (the tree draft {config.draft!r} is not a causal LM)")

    def planned(spec: DraftSpec, props: _Proposers, sampling: SamplingConfig, label: str, level_ms=None):
        """``spec``'s acceptance measured on the prompts (a static proposer: a per-step one
        would reshape the measuring tree) and this device's plan for it."""
        counts, samples = measure_counts_by_depth(
            engines.get(measure_dtype).model, props.static(measure_dtype)(), prompts, config.acceptance_width,
            sampling, _measured_depth(spec, config.max_depth), config.acceptance_tokens, eos, config.seed,
        )
        rates = rates_by_depth(counts, samples)
        setting = Setting(label, sampling, rates if len(rates) > 1 else rates[0])
        plan = plan_on_device(
            config.target, spec, setting.acceptance, "measured on the bench prompts", planned_dtypes,
            config.device, engines, prefix_len, config.max_depth, config.profile, config.foreign_profile,
            progress, notes.append, level_ms=level_ms, per_step_gain=spec.per_step_gain(sampling.greedy),
        )
        acceptance = {"vector": rates[0].tolist(), "samples": int(samples[0]), "measured_in": measure_dtype,
                      "by_depth": rates.tolist(), "depth_samples": samples.tolist()}
        return setting, plan, acceptance

    def optimizer_record(plan: DevicePlan, tree: Tree, setting: Setting, replanner) -> dict[str, Any]:
        p = plan.plan
        return {"dtype": p.dtype, "size": tree.size, "depth": tree.depth, "parents": list(tree.parents),
                "predicted_tokens_per_step": float(expected_tokens(tree, setting.acceptance) * plan.gain(tree.size)),
                "predicted_ms_per_token": p.predicted_ms_per_token, "predicted_speedup": p.speedup,
                "plain_dtype": p.plain_dtype, "plain_ms_per_token": p.plain_ms, "reason": p.reason,
                "profiles": {d: {"path": str(c.path), "measured_now": c.measured} for d, c in plan.profiles.items()},
                "draft_costs": {d: c.source for d, c in plan.draft_costs.items()},
                "replans": replanner.events if replanner else []}

    compared = [(spec, _Proposers(spec, engines, config))
                for spec in (DraftSpec.resolve(name, config.target) for name in config.compare)]
    sections = []
    for temperature in config.temperatures:
        sampling = SamplingConfig(temperature, config.top_p if temperature else 1.0)
        label = "greedy" if sampling.greedy else f"T={temperature:g}" + (f", top-p={config.top_p:g}" if config.top_p < 1 else "")
        setting, planned_draft, acceptance = planned(draft, proposers, sampling, label, level_ms)
        plan = planned_draft.plan
        tree = fixed_tree or plan.tree
        dtype = plan.dtype
        if tree.size == 1 and draft.kind != "none" and fixed_tree is None:
            notes.append(f"{label}: {plan.reason}")
        factory = NoDraft if tree.size == 1 else proposers.static(dtype)
        replanner = planned_draft.replanner() if config.replan and fixed_tree is None else None
        latency = planned_draft.latency_fns(dtype)
        methods = setting_methods(setting, {d: t.model for d, t in targets.items()}, dtype,
                                  engines.get(dtype).model, factory, tree, eos, proposers.assistant(dtype),
                                  limits.max_depth, replanner=replanner, latency=latency,
                                  sequoia_proposer=proposers.factory(dtype)() if tree.size > 1 else None,
                                  gain=planned_draft.gain(tree.size))
        others = []
        for spec, props in compared:  # one more Sequoia row per compared draft, planned for it alike
            other_setting, other, other_acceptance = planned(spec, props, sampling, label)
            other_tree, other_dtype = other.plan.tree, other.plan.dtype
            other_replanner = other.replanner() if config.replan else None
            rows = TreeRows(engines.get(other_dtype).model, other_setting.acceptance, sampling, eos, other_dtype,
                            other.latency_fns(other_dtype))
            methods.append(rows.method(f"sequoia, {spec}", props.factory(other_dtype)() if other_tree.size > 1 else NoDraft(),
                                       other_tree, other_replanner, other.gain(other_tree.size)))
            others.append({"draft": str(spec), "acceptance": other_acceptance,
                           "optimizer": optimizer_record(other, other_tree, other_setting, other_replanner)})
        step = (lambda done, total, name, lbl=label: progress(done, total, f"{lbl}: {name}")) if progress else None
        results = run_bench(methods, prompts, config.max_new_tokens, prompts[0][:8], step)
        baselines = [f"generate {d}" for d in config.dtypes]
        sections.append({
            "setting": label,
            "temperature": temperature,
            "top_p": sampling.top_p,
            "acceptance": acceptance,
            "optimizer": optimizer_record(planned_draft, tree, setting, replanner),
            **({"compared": others} if others else {}),
            "summary": summarize(results, baselines),
            "greedy_agreement": greedy_agreement(results, {d: f"generate {d}" for d in config.dtypes})
            if sampling.greedy else None,
            "runs": {r.method.name: [{"new_tokens": len(x.tokens), "seconds": x.seconds, "steps": x.steps,
                                      "decode_seconds": x.decode_seconds}
                                     for x in r.runs] for r in results},
        })
    return {
        "format": RESULT_FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": devices.describe(fp),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": config.device,
                    "fingerprint": fp, "fingerprint_key": devices.fingerprint_key(fp),
                    "load_average": {"before": load_before, "after": _load_average()}},
        "config": asdict(config),
        "prompts": [p.id for p in prompt_set],
        "notes": notes,
        "sections": sections,
    }


def _measured_depth(spec: DraftSpec, max_depth: int) -> int:
    """Tree depths the bench measures acceptance at: a trained draft's levels (a recurrent one's
    first ``RECURRENT_DEPTHS``; the solver reuses the last row deeper down); one for the others,
    whose acceptance does not depend on the depth."""
    if spec.kind != "trained":
        return 1
    return max(1, spec.limits.cap(min(max_depth, RECURRENT_DEPTHS) if spec.limits.max_depth is None else max_depth))


def _load_average() -> float:
    """The 1-minute load average: a shared machine's other work moves every timing."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0


class _Proposers:
    """The draft per engine dtype: a fresh proposer per engine, an LM draft's weights loaded
    once per dtype and shared; and HF assisted generation's causal-LM draft."""

    def __init__(self, draft: DraftSpec, engines: Targets, config: BenchConfig) -> None:
        self.draft, self.engines, self.config = draft, engines, config
        self._shared: dict[str, Any] = {}
        self._assistants: dict[str, Any] = {}

    def shared(self, dtype: str):
        if dtype not in self._shared:
            probe = self.draft.proposer(self.engines.get(dtype), dtype=dtype, device=self.config.device)
            self._shared[dtype] = probe.model if isinstance(probe, LMProposer) else None
        return self._shared[dtype]

    def factory(self, dtype: str) -> Callable[[], Proposer]:
        shared = self.shared(dtype)
        if shared is not None:
            return lambda: LMProposer(shared)
        return lambda: self.draft.proposer(self.engines.get(dtype), dtype=dtype, device=self.config.device)

    def static(self, dtype: str) -> Callable[[], Proposer]:
        """Proposers that keep the trees they are given: a per-step draft's static self."""
        if not self.draft.per_step:
            return self.factory(dtype)
        static = replace(self.draft, per_step=False)
        return lambda: static.proposer(self.engines.get(dtype), dtype=dtype, device=self.config.device)

    def assistant(self, dtype: str):
        """HF's peers run plain models, as their users would."""
        if dtype not in self._assistants:
            spec = self.config.draft if self.shared(dtype) is not None else self.config.assistant
            self._assistants[dtype] = None if spec is None else DraftSpec.resolve(spec, self.config.target).causal_lm(
                self.engines.get(dtype), dtype=dtype, device=self.config.device)
        return self._assistants[dtype]


def _draft_profile_costs(config: BenchConfig, prefix_len: int, fp: dict[str, Any], notes: list[str]) -> dict[int, float]:
    """``--draft-profile``'s cost per level (its draft section, or its own grid), of this device."""
    prof = Profile.load(config.draft_profile)
    check_profile(prof, config.draft_profile, fp, config.foreign_profile, notes.append)
    grid = prof.draft or prof.target
    return {int(w): grid.latency(w, prefix_len) for w in grid.tokens}


def load_settings(temperatures: Sequence[float]) -> tuple[float, ...]:
    """Validate the list of temperatures (0 = greedy)."""
    if not temperatures or any(not t >= 0 for t in temperatures):
        raise ConfigError("--temperatures takes numbers >= 0 (0 = greedy), e.g. 0,0.6,1.0")
    return tuple(float(t) for t in temperatures)
