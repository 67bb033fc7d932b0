"""Request bodies of the OpenAI-compatible API, validated strictly, and OpenAI's error shape.

Ranges are OpenAI's: ``temperature`` 0..2, penalties -2..2, ``top_logprobs`` 0..20 (chat), ``logprobs`` 0..5
(completions), at most 4 ``stop`` sequences; ``n`` is 1..``MAX_N``. Fields OpenAI defines but peftkit does not
implement are accepted only at their neutral value (``best_of: 1``, ``echo: false``, ...), so a client that sends
defaults works and one that relies on them is told. Unknown fields are refused, as OpenAI does ("Unrecognized
request argument").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI fields accepted only at these values, with what the user should know
_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((1,), "best_of=1"),
    "echo": ((False,), "echo=false"),
    "logit_bias": (({},), "an empty logit_bias"),
    "suffix": (("",), "no suffix"),
}

_UNION_TAGS = {"str", "int", "float", "bool"}  # how pydantic names the members of a union in error locations
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_N = 16  # choices per request: each is a row of the decode batch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral value only (see _NEUTRAL)
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        # OpenAI treats an explicit null like an absent field
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _check_unsupported(self) -> "_GenerationRequest":
        for name, (allowed, meaning) in _NEUTRAL.items():
            value = getattr(self, name, None)
            if value is not None and value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported by this server; it serves {meaning}")
        return self

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):  # ``stream`` is declared first, so validated already
            raise ValueError("stream_options is only allowed with stream=true")
        return value


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: Any
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the sampled token's and the k most likely tokens'
    suffix: str | None = None

    @property
    def logprob_count(self) -> int | None:
        """How many most likely tokens to report per token (None: no logprobs)."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> str | list[int]:
        """One prompt: a string, a list holding one string, or a non-empty list of token ids."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return value
        if isinstance(value, list) and value and all(type(t) is int for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            raise ValueError("send one prompt per request (a list of several prompts is not supported)")
        raise ValueError("prompt must be a non-empty string, a list holding one string, or a non-empty list of token ids")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info) -> int | None:
        if value is not None and not info.data.get("logprobs"):  # ``logprobs`` is declared first
            raise ValueError("top_logprobs needs logprobs=true")
        return value

    @property
    def logprob_count(self) -> int | None:
        """How many most likely tokens to report per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadAdapterRequest(_Strict):
    """POST /v1/adapters: load the adapter folder ``path`` (inside --adapters-dir) under ``name``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    path: str = Field(min_length=1)


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status (the app's handler turns it into the response)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def busy(reason: Exception) -> APIError:
    """429 ``queue_full`` with Retry-After: the server holds as many requests as its bounds allow."""
    return APIError(429, f"the server is busy: {reason}; retry shortly", type_="rate_limit_error", code="queue_full",
                    headers={"Retry-After": "1"})


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, which its clients turn into typed exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message from pydantic errors, and the first offending field (OpenAI's ``param``)."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        # for union types pydantic appends the member type it tried ("stop.str"); users care about the field
        field = ".".join(x for x in loc if x not in _UNION_TAGS and not x.startswith(("list[", "dict[", "function-")))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unrecognized request argument"
        parts.append(f"{field or 'body'}: {msg}")
        param = param or (field or None)
    return "; ".join(dict.fromkeys(parts)), param
