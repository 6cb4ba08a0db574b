"""``sequoia generate`` on tiny local models: output equals greedy ``generate``; bad input is
one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner
from word_tokenizer import WORDS
from word_tokenizer import word_tokenizer as _tokenizer

from sequoia.acceptance import AcceptanceResult
from sequoia.models import tiny_llama
from sequoia.tree import Tree
from sequoia_cli.main import app
from cli_helpers import assert_user_error, cache_profiles

PROMPT = "w3 w1 w4 w1 w5 w9 w2 w6"


def _model_dir(path, seed: int, words: list[str] = WORDS):
    tiny_llama(seed=seed).save_pretrained(path)
    _tokenizer(words).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    swapped = WORDS[1:2] + WORDS[:1] + WORDS[2:]
    return {
        "target": _model_dir(root / "target", 0),
        "draft": _model_dir(root / "draft", 1),
        "other-tokenizer": _model_dir(root / "other", 1, swapped),
    }


def _run(*args: str):
    return CliRunner().invoke(app, ["generate", *args])


def _greedy_text(target_dir: str, max_new_tokens: int) -> str:
    tok = _tokenizer(WORDS)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    out = tiny_llama(seed=0).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("draft", ["ngram", "none", "draft", "early-exit:1"])
def test_greedy_output_equals_generate(dirs, draft):
    spec = dirs.get(draft, draft)
    result = _run("--target", dirs["target"], "--draft", spec, "--dtype", "float32", "--prompt", PROMPT,
                  "--max-new-tokens", "20")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == _greedy_text(dirs["target"], 20)
    assert "tokens/s" in result.stderr and "tokens/step" in result.stderr
    for part in ("draft", "target", "verify", "cache", "other"):
        assert part in result.stderr


def test_solver_tree_from_acceptance_and_tree_file(dirs, tmp_path):
    accept = tmp_path / "acceptance.json"
    AcceptanceResult(target="t", draft="d", mode="greedy", temperature=0.0, top_p=1.0, vector=(0.6, 0.2, 0.1),
                     stderr=(0.0, 0.0, 0.0), samples=100, prompts="test").save(accept)
    solved = _run("--target", dirs["target"], "--draft", dirs["draft"], "--budget", "12", "--max-depth", "4",
                  "--acceptance", str(accept), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert solved.exit_code == 0, solved.output
    assert "tree of 12 nodes, depth 4" in solved.stderr
    tree_file = tmp_path / "tree.json"
    Tree.from_children_counts([2, 1, 1]).save(tree_file)
    from_file = _run("--target", dirs["target"], "--tree", str(tree_file), "--prompt-file", str(_prompt_file(tmp_path)),
                     "--max-new-tokens", "16")
    assert from_file.exit_code == 0, from_file.output
    assert solved.stdout == from_file.stdout == _greedy_text(dirs["target"], 16) + "\n"


def _prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT)
    return path


def test_stochastic_is_reproducible_with_a_seed(dirs):
    args = ["--target", dirs["target"], "--draft", dirs["draft"], "--prompt", PROMPT, "--max-new-tokens", "12",
            "--temperature", "0.8", "--top-p", "0.9", "--no-replan"]  # a tree chosen by timing would vary
    first, second = _run(*args, "--seed", "5"), _run(*args, "--seed", "5")
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and len(first.stdout.split()) == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["--draft", "@other-tokenizer"], "tokenizers disagree"),
        (["--tree", "@bad-tree"], "node 0 must be the root"),
        (["--tree", "@missing"], "not found"),
        (["--prompt", " ".join(["w7"] * 300)], "context"),
        (["--temperature", "-0.5"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.5"], "top-p"),
        (["--mode", "beam"], "--mode"),
        (["--threads", "0"], "thread"),
        (["--budget", "8"], "--acceptance"),
        (["--draft", "none", "--tree", "@bad-tree"], "--draft none"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(dirs, tmp_path, args, message):
    bad_tree = tmp_path / "bad.json"
    bad_tree.write_text(json.dumps({"format": "sequoia-tree/1", "parents": [0, 0]}))
    paths = {"@other-tokenizer": dirs["other-tokenizer"], "@bad-tree": str(bad_tree),
             "@missing": str(tmp_path / "nope.json")}
    args = [paths.get(a, a) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", PROMPT]
    result = _run("--target", dirs["target"], *args)
    assert_user_error(result, message)
    assert result.stdout == ""


def test_a_trained_draft_decodes_losslessly_within_its_depth(dirs, tmp_path):
    from trained_draft_helpers import random_draft

    from sequoia.drafts.card import save_draft

    save_draft(random_draft("mlp", tiny_llama(seed=0), heads=2), tmp_path / "mlp", "tiny")
    accept = tmp_path / "acceptance.json"
    AcceptanceResult(target="t", draft="d", mode="greedy", temperature=0.0, top_p=1.0, vector=(0.6, 0.2, 0.1),
                     stderr=(0.0, 0.0, 0.0), samples=100, prompts="test").save(accept)
    solved = _run("--target", dirs["target"], "--draft", str(tmp_path / "mlp"), "--budget", "8",
                  "--acceptance", str(accept), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert solved.exit_code == 0, solved.output
    assert "tree of 8 nodes, depth 2" in solved.stderr  # the solver kept to the draft's 2 levels
    assert solved.stdout == _greedy_text(dirs["target"], 16) + "\n"


def test_acceptance_by_depth_cli(dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w3 w1 w4\nw9 w2 w6 w5\nw2 w7\n")
    out = tmp_path / "acc.json"
    result = CliRunner().invoke(app, [
        "acceptance", "--target", dirs["target"], "--draft", dirs["target"], "--prompts", str(prompts), "--no-chat",
        "--width", "3", "--depth", "2", "--max-new-tokens", "60", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    acc = AcceptanceResult.load(out)  # a draft equal to the target: its first candidate, at every depth
    assert acc.by_depth == ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)) and acc.vector == acc.by_depth[0]
    assert acc.depth_samples[1] >= 30 and "depth 2: first candidate 1.0000" in result.stdout
    bad = CliRunner().invoke(app, ["acceptance", "--target", dirs["target"], "--depth", "0", "--out", str(tmp_path / "b.json")])
    assert_user_error(bad, "--width and --depth", tmp_path / "b.json")


def test_without_tree_options_the_plan_picks_dtype_and_tree_for_this_device(tmp_path):
    target = _model_dir(tmp_path / "planned", 0)
    cache_profiles(target, {"float32": [10, 20, 40, 80, 160], "bfloat16": [12, 12.2, 12.4, 12.8, 13.6]})
    result = _run("--target", target, "--draft", "ngram", "--prompt", PROMPT, "--max-new-tokens", "8", "--no-replan")
    assert result.exit_code == 0, result.output
    assert "plan: bfloat16, tree of" in result.stderr and "float32 cached, bfloat16 cached" in result.stderr
    assert "steps in bfloat16" in result.stderr
    forced = _run("--target", target, "--draft", "ngram", "--dtype", "float32", "--prompt", PROMPT,
                  "--max-new-tokens", "8")
    assert forced.exit_code == 0, forced.output
    assert "plan: plain decoding in float32" in forced.stderr and "verifying 2 tokens costs 2.00x" in forced.stderr
    assert forced.stdout.strip() == _greedy_text(target, 8)


def test_a_foreign_profile_is_refused_in_one_line(dirs, tmp_path):
    import numpy as np

    from sequoia.device import fingerprint
    from sequoia.profile import LatencyGrid, Profile
    from sequoia.profile_cache import model_name

    samples = np.repeat(np.asarray([10.0, 10.5, 11.0])[None, :, None], 3, axis=2)
    other = {**fingerprint("cpu"), "cpu_model": "Intel(R) Xeon(R) Processor", "isa_flags": ["avx512f", "amx_bf16"]}
    grid = LatencyGrid(model_name(dirs["target"]), (64,), (1, 2, 4), samples)
    Profile(grid, {"dtype": "bfloat16", "fingerprint": other}, {}).save(tmp_path / "xeon.json")
    result = _run("--target", dirs["target"], "--draft", "ngram", "--profile", str(tmp_path / "xeon.json"),
                  "--prompt", PROMPT)
    assert_user_error(result, "measured on another device")
    assert result.stdout == ""
    assert "cpu_model: Intel(R) Xeon(R) Processor (recorded)" in result.stderr
