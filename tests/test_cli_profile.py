"""``sequoia profile``: run/show/compare on the tiny model, and one-line errors with no file."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sequoia.models import tiny_llama
from sequoia_cli.main import app
from cli_helpers import assert_user_error

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(path)
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def profile_run(tiny_dir, out, *extra):
    return invoke(
        "profile", "run", "--model", tiny_dir, "--prefix", "8,16", "--tokens", "1,2,4",
        "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", out, *extra,
    )


def test_run_show_compare(tiny_dir, tmp_path):
    out = tmp_path / "profiles" / "tiny.json"
    result = profile_run(tiny_dir, out, "--draft", tiny_dir, "--widths", "1,2", "--notes", "quiet")
    assert result.exit_code == 0, result.output
    assert out.with_suffix(".png").stat().st_size > 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "sequoia-profile/1" and doc["notes"] == "quiet"
    assert doc["prefix_lengths"] == [8, 16] and doc["tokens"] == [1, 2, 4] and doc["repeats"] == 2
    assert len(doc["latency_ms"]["median"]) == 2 and len(doc["latency_ms"]["samples"][0][0]) == 2
    assert doc["draft"]["tokens"] == [1, 2] and doc["device"]["threads"] == 1
    shown = invoke("profile", "show", out)
    assert shown.exit_code == 0 and "knee" in shown.output and "draft" in shown.output
    compared = invoke("profile", "compare", out, out)
    assert compared.exit_code == 0 and "1.00" in compared.output


def test_check_mask(tiny_dir):
    result = invoke(
        "profile", "check-mask", "--model", tiny_dir, "--prefix", "8", "--tokens", "1,4", "--repeats", "2"
    )
    assert result.exit_code == 0, result.output
    assert "tree/causal" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--tokens", "1,250"), "exceeds the model's context of 256"),
        (("--tokens", "1,x"), "--tokens takes comma-separated whole numbers"),
        (("--dtype", "fp8"), "unknown dtype 'fp8'"),
        (("--draft", "nobody-knows"), "unknown model 'nobody-knows'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, extra, message):
    out = tmp_path / "p.json"
    result = profile_run(tiny_dir, out, *extra)
    assert_user_error(result, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("model", "message"),
    [("smollm2-13m", "unknown model 'smollm2-13m'"), ("broken.gguf", "cannot read GGUF file")],
)
def test_bad_models(tmp_path, monkeypatch, model, message):
    monkeypatch.setenv("SEQUOIA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "broken.gguf").write_bytes(b"nope" * 8)
    monkeypatch.chdir(tmp_path)
    result = invoke("profile", "run", "--model", model, "--out", tmp_path / "p.json")
    assert_user_error(result, message, tmp_path / "p.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tiny_dir, tmp_path):
    result = profile_run(tiny_dir, tmp_path / "p.json", "--device", "cuda")
    assert_user_error(result, "no CUDA GPU", tmp_path / "p.json")


def test_show_rejects_other_files(tmp_path):
    (tmp_path / "t.json").write_text('{"format": "sequoia-tree/1", "parents": [-1]}')
    result = invoke("profile", "show", tmp_path / "t.json")
    assert_user_error(result, "not a sequoia-profile/1 document")


def test_run_without_out_fills_this_devices_cache_once(tiny_dir):
    from sequoia.models import DEFAULT_MODEL
    from sequoia_cli.profile import DEFAULT_TARGET

    assert DEFAULT_TARGET == DEFAULT_MODEL
    first = invoke("profile", "run", "--model", tiny_dir, "--dtype", "float32", "--draft", "early-exit:1")
    assert first.exit_code == 0, first.output
    assert "this device:" in first.output and "float32: measured now" in first.output
    assert "draft early-exit:1 per tree level in float32 (measured)" in first.output
    again = invoke("profile", "run", "--model", tiny_dir, "--dtype", "float32")
    assert again.exit_code == 0 and "float32: cached" in again.output
    path = again.output.split("float32: cached: ")[1].split()[0]
    shown = invoke("profile", "show", path)
    assert shown.exit_code == 0 and "measured on: " in shown.output and "for this device: yes" in shown.output
