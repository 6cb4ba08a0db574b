"""`sequoia optimize`: writes the chosen tree, refuses mismatched or malformed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sequoia.acceptance import AcceptanceResult
from sequoia.profiler import LatencyGrid, Profile
from sequoia.tree import Tree
from sequoia_cli.main import app

runner = CliRunner()


def _write_inputs(tmp_path, acc_target="tiny"):
    samples = np.array([30.0, 31.0, 35.0, 50.0, 90.0])[None, :, None].repeat(3, axis=2)
    grid = LatencyGrid("tiny", (256,), (1, 4, 16, 32, 64), samples)
    Profile(grid, {"name": "test-cpu"}, {}).save(tmp_path / "profile.json")
    for name, vec, temp in (("greedy", [0.7, 0.1], 0.0), ("t1", [0.4, 0.15, 0.05], 1.0)):
        AcceptanceResult(
            target=acc_target, draft="d", mode="greedy" if temp == 0 else "stochastic",
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
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
