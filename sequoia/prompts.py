"""Prompt sets: the built-in diverse set and user files (JSONL, JSON list, or plain text).

The built-in set (``sequoia/data/prompts.jsonl``) was written for this project: chat, code,
math, writing and summaries, five categories of six prompts each.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sequoia.errors import ConfigError, FileFormatError

BUILTIN = "builtin"


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable id, a category, and its text."""

    id: str
    text: str
    category: str = "user"


def load_prompts(source: str | os.PathLike = BUILTIN, limit: int | None = None) -> list[Prompt]:
    """Load prompts from ``"builtin"`` or a file.

    Files: ``.jsonl`` (one object per line with a ``prompt`` or ``text`` field, optional ``id``
    and ``category``), ``.json`` (a list of strings or such objects), anything else plain
    text with one prompt per non-empty line. Raises :class:`ConfigError` for an empty set.
    """
    if str(source) == BUILTIN:
        text = resources.files("sequoia").joinpath("data/prompts.jsonl").read_text()
        prompts = _parse_jsonl(text, "built-in prompts")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileFormatError(f"prompt file not found: {path}")
        text = path.read_text(errors="replace")
        if path.suffix == ".jsonl":
            prompts = _parse_jsonl(text, str(path))
        elif path.suffix == ".json":
            prompts = _parse_items(_loads(text, str(path)), str(path))
        else:
            prompts = [Prompt(f"line-{i}", line.strip()) for i, line in enumerate(text.splitlines())]
            prompts = [p for p in prompts if p.text]
    if limit is not None:
        prompts = prompts[: max(limit, 0)]
    if not prompts:
        raise ConfigError(f"the prompt set {str(source)!r} is empty")
    return prompts


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{where} is not valid JSON: {exc}") from exc


def _parse_jsonl(text: str, where: str) -> list[Prompt]:
    lines = [line for line in text.splitlines() if line.strip()]
    return _parse_items([_loads(line, f"{where}, line {i + 1}") for i, line in enumerate(lines)], where)


def _parse_items(items, where: str) -> list[Prompt]:
    if not isinstance(items, list):
        raise FileFormatError(f"{where} must hold a list of prompts")
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"prompt": item}
        text = item.get("prompt", item.get("text")) if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise FileFormatError(f"{where}: prompt {i + 1} has no 'prompt' or 'text' string")
        prompts.append(Prompt(str(item.get("id", f"p{i}")), text, str(item.get("category", "user"))))
    return prompts


def render_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids for ``text``, through the tokenizer's chat template when ``chat`` is set."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat needs a tokenizer with a chat template; this one has none")
        return render_messages(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text)["input_ids"]


def render_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``) through the
    tokenizer's chat template, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model's tokenizer has no chat template; send a plain prompt instead")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]
