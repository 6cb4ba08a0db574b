"""The benchmark's methods and bookkeeping, on tiny models (performance lives in results/)."""

from __future__ import annotations

import pytest
import torch

from sequoia.bench.report import markdown, write_report
from sequoia.drafts import LMProposer, NgramProposer
from sequoia.errors import ConfigError
from sequoia.bench.methods import (
    ForwardCounter,
    Method,
    Setting,
    TreeRows,
    greedy_agreement,
    hf_runner,
    run_bench,
    setting_methods,
    summarize,
    tree_methods,
)
from sequoia.models import tiny_llama
from sequoia.sampling import SamplingConfig
from sequoia.solver import solve
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
    methods = setting_methods(GREEDY, targets, "float32", target, lambda: LMProposer(draft), tree, (), assistant=draft)
    names = [m.name for m in methods]
    assert names[:4] == ["generate float32", "hf-assisted", "hf-prompt-lookup", "engine, no draft"]
    assert [n.split(" (")[0] for n in names[4:]] == ["sequoia", "chain", "k-ary", "k-chains"]
    assert all(m.tree.size <= tree.size for m in methods[4:])
    results = run_bench(methods, PROMPTS, max_new_tokens=12, warmup_prompt=PROMPTS[0][:2])
    agreement = greedy_agreement(results, {"float32": "generate float32"})
    assert set(agreement) == set(names[1:]) and all(v["identical"] for v in agreement.values())
    plain = results[0]
    assert all(len(r.tokens) == 12 and r.steps == 12 for r in plain.runs)  # one forward per token
    assert all(len(r.tokens) == 12 and r.steps == 12 for r in results[3].runs)  # the engine alone, too
    rows = summarize(results, ["generate float32"])
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[3]["predicted_tokens_per_step"] == 1.0
    assert rows[4]["predicted_tokens_per_step"] > 1.0 and rows[0]["predicted_tokens_per_step"] is None


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
            "setting": "greedy",
            "acceptance": {"vector": [0.5], "samples": 10, "by_depth": [[0.5], [0.25]], "depth_samples": [10, 5]},
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
    assert "| sequoia (3 nodes, depth 2) | 14.0 (13.0–15.0) | 1.40x | 1.70 | 1.75 |  |  |" in text
    assert "depth 2: p[1] = 0.250 (5 positions)" in text
    assert "all methods, every prompt" in text
    assert "Note: hf-assisted not run" in text
    paths = write_report(report, tmp_path / "run")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)


def test_benchmark_end_to_end_with_a_trained_draft_and_an_assistant(tmp_path):
    """The whole ``benchmark`` on a tiny target: the trained draft's depth caps the optimizer's
    tree, its card prices the levels, HF assisted generation drafts with ``--assistant``, and
    every lossless method reproduces greedy ``generate``."""
    import numpy as np
    from trained_draft_helpers import random_draft
    from word_tokenizer import word_tokenizer

    from sequoia.bench.runner import BenchConfig, benchmark
    from sequoia.device import fingerprint
    from sequoia.drafts.card import save_draft, update_card
    from sequoia.profile import LatencyGrid, Profile

    target = tiny_llama(seed=0)
    target.save_pretrained(tmp_path / "target")
    word_tokenizer().save_pretrained(tmp_path / "target")
    save_draft(random_draft("mlp", target, heads=2), tmp_path / "mlp", "tiny")
    update_card(tmp_path / "mlp", {"evaluation": {"cost_ms_per_level": {"0": 0.2, "1": 0.5, "16": 1.0}, "cost_dtype": "bfloat16",
                                                  "cost_fingerprint": fingerprint("cpu")}})
    samples = np.array([10.0, 10.1, 10.2, 10.3])[None, :, None].repeat(3, axis=2)  # wide trees are free
    name = str((tmp_path / "target").resolve())
    device = {"name": "test", "dtype": "float32", "fingerprint": fingerprint("cpu")}
    Profile(LatencyGrid(name, (64,), (1, 8, 16, 32), samples), device, {}).save(tmp_path / "profile.json")
    (tmp_path / "prompts.txt").write_text("w3 w1 w4 w1 w5\nw9 w2 w6 w5 w3 w5\n")
    config = BenchConfig(
        profile=(str(tmp_path / "profile.json"),), target=name, draft=str(tmp_path / "mlp"), assistant="early-exit:1",
        dtypes=("float32",), engine_dtype="float32", prompts=str(tmp_path / "prompts.txt"), limit=2,
        max_new_tokens=8, chat=False, temperatures=(0.0,), acceptance_tokens=8,
    )
    report = benchmark(config)
    (section,) = report["sections"]
    assert 1 <= section["optimizer"]["depth"] <= 2
    acceptance = section["acceptance"]  # measured per depth for a draft with one head per level
    assert len(acceptance["depth_samples"]) == 2 and acceptance["by_depth"][0] == acceptance["vector"]
    assert acceptance["samples"] == acceptance["depth_samples"][0] >= acceptance["depth_samples"][1]
    trees = [name for name in section["runs"] if "nodes, depth" in name]
    assert len(trees) == 4 and all(int(name.split("depth ")[1].rstrip(")")) <= 2 for name in trees), trees
    assert {"generate float32", "hf-assisted", "hf-prompt-lookup"} <= set(section["runs"])
    agreement = section["greedy_agreement"]
    assert "hf-assisted" in agreement and all(a["identical"] for a in agreement.values()), agreement
    assert any("early-exit:1" in note for note in report["notes"])


def test_baseline_trees_keep_to_the_drafts_depth(models):
    target, _, _ = models
    sequoia_tree = solve(GREEDY.acceptance, 12, 2).tree(12, 2)
    rows = TreeRows(target, GREEDY.acceptance, GREEDY.sampling, (), "float32")
    free = tree_methods(rows, NgramProposer, sequoia_tree)
    capped = tree_methods(rows, NgramProposer, sequoia_tree, max_depth=2)
    assert max(m.tree.depth for m in free) == 11  # the best chain of 12 nodes
    assert [m.tree.depth for m in capped] == [2, 2, 2, 2] and all(m.tree.size <= 12 for m in capped)


def test_agreement_lines_tell_bfloat16_rounding_from_a_float32_bug():
    from sequoia.bench.report import agreement_lines

    agreement = {
        "sequoia (4 nodes, depth 2)": {"reference": "generate bfloat16", "identical": False,
                                       "mismatched_prompts": [0, 2], "first_difference_at": [28, 21]},
        "hf-prompt-lookup": {"reference": "generate bfloat16", "identical": False, "mismatched_prompts": [1],
                             "first_difference_at": [37]},
        "chain (4 nodes, depth 3)": {"reference": "generate float32", "identical": True, "mismatched_prompts": [],
                                     "first_difference_at": []},
    }
    same, bf16 = agreement_lines(agreement)
    assert same.endswith(": chain (4 nodes, depth 3).")
    assert bf16.startswith("First divergence from generate bfloat16: sequoia: prompt 0 @ token 28, prompt 2 @ token 21; "
                           "hf-prompt-lookup: prompt 1 @ token 37 -- ")
    agreement["chain (4 nodes, depth 3)"].update(identical=False, mismatched_prompts=[1], first_difference_at=[5])
    assert agreement_lines(agreement)[-1].startswith("DIFFERENT from generate float32")
    assert agreement_lines(None) == []


def test_a_plain_plan_runs_one_engine_row(models):
    target = models[0]
    rows = TreeRows(target, GREEDY.acceptance, GREEDY.sampling, (), "float32", (lambda n: 30.0 * n, lambda w: 0.0))
    methods = tree_methods(rows, NgramProposer, Tree((-1,)))
    (only,) = methods
    assert only.name == "sequoia (1 nodes, depth 0)" and only.predicted_ms_per_token == 30.0


def test_a_compared_draft_gets_its_own_planned_row_and_per_step_rows_are_priced(tmp_path):
    """``--compare``: the same Chimera static (compared) and with per-step trees (the draft):
    acceptance is measured with static trees for both (a shaping proposer would reshape the
    measuring tree), so it comes out the same; the per-step row's prediction carries the card's
    gain; every row reproduces greedy ``generate``."""
    import numpy as np
    from trained_draft_helpers import random_draft
    from word_tokenizer import word_tokenizer

    from sequoia.bench.runner import BenchConfig, benchmark
    from sequoia.device import fingerprint
    from sequoia.drafts.card import save_draft, update_card
    from sequoia.dynamic import Calibration, TreeShaper
    from sequoia.profile import LatencyGrid, Profile
    from sequoia.solver import expected_tokens

    target = tiny_llama(seed=0)
    target.save_pretrained(tmp_path / "target")
    word_tokenizer().save_pretrained(tmp_path / "target")
    chimera = random_draft("chimera", target, heads=2, ids=list(range(target.config.vocab_size)), recurrent=True)
    save_draft(chimera, tmp_path / "chimera", "tiny")
    shaper = TreeShaper(Calibration.identity("greedy"), Calibration.identity("stochastic")).to_json()
    update_card(tmp_path / "chimera", {
        "evaluation": {"cost_ms_per_level": {"0": 0.001, "1": 0.001, "16": 0.001}, "cost_dtype": "float32",
                       "cost_fingerprint": fingerprint("cpu")},
        "per_step_trees": {**shaper, "gain": {"greedy": {"4": 1.5, "64": 1.5}}},
    })
    samples = np.array([10.0, 10.1, 10.2, 10.3])[None, :, None].repeat(3, axis=2)  # wide trees are free
    name = str((tmp_path / "target").resolve())
    device = {"name": "test", "dtype": "float32", "fingerprint": fingerprint("cpu")}
    Profile(LatencyGrid(name, (64,), (1, 8, 16, 32), samples), device, {}).save(tmp_path / "profile.json")
    (tmp_path / "prompts.txt").write_text("w3 w1 w4 w1 w5\nw9 w2 w6 w5 w3 w5\n")
    draft = str(tmp_path / "chimera")
    config = BenchConfig(
        profile=(str(tmp_path / "profile.json"),), target=name, draft=f"{draft}:per-step", compare=(draft,),
        dtypes=("float32",), engine_dtype="float32", prompts=str(tmp_path / "prompts.txt"), limit=2,
        max_new_tokens=8, chat=False, temperatures=(0.0,), acceptance_tokens=32, max_depth=3,
    )
    report = benchmark(config)
    (section,) = report["sections"]
    (other,) = section["compared"]
    assert other["draft"] == draft and other["acceptance"] == section["acceptance"]
    assert len(section["acceptance"]["depth_samples"]) == 3  # a recurrent draft: by depth, up to --max-depth
    static, shaped = other["optimizer"], section["optimizer"]
    rows = {row["method"].split(" (")[0]: row for row in section["summary"]}
    assert {"sequoia", f"sequoia, {draft}", "chain", "k-ary", "k-chains"} <= set(rows)
    assert rows[f"sequoia, {draft}"]["predicted_tokens_per_step"] == pytest.approx(static["predicted_tokens_per_step"])
    assert rows["sequoia"]["predicted_tokens_per_step"] == pytest.approx(shaped["predicted_tokens_per_step"])
    assert shaped["size"] >= 4  # the card's gain (1.5 from 4 nodes on) makes a tree pay
    static_tokens = expected_tokens(Tree(tuple(shaped["parents"])), np.asarray(section["acceptance"]["by_depth"]))
    assert shaped["predicted_tokens_per_step"] == pytest.approx(1.5 * static_tokens)
    agreement = section["greedy_agreement"]
    assert f"sequoia, {draft} ({static['size']} nodes, depth {static['depth']})" in agreement
    assert all(a["identical"] for a in agreement.values()), agreement
    text = markdown(report)
    assert f"and `{draft}`" in text and f"`{draft}`: acceptance p[1] = " in text
