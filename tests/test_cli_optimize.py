"""`sequoia optimize`: writes the chosen tree, refuses mismatched or malformed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sequoia.acceptance import AcceptanceResult
from sequoia.device import fingerprint
from sequoia.profile import LatencyGrid, Profile
from sequoia.tree import Tree
from sequoia_cli.main import app
from cli_helpers import assert_user_error

runner = CliRunner()


def _write_inputs(tmp_path, acc_target="tiny", draft="ngram", device=None):
    samples = np.array([30.0, 31.0, 35.0, 50.0, 90.0])[None, :, None].repeat(3, axis=2)
    grid = LatencyGrid("tiny", (256,), (1, 4, 16, 32, 64), samples)
    device = device or {"name": "test-cpu", "dtype": "float32", "fingerprint": fingerprint("cpu")}
    Profile(grid, device, {}).save(tmp_path / "profile.json")
    for name, vec, temp in (("greedy", [0.7, 0.1], 0.0), ("t1", [0.4, 0.15, 0.05], 1.0)):
        AcceptanceResult(
            target=acc_target, draft=draft, mode="greedy" if temp == 0 else "stochastic",
            temperature=temp, top_p=1.0, vector=tuple(vec), stderr=(0.01,) * len(vec), samples=100,
            prompts="builtin",
        ).save(tmp_path / f"{name}.json")


def test_optimize_writes_tree_and_shows_temperature_table(tmp_path):
    _write_inputs(tmp_path)
    out = tmp_path / "tree.json"
    result = runner.invoke(app, [
        "optimize", "--profile", str(tmp_path / "profile.json"), "--acceptance", str(tmp_path / "greedy.json"),
        "--acceptance", str(tmp_path / "t1.json"), "--out", str(out), "--max-depth", "8",
    ])
    assert result.exit_code == 0, result.output
    tree = Tree.load(out)
    assert tree.size > 1 and tree.meta["predicted_speedup"] > 1.0
    assert "How the choice moves" in result.output and "T=1" in result.output


@pytest.mark.parametrize("case", ["other-model", "missing-profile", "malformed-acceptance"])
def test_optimize_bad_input_one_line_no_file(tmp_path, case):
    _write_inputs(tmp_path, acc_target="other" if case == "other-model" else "tiny")
    profile = tmp_path / ("nope.json" if case == "missing-profile" else "profile.json")
    if case == "malformed-acceptance":
        (tmp_path / "greedy.json").write_text("{broken")
    out = tmp_path / "tree.json"
    result = runner.invoke(app, [
        "optimize", "--profile", str(profile), "--acceptance", str(tmp_path / "greedy.json"), "--out", str(out),
    ])
    assert_user_error(result, "", out)


def test_a_trained_draft_caps_the_depth_and_brings_its_cost(tmp_path, tiny_target):
    from trained_draft_helpers import random_draft

    from sequoia.drafts.card import save_draft, update_card

    save_draft(random_draft("mlp", tiny_target, heads=2), tmp_path / "d", "tiny")
    update_card(tmp_path / "d", {"evaluation": {"cost_ms_per_level": {"0": 0.5, "1": 3.0, "16": 4.0}, "cost_dtype": "bfloat16",
                                                "cost_fingerprint": fingerprint("cpu")}})  # measured here
    _write_inputs(tmp_path, draft=str(tmp_path / "d"))
    out = tmp_path / "tree.json"
    result = runner.invoke(app, [
        "optimize", "--profile", str(tmp_path / "profile.json"), "--acceptance", str(tmp_path / "greedy.json"),
        "--out", str(out), "--max-depth", "8",
    ])
    assert result.exit_code == 0, result.output
    tree = Tree.load(out)
    assert 1 <= tree.depth <= 2
    widths = np.bincount(tree.depths)[:-1]  # expanded levels: 3 ms + 1 ms * (w - 1) / 15 each, 0.5 ms a step
    draft_ms = 0.5 + sum(3.0 + (w - 1) / 15 for w in widths)
    target_ms = Profile.load(tmp_path / "profile.json").latency(tree.size, 256)
    assert tree.meta["predicted_ms_per_token"] == pytest.approx((draft_ms + target_ms) / tree.meta["expected_tokens"])


def test_a_profile_of_another_device_is_refused_in_one_line(tmp_path):
    other = {**fingerprint("cpu"), "cpu_model": "Some Other CPU", "aten_capability": "AVX2"}
    _write_inputs(tmp_path, device={"name": "elsewhere", "dtype": "float32", "fingerprint": other})
    out = tmp_path / "tree.json"
    args = ["optimize", "--profile", str(tmp_path / "profile.json"), "--acceptance", str(tmp_path / "greedy.json"),
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and not out.exists()
    line, = result.output.strip().splitlines()
    assert "measured on another device" in line and "cpu_model: Some Other CPU (recorded) vs" in line
    assert "aten_capability: AVX2 (recorded)" in line and "--foreign-profile" in line
    forced = runner.invoke(app, args + ["--foreign-profile"])
    assert forced.exit_code == 0, forced.output
    assert "warning:" in forced.stderr and Tree.load(out).size > 1


def test_plain_decoding_when_no_tree_pays(tmp_path):
    _write_inputs(tmp_path)
    samples = np.array([30.0, 60.0, 120.0])[None, :, None].repeat(3, axis=2)  # 2 tokens cost 2x one
    device = {"name": "test-cpu", "dtype": "float32", "fingerprint": fingerprint("cpu")}
    Profile(LatencyGrid("tiny", (256,), (1, 2, 4), samples), device, {}).save(tmp_path / "profile.json")
    out = tmp_path / "tree.json"
    result = runner.invoke(app, ["optimize", "--profile", str(tmp_path / "profile.json"), "--acceptance",
                                 str(tmp_path / "greedy.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    tree = Tree.load(out)
    assert tree.size == 1 and "verifying 2 tokens costs 2.00x one token" in tree.meta["reason"]
    assert "plain decoding:" in result.output
