"""One generation request as the scheduler sees it (:class:`Sequence`), and what it tells the request's handler
(:class:`Event`): the HTTP layer makes a Sequence, the scheduler thread alone changes it after submission."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .sampling import SamplingParams, TextStream, TokenLogprob

logger = logging.getLogger("peftkit.serve")


@dataclass
class Event:
    """What the scheduler tells a request's handler: new text, the end (with a finish reason), or an error."""

    kind: str  # "text" | "finish" | "error"
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    status: int = 500  # for an error: the HTTP status it is answered with
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the last event (if asked)


class Sequence:
    """One generation request. Created by the HTTP layer; mutated only by the scheduler thread after submit."""

    _ids = itertools.count()

    def __init__(
        self,
        adapter: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        on_event: Callable[[Event], None],
    ) -> None:
        self.id = next(self._ids)
        self.adapter = adapter
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.text = ""  # everything sent so far
        self.finish_reason: str | None = None
        self.on_event = on_event
        self.generator: torch.Generator | None = None  # on the model's device: made when the scheduler first runs it
        self.counts: torch.Tensor | None = None  # (vocab,) generated-token counts, for penalties; on the model's device
        self.logprobs: list[TokenLogprob] = []  # one per output token, when params.logprobs is set
        self._unsent_logprobs = 0  # how many of the last ``logprobs`` no event has carried yet
        self.stream = TextStream(tokenizer, params.stop)
        self.cancelled = threading.Event()
        # time.monotonic() when it was made, taken by a prefill, and got its first token (metrics: serve/metrics.py)
        self.created_at = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None

    @property
    def context(self) -> list[int]:
        """Tokens the model has to have seen to sample the next one."""
        return self.prompt_ids + self.output_ids

    def push(self, token_id: int, eos_ids: frozenset[int], logprob: TokenLogprob | None = None) -> bool:
        """Record a sampled token (and its logprobs) and tell the handler; True when the request is finished."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.output_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
            self._unsent_logprobs += 1
        delta = ""
        if token_id in eos_ids:
            self.finish_reason = "stop"
        else:
            delta = self.stream.push(token_id)
            if self.stream.stopped:
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.params.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is None:
            if delta:
                self._emit(Event("text", text=delta))
            return False
        self._emit(Event("finish", text=delta + self.stream.finish(), finish_reason=self.finish_reason))
        return True

    def fail(self, message: str, status: int = 500) -> None:
        self.finish_reason = "error"
        self._emit(Event("error", error=message, status=status))

    def _emit(self, event: Event) -> None:
        self.text += event.text
        if self._unsent_logprobs and event.kind != "error":
            event.logprobs, self._unsent_logprobs = self.logprobs[-self._unsent_logprobs :], 0
        try:
            self.on_event(event)
        except Exception:  # a handler that went away must not stop the scheduler
            logger.exception("event delivery failed for request %d", self.id)

    def cancel(self) -> None:
        """Called from any thread when the client went away: the row is freed before the next decode step."""
        self.cancelled.set()
