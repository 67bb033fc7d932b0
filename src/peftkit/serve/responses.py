"""OpenAI's response JSON for the two generation endpoints, answered whole or streamed.

Completions and chat share one envelope (``id``, ``object``, ``created``, ``model``, ``choices``, ``usage``) and
differ only in a few parts: the id prefix, the object names, what a choice carries, the logprobs format and chat's
opening role chunk. :class:`Reply` writes the envelope, the usage and the closing chunks once; its subclasses supply
those parts. A request with ``n`` choices has one :class:`~peftkit.serve.sequence.Sequence` per choice; choice
``i`` is ``choices[i]`` of a whole answer, and each streamed chunk carries one choice with its ``index``.
"""

from __future__ import annotations

import abc
import time
import uuid
from typing import Any, ClassVar

from .sampling import TokenLogprob
from .sequence import Sequence


def usage(seqs: list[Sequence]) -> dict[str, int]:
    """Token counts of a finished request, as OpenAI reports them: the prompt once, every choice's tokens."""
    prompt, completion = len(seqs[0].prompt_ids), sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class TokenText:
    """A token's text and its exact UTF-8 bytes, for logprobs.

    Byte-level BPE tokenizers (GPT-2's scheme, SmolLM2's) spell each byte as one printable character; mapping those
    back gives the token's own bytes, even when it holds part of a multi-byte character (whose text alone would be
    "\\ufffd"). Other tokenizers: the UTF-8 of the decoded token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._bytes = _byte_decoder() if type(decoder).__name__ == "ByteLevel" else None

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def bytes(self, token: int) -> list[int]:
        if self._bytes is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if piece is not None and all(c in self._bytes for c in piece):
                return [self._bytes[c] for c in piece]
        return list(self.text(token).encode("utf-8"))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted: printable bytes stand for themselves, the other 68
    bytes for the characters U+0100 onwards, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


class Reply(abc.ABC):
    """The JSON of one response: the whole answer, or its streamed chunks (one id and creation time for all)."""

    id_prefix: ClassVar[str] = ""
    whole_object: ClassVar[str] = ""  # the "object" of an answer sent whole
    chunk_object: ClassVar[str] = ""  # the "object" of each streamed chunk

    def __init__(self, model: str, tokens: TokenText | None = None) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokens = tokens  # needed only when the request asked for logprobs

    @abc.abstractmethod
    def whole_content(self, text: str) -> tuple[str, Any]:
        """The choice's field and value for the whole generated text."""

    @abc.abstractmethod
    def chunk_content(self, text: str | None) -> tuple[str, Any]:
        """The choice's field and value for one streamed piece of text (None: the closing chunk, which has none)."""

    @abc.abstractmethod
    def logprobs(self, entries: list[TokenLogprob], index: int) -> dict:
        """The choice's ``logprobs`` for ``entries``, the next tokens of choice ``index`` (called in order)."""

    def opening(self, n: int) -> list[dict]:
        """Chunks sent before any text."""
        return []

    def whole(self, seqs: list[Sequence], logprobs: bool) -> dict:
        """The answer to a request that did not stream."""
        choices = [self._choice(i, *self.whole_content(s.text), s.finish_reason,
                                self.logprobs(s.logprobs, i) if logprobs else None) for i, s in enumerate(seqs)]
        return {**self._envelope(self.whole_object, choices), "usage": usage(seqs)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> dict:
        value = self.logprobs(logprobs, index) if logprobs else None
        return self._envelope(self.chunk_object, [self._choice(index, *self.chunk_content(text), finish_reason, value)])

    def usage_chunk(self, seqs: list[Sequence]) -> dict:
        """The last chunk when the client asked for ``stream_options.include_usage``: usage, no choices."""
        return {**self._envelope(self.chunk_object, []), "usage": usage(seqs)}

    def _envelope(self, object_: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def _choice(index: int, field: str, value: Any, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": index, field: value, "finish_reason": finish_reason, "logprobs": logprobs}


class CompletionReply(Reply):
    """POST /v1/completions: choices carry ``text``, streamed or whole; logprobs in the legacy format (``tokens``,
    ``token_logprobs``, ``top_logprobs`` as {token text: logprob}, ``text_offset`` in characters of the completion)."""

    id_prefix = "cmpl-"
    whole_object = chunk_object = "text_completion"

    def __init__(self, model: str, tokens: TokenText | None = None) -> None:
        super().__init__(model, tokens)
        self._offsets: dict[int, int] = {}  # per choice: characters of token text reported so far

    def whole_content(self, text: str) -> tuple[str, Any]:
        return "text", text

    def chunk_content(self, text: str | None) -> tuple[str, Any]:
        return "text", "" if text is None else text

    def logprobs(self, entries: list[TokenLogprob], index: int) -> dict:
        assert self.tokens is not None
        texts = [self.tokens.text(e.token) for e in entries]
        offsets, at = [], self._offsets.get(index, 0)
        for text in texts:
            offsets.append(at)
            at += len(text)
        self._offsets[index] = at
        return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.tokens.text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


class ChatReply(Reply):
    """POST /v1/chat/completions: a whole answer carries a ``message``; a stream opens with the assistant's role and
    carries ``delta``s; logprobs as ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    id_prefix = "chatcmpl-"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def whole_content(self, text: str) -> tuple[str, Any]:
        return "message", {"role": "assistant", "content": text}

    def chunk_content(self, text: str | None) -> tuple[str, Any]:
        return "delta", {} if text is None else {"content": text}

    def opening(self, n: int) -> list[dict]:
        return [self._envelope(self.chunk_object, [self._choice(i, "delta", {"role": "assistant", "content": ""}, None, None)])
                for i in range(n)]

    def logprobs(self, entries: list[TokenLogprob], index: int) -> dict:
        assert self.tokens is not None
        tokens = self.tokens
        item = lambda t, lp: {"token": tokens.text(t), "logprob": lp, "bytes": tokens.bytes(t)}  # noqa: E731
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}
