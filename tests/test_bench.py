"""The benchmark's methods and bookkeeping, on tiny models (performance lives in results/)."""

from __future__ import annotations

import pytest
import torch

from sequoia.bench import markdown, write_report
from sequoia.drafts import LMProposer
from sequoia.errors import ConfigError
from sequoia.methods import (
    ForwardCounter,
    Method,
    Setting,
    greedy_agreement,
    hf_runner,
    run_bench,
    setting_methods,
    summarize,
)
from sequoia.models import tiny_llama
from sequoia.sampling import SamplingConfig
from sequoia.tree import Tree

PROMPTS = [torch.tensor([1, 5, 9, 2]), torch.tensor([7, 3, 3, 8, 1])]
GREEDY = Setting("greedy", SamplingConfig(), (0.5, 0.2, 0.1))


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(seed=0)
    return target, tiny_llama(seed=1), {"float32": target}


def test_forward_counter_counts_target_calls(models):
    target = models[0]
    counter = ForwardCounter(target)
    target.generate(PROMPTS[0][None], max_new_tokens=5, do_sample=False)
    counter.close()
    assert counter.calls == 5  # prefill + 4 single-token forwards; 5 tokens
    target(PROMPTS[0][None])
    assert counter.calls == 5  # the hook is gone


def test_all_methods_agree_in_greedy_and_steps_are_counted(models):
    target, draft, targets = models
    tree = Tree.from_choices([[0], [1], [0, 0], [1, 0], [0, 0, 0]])
    methods = setting_methods(GREEDY, targets, "float32", lambda: LMProposer(draft), tree, (), assistant=draft)
    names = [m.name for m in methods]
    assert names[:3] == ["generate float32", "hf-assisted", "hf-prompt-lookup"]
    assert [n.split(" (")[0] for n in names[3:]] == ["sequoia", "chain", "k-ary", "k-chains"]
    assert all(m.tree.size <= tree.size for m in methods[3:])
    results = run_bench(methods, PROMPTS, max_new_tokens=12, warmup_prompt=PROMPTS[0][:2])
    agreement = greedy_agreement(results, {"float32": "generate float32"})
    assert set(agreement) == set(names[1:]) and all(v["identical"] for v in agreement.values())
    plain = results[0]
    assert all(len(r.tokens) == 12 and r.steps == 12 for r in plain.runs)  # one forward per token
    rows = summarize(results, ["generate float32"])
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[3]["predicted_tokens_per_step"] > 1.0 and rows[0]["predicted_tokens_per_step"] is None


def test_agreement_reports_where_outputs_differ(models):
    target = models[0]
    wrong = Method("broken", lambda prompt, n: ([0] * n, n), "float32")
    plain = Method("generate float32", hf_runner(target, SamplingConfig(), ()), "float32")
    results = run_bench([plain, wrong], PROMPTS, max_new_tokens=6)
    report = greedy_agreement(results, {"float32": "generate float32"})["broken"]
    assert not report["identical"] and report["mismatched_prompts"] == [0, 1]
    assert all(0 <= i < 6 for i in report["first_difference_at"])


def test_interleaving_rotates_method_order():
    calls = []

    def make(name):
        return Method(name, lambda prompt, n, name=name: (calls.append(name) or [1], 1), None)

    run_bench([make("a"), make("b"), make("c")], [torch.tensor([1])] * 3, 1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    with pytest.raises(ConfigError, match="prompt"):
        run_bench([make("a")], [], 1)


def test_report_files(tmp_path):
    report = {
        "date": "2026-01-01", "machine": {"processor": "cpu", "torch": "2", "threads": 2},
        "config": {"target": "t", "draft": "d", "max_new_tokens": 8, "engine_dtype": "float32"},
        "prompts": ["a"],
        "notes": ["hf-assisted not run: the draft 'ngram' is not a causal LM"],
        "sections": [{
            "setting": "greedy", "acceptance": {"vector": [0.5], "samples": 10},
            "optimizer": {"size": 3, "depth": 2, "predicted_tokens_per_step": 1.75, "predicted_speedup": 1.4},
            "summary": [
                {"method": "generate float32", "tokens_per_s": 10.0, "tokens_per_s_min": 9.0, "tokens_per_s_max": 11.0,
                 "speedup": 1.0, "tokens_per_step": 1.0, "predicted_tokens_per_step": None},
                {"method": "sequoia (3 nodes, depth 2)", "tokens_per_s": 14.0, "tokens_per_s_min": 13.0,
                 "tokens_per_s_max": 15.0, "speedup": 1.4, "tokens_per_step": 1.7, "predicted_tokens_per_step": 1.75},
            ],
            "greedy_agreement": {"sequoia (3 nodes, depth 2)": {"identical": True, "mismatched_prompts": [],
                                                                "first_difference_at": []}},
        }],
    }
    text = markdown(report)
    assert "| sequoia (3 nodes, depth 2) | 14.0 (13.0–15.0) | 1.40x | 1.70 | 1.75 |" in text
    assert "all methods, every prompt" in text
    assert "Note: hf-assisted not run" in text
    paths = write_report(report, tmp_path / "run")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
