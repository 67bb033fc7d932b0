"""OpenAI's response JSON for the two generation endpoints, answered whole or streamed.

Completions and chat share one envelope (``id``, ``object``, ``created``, ``model``, ``choices``, ``usage``) and
differ only in a few parts: the id prefix, the object names, what a choice carries and chat's opening role chunk.
:class:`Reply` writes the envelope, the usage and the closing chunks once; its subclasses supply those parts.
"""

from __future__ import annotations

import abc
import time
import uuid
from typing import Any, ClassVar

from .scheduler import Sequence


def usage(seq: Sequence) -> dict[str, int]:
    """Token counts of a finished request, as OpenAI reports them."""
    prompt, completion = len(seq.prompt_ids), len(seq.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply(abc.ABC):
    """The JSON of one response: the whole answer, or its streamed chunks (one id and creation time for all)."""

    id_prefix: ClassVar[str] = ""
    whole_object: ClassVar[str] = ""  # the "object" of an answer sent whole
    chunk_object: ClassVar[str] = ""  # the "object" of each streamed chunk

    def __init__(self, model: str) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    @abc.abstractmethod
    def whole_content(self, text: str) -> tuple[str, Any]:
        """The choice's field and value for the whole generated text."""

    @abc.abstractmethod
    def chunk_content(self, text: str | None) -> tuple[str, Any]:
        """The choice's field and value for one streamed piece of text (None: the closing chunk, which has none)."""

    def opening(self) -> list[dict]:
        """Chunks sent before any text."""
        return []

    def whole(self, seq: Sequence) -> dict:
        """The answer to a request that did not stream."""
        choice = self._choice(*self.whole_content(seq.text), seq.finish_reason)
        return {**self._envelope(self.whole_object, [choice]), "usage": usage(seq)}

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict:
        return self._envelope(self.chunk_object, [self._choice(*self.chunk_content(text), finish_reason)])

    def closing(self, seq: Sequence, include_usage: bool) -> list[dict]:
        """The last chunks: the finish reason, then the usage when the client asked for it (with no choices)."""
        chunks = [self.chunk(None, seq.finish_reason)]
        if include_usage:
            chunks.append({**self._envelope(self.chunk_object, []), "usage": usage(seq)})
        return chunks

    def _envelope(self, object_: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def _choice(field: str, value: Any, finish_reason: str | None) -> dict:
        return {"index": 0, field: value, "finish_reason": finish_reason, "logprobs": None}


class CompletionReply(Reply):
    """POST /v1/completions: choices carry ``text``, streamed or whole."""

    id_prefix = "cmpl-"
    whole_object = chunk_object = "text_completion"

    def whole_content(self, text: str) -> tuple[str, Any]:
        return "text", text

    def chunk_content(self, text: str | None) -> tuple[str, Any]:
        return "text", "" if text is None else text


class ChatReply(Reply):
    """POST /v1/chat/completions: a whole answer carries a ``message``; a stream opens with the assistant's role and
    carries ``delta``s."""

    id_prefix = "chatcmpl-"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def whole_content(self, text: str) -> tuple[str, Any]:
        return "message", {"role": "assistant", "content": text}

    def chunk_content(self, text: str | None) -> tuple[str, Any]:
        return "delta", {} if text is None else {"content": text}

    def opening(self) -> list[dict]:
        return [self._envelope(self.chunk_object, [self._choice("delta", {"role": "assistant", "content": ""}, None)])]
