"""Prompt sets: the built-in set and user files in each supported format."""

from __future__ import annotations

import json

import pytest

from sequoia.errors import ConfigError, FileFormatError
from sequoia.prompts import load_prompts


def test_builtin_set_is_diverse():
    prompts = load_prompts()
    assert len(prompts) == 30
    assert {p.category for p in prompts} == {"chat", "code", "math", "writing", "summary"}
    assert len({p.id for p in prompts}) == len(prompts)


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n\n{"text": "y", "id": "q"}\n')
    (tmp_path / "b.json").write_text(json.dumps(["one", {"prompt": "two"}]))
    (tmp_path / "c.txt").write_text("first\n\n  second  \n")
    assert [p.text for p in load_prompts(tmp_path / "a.jsonl")] == ["x", "y"]
    assert load_prompts(tmp_path / "a.jsonl")[1].id == "q"
    assert [p.text for p in load_prompts(tmp_path / "b.json")] == ["one", "two"]
    assert [p.text for p in load_prompts(tmp_path / "c.txt")] == ["first", "second"]
    assert len(load_prompts("builtin", limit=4)) == 4


def test_bad_input(tmp_path):
    with pytest.raises(FileFormatError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="empty"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(FileFormatError, match="line 1"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"q": 1}\n')
    with pytest.raises(FileFormatError, match="no 'prompt'"):
        load_prompts(tmp_path / "nofield.jsonl")
