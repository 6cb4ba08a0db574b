"""The OpenAI wire format: request models (validated by pydantic), response and chunk bodies,
and the error body ``{"error": {"message", "type", "param", "code"}}``.

Only what the server honours is modelled; other fields OpenAI defines (``user``,
``frequency_penalty``, ...) are accepted and ignored, as most compatible servers do. Defaults
follow OpenAI: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 16 for completions and the rest
of the context for chat, a random seed when none is given.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sequoia.errors import SequoiaError
from sequoia.sampling import SamplingConfig

MAX_STOP_STRINGS = 4  # as OpenAI
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_MASK = (1 << 64) - 1  # torch generators take an unsigned 64-bit seed


class RequestError(SequoiaError):
    """A request the server cannot serve, with its HTTP status and OpenAI error fields."""

    def __init__(
        self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        if any(not s for s in strings):
            raise ValueError("stop strings must not be empty")
        return stop

    def sampling(self) -> SamplingConfig:
        """Temperature 0 is greedy; otherwise the engine samples losslessly at this setting."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingConfig(temperature, 1.0 if self.top_p is None else self.top_p)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def job_seed(self) -> int:
        return secrets.randbits(63) if self.seed is None else self.seed & SEED_MASK

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def max_new_tokens(self, room: int) -> int:
        """``max_tokens`` (or ``max_completion_tokens``), else what the context has left."""
        return self.max_tokens or self.max_completion_tokens or room

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(min_length=1)

    def max_new_tokens(self, room: int) -> int:
        return self.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS


# ---------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Flavor:
    """How one endpoint wraps text: chat messages and deltas, or plain completion text."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def response(self, id: str, model: str, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._body(id, model, self.object, [choice]) | {"usage": use}

    def chunk(self, id: str, model: str, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """One streamed piece; ``text=None`` with a finish reason closes the choice."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        return self._body(id, model, self.chunk_object, [choice])

    def first_chunk(self, id: str, model: str) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role (OpenAI does); completions need nothing."""
        if not self.chat:
            return None
        body = self.chunk(id, model, "")
        body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return body

    def usage_chunk(self, id: str, model: str, use: dict[str, int]) -> dict[str, Any]:
        """``stream_options.include_usage``: a last chunk with no choices and the usage."""
        return self._body(id, model, self.chunk_object, []) | {"usage": use}

    @staticmethod
    def _body(id: str, model: str, object: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": choices}


CHAT = Flavor("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Flavor("cmpl", "text_completion", "text_completion", chat=False)
