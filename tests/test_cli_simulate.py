"""`sequoia simulate dsi`: inputs from numbers or files, outputs, one-line errors, no partial files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sequoia.acceptance import AcceptanceResult
from sequoia.profile import LatencyGrid, Profile
from sequoia_cli.main import app
from cli_helpers import assert_user_error

runner = CliRunner()
POINT = ["--target-latency", "30", "--drafter-latency", "27", "--acceptance", "0.1", "--lookahead", "1"]


def _dsi(*args: str):
    return runner.invoke(app, ["simulate", "dsi", "--samples", "2000", *args])


def test_point_shows_all_three_and_writes_json(tmp_path):
    out = tmp_path / "point.json"
    result = _dsi(*POINT, "--json", str(out))
    assert result.exit_code == 0, result.output
    for name in ("non-SI", "SI (lookahead 1)", "DSI (lookahead 1, SP 7)"):
        assert name in result.output
    data = json.loads(out.read_text())
    latency = data["latency_per_token"]
    assert data["config"]["target_latency"] == 30.0 and latency["non_si"] == 30.0
    assert latency["si"]["mean"] > 30.0 >= latency["dsi"]["mean"]  # slow, inaccurate drafter


def test_latencies_from_profile_and_acceptance_from_file(tmp_path):
    samples = np.array([[20.0, 24.0], [30.0, 36.0]])[:, :, None].repeat(3, axis=2)  # [prefix, tokens, rep]
    target = LatencyGrid("tiny", (128, 512), (1, 4), samples)
    draft = LatencyGrid("tiny-draft", (128, 512), (1, 4), samples / 10)
    Profile(target, {"name": "test-cpu"}, {}, draft).save(tmp_path / "profile.json")
    AcceptanceResult(
        target="tiny", draft="d", mode="greedy", temperature=0.0, top_p=1.0, vector=(0.7, 0.1),
        stderr=(0.01, 0.01), samples=100, prompts="builtin",
    ).save(tmp_path / "acc.json")
    out = tmp_path / "point.json"
    result = _dsi("--profile", str(tmp_path / "profile.json"), "--prefix-length", "320",
                  "--acceptance-file", str(tmp_path / "acc.json"), "--json", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads(out.read_text())["config"]
    assert config["target_latency"] == pytest.approx(25.0)  # 1-token median halfway 128..512
    assert config["drafter_latency"] == pytest.approx(2.5)  # the profile's draft section
    assert config["acceptance"] == 0.7  # p[1]


def test_heatmap_and_paper_table_files(tmp_path):
    png, table = tmp_path / "heat.png", tmp_path / "paper.md"
    result = _dsi("--heatmap", str(png), "--paper-table", str(table), "--max-lookahead", "2")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = json.loads(png.with_suffix(".json").read_text())
    assert grid["lookaheads"] == [1, 2] and np.all(np.array(grid["dsi"]) <= np.array(grid["si"]))
    text = table.read_text()
    assert "1.29-1.92x" in text and text.count("| StarCoder-15B |") == 2
    rows = json.loads(table.with_suffix(".json").read_text())
    assert len(rows) == 10
    for r in rows:
        assert r["best_lookahead"]["speedup_dsi_vs_si"] > 1 and r["paper_protocol"]["speedup_dsi_vs_si"] > 1
        assert 1.29 <= r["threadpool_accounting"]["speedup_dsi_vs_si"] <= 1.92
    assert "Table 1 (p. 7)" in text and "thread-pool accounting" in text
    assert "SI slower than non-SI at" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sp-degree", "0"], "SP degree"),
        (["--acceptance", "1.5"], "acceptance rate must be in [0, 1]"),
        (["--acceptance", "-0.2"], "acceptance rate must be in [0, 1]"),
        (["--target-latency", "0"], "target latency must be > 0"),
        (["--drafter-latency", "-1"], "drafter latency must be > 0"),
    ],
)
def test_bad_values_are_one_line_and_write_nothing(tmp_path, args, message):
    result = _dsi(*POINT, *args, "--json", str(tmp_path / "p.json"), "--heatmap", str(tmp_path / "h.png"))
    assert_user_error(result, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "nothing to simulate"),
        (["--target-latency", "30"], "missing drafter latency"),
        ([*POINT, "--acceptance-file", "acc.json"], "not both"),
        (["--target-latency", "30", "--json", "x.json"], "missing"),
        (["--heatmap", "h.png", "--max-lookahead", "0"], "--max-lookahead must be >= 1"),
        (["--profile", "no-such-profile.json", "--drafter-latency", "3", "--acceptance", "0.5"], "not found"),
    ],
)
def test_incomplete_or_contradictory_inputs(tmp_path, args, message):
    result = _dsi(*args)
    assert_user_error(result, message)


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _dsi(*POINT, "--json", str(blocker / "p.json"))
    assert_user_error(result, "cannot write")


def test_check_dsi_runs_the_orchestrator_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    result = runner.invoke(app, ["simulate", "check-dsi", "--tokens", "6", "--target-delay-ms", "2",
                                 "--drafter-delay-ms", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "lossless: DSI output == target greedy output" in result.output
    data = json.loads(out.read_text())
    assert data["lossless"] is True and data["simulated"]["config"]["lookahead"] == 3


def test_check_dsi_bad_input():
    result = runner.invoke(app, ["simulate", "check-dsi", "--sp-degree", "0"])
    assert_user_error(result, "SP degree")
