"""Continuous batching: one thread owns the model and decodes every running request together.

Each loop iteration of the scheduler thread:

1. runs queued commands that change the model (adding or removing an adapter), so they happen between decode
   steps and never under a forward pass;
2. drops rows whose clients went away;
3. admits waiting requests up to ``max_batch_size``: prefills them (one forward for the group, left-padded),
   samples each one's first token and appends their rows to the running :class:`~peftkit.serve.batch.KVBatch`;
4. runs one decode step for all running rows, each with its own adapter (``adapter_names``, the mixed-adapter
   path), samples one token per row and retires rows that finished.

Failures stay with the request that caused them: a failing group prefill is retried one request at a time, and a
failing decode step drops the shared cache and re-prefills each request alone from its tokens so far, so only a
request that fails on its own gets an error.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..device import pin
from ..tuners.base import BASE
from .batch import KVBatch, left_pad
from .sampling import SamplingParams, TextStream, sample_token, unusable_rows

logger = logging.getLogger("peftkit.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass
class Event:
    """What the scheduler tells a request's handler: new text, the end (with a finish reason), or an error."""

    kind: str  # "text" | "finish" | "error"
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    status: int = 500  # for an error: the HTTP status it is answered with


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

    def push(self, token_id: int, eos_ids: frozenset[int]) -> bool:
        """Record a sampled token and tell the handler; True when the request is finished."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.output_ids.append(token_id)
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
        try:
            self.on_event(event)
        except Exception:  # a handler that went away must not stop the scheduler
            logger.exception("event delivery failed for request %d", self.id)

    def cancel(self) -> None:
        """Called from any thread when the client went away: the row is freed before the next decode step."""
        self.cancelled.set()


class ModelHost(Protocol):
    """What the scheduler needs from the model side (see :class:`peftkit.serve.registry.AdapterRegistry`)."""

    eos_ids: frozenset[int]
    pad_id: int
    device: torch.device  # where the model is: every batch tensor, the cache and the generators live there

    def forward(self, **inputs: Any) -> torch.Tensor: ...  # logits of the last position, (batch, vocab)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
                adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...  # logits, the cache's mask

    def new_cache(self) -> Any: ...

    def has_adapter(self, name: str) -> bool: ...


class Scheduler:
    """Owns the model on one thread; requests join and leave the shared decode batch between steps."""

    def __init__(self, host: ModelHost, max_batch_size: int = 16, max_queue: int = 64, prefill_tokens: int = 4096) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.host = host
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens  # cap on one prefill forward: rows x longest prompt
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._commands: deque[tuple[Callable[[], Any], Callable[[], bool], concurrent.futures.Future]] = deque()
        self._rows: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # taken from the queue, not yet in the batch
        self._batch: KVBatch | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"decode_steps": 0, "mixed_steps": 0, "max_rows": 0, "prefills": 0, "tokens": 0, "recoveries": 0}

    # ---------------------------------------------------------------------------------------------------------
    # Called from other threads

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peftkit-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop after the current step; requests still running or waiting get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for seq in [*self._rows, *self._waiting]:
            seq.fail("the server is shutting down")
        self._rows, self._batch = [], None
        self._waiting.clear()
        for _, _, future in self._commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._commands.clear()

    def submit(self, seq: Sequence) -> None:
        """Queue a request; raises :class:`QueueFull` when ``max_batch_size`` requests run and ``max_queue`` wait,
        rather than growing without bound."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            in_flight = len(self._waiting) + len(self._prefilling) + len(self._rows)
            if in_flight >= self.max_batch_size + self.max_queue:
                raise QueueFull(
                    f"{in_flight} requests are running or waiting already "
                    f"(--max-batch-size {self.max_batch_size} + --max-queue {self.max_queue})"
                )
            self._waiting.append(seq)
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        with self._cond:
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any], ready: Callable[[], bool] | None = None) -> concurrent.futures.Future:
        """Run ``fn`` on the scheduler thread between decode steps, once ``ready()`` holds; commands run in order."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._commands.append((fn, ready or (lambda: True), future))
            self._cond.notify_all()
        return future

    def in_use(self, adapter: str) -> bool:
        """Whether a running or waiting request uses ``adapter`` (safe from any thread: a snapshot)."""
        with self._cond:
            seqs = [*self._rows, *self._prefilling, *self._waiting]
            return any(s.adapter == adapter and not s.cancelled.is_set() for s in seqs)

    @property
    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._rows), "waiting": len(self._waiting)}

    # ---------------------------------------------------------------------------------------------------------
    # The scheduler thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """One iteration: model-changing commands, cancellations, admissions (prefill), one decode step.

        The scheduler thread calls this in a loop; tests may call it directly (without :meth:`start`) to drive an
        exact schedule.
        """
        try:
            self._run_commands()  # outside inference mode: new adapter weights must be ordinary tensors
            with torch.inference_mode():
                self._drop_cancelled()
                self._admit()
                if self._rows:
                    self._decode()
        except Exception:  # never let the thread die: fail what is running and carry on
            logger.exception("scheduler step failed")
            for seq in self._rows:
                seq.fail("internal error in the scheduler; see the server log")
            self._rows, self._batch = [], None

    def _has_work(self) -> bool:
        ready_command = bool(self._commands) and self._commands[0][1]()
        return ready_command or bool(self._waiting) or bool(self._rows)

    def _run_commands(self) -> None:
        while True:
            with self._cond:
                if not self._commands or not self._commands[0][1]():
                    return
                fn, _, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)

    def _drop_cancelled(self) -> None:
        with self._cond:
            self._waiting = deque(s for s in self._waiting if not s.cancelled.is_set())
        keep = [i for i, s in enumerate(self._rows) if not s.cancelled.is_set()]
        if len(keep) < len(self._rows):
            self._retire(keep)

    def _admit(self) -> None:
        group: list[Sequence] = []
        with self._cond:
            while self._waiting and len(self._rows) + len(group) < self.max_batch_size:
                seq = self._waiting[0]
                longest = max(len(s.context) for s in [*group, seq])
                if group and (len(group) + 1) * longest > self.prefill_tokens:
                    break
                group.append(self._waiting.popleft())
            self._prefilling = group
        ready = []
        for seq in group:
            if self.host.has_adapter(seq.adapter):
                ready.append(seq)
            else:  # removed between validation and admission
                seq.fail(f"adapter {seq.adapter!r} was removed before this request started")
        if ready:
            self._prefill(ready)
        self._prefilling = []  # after the rows joined: a concurrent submit may over-count briefly, never under-count

    def _prefill(self, group: list[Sequence]) -> None:
        """Run the group's contexts, sample each one's next token and append the unfinished rows to the batch."""
        for seq in group:  # kept when a failed batch is prefilled again: the request's draws continue
            if seq.generator is None:
                seq.generator = seq.params.make_generator(self.host.device)
                seq.admitted_at = time.monotonic()
        try:
            ids, mask = left_pad([s.context for s in group], self.host.pad_id, self.host.device)
            cache = self.host.new_cache()
            logits, mask = self.host.prefill(ids, mask, cache, [s.adapter for s in group])
        except Exception as err:
            if len(group) > 1:  # find the request at fault: each one alone
                for seq in group:
                    self._prefill([seq])
                return
            logger.exception("prefill failed for request %d", group[0].id)
            group[0].fail(f"generation failed: {type(err).__name__}: {err}")
            return
        self.stats["prefills"] += 1
        batch = KVBatch(cache, mask, mask.sum(dim=1))
        finished = self._sample(group, logits)
        live = [i for i in range(len(group)) if i not in finished]
        if not live:
            return
        if len(live) < len(group):
            batch.select(live)
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.extend(batch)
        self._rows += [group[i] for i in live]

    def _decode(self) -> None:
        assert self._batch is not None
        rows = self._rows
        try:
            inputs = self._batch.step_inputs()
            logits = self.host.forward(
                input_ids=pin(torch.tensor([[s.output_ids[-1]] for s in rows], dtype=torch.long), self.host.device),
                cache=self._batch.cache, adapter_names=[s.adapter for s in rows], **inputs,
            )
        except Exception:
            # The shared cache may be half-updated. Start every row again on its own from its tokens so far:
            # the ones that still fail alone get the error, the others carry on unchanged.
            logger.exception("decode step failed; re-prefilling %d request(s) one by one", len(rows))
            self.stats["recoveries"] += 1
            self._rows, self._batch = [], None
            for seq in rows:
                self._prefill([seq])
            return
        self._batch.advance()
        self.stats["decode_steps"] += 1
        self.stats["mixed_steps"] += len({s.adapter for s in rows}) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        finished = self._sample(rows, logits)
        if finished:
            self._retire([i for i in range(len(rows)) if i not in finished])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> set[int]:
        """Sample one token per row; returns the rows that finished (or failed)."""
        finished = set()
        # one host transfer for every row: its greedy token, and whether its logits can be sampled at all
        greedy, broken = torch.stack([torch.argmax(logits, dim=-1), unusable_rows(logits).long()]).tolist()
        for i, seq in enumerate(seqs):
            if broken[i]:  # NaN/Inf logits: argmax or softmax would pick garbage or fail; refuse this request only
                seq.fail(
                    f"{'the base model' if seq.adapter == BASE else f'adapter {seq.adapter!r}'} gave non-finite logits (NaN or Inf) at output token "
                    f"{len(seq.output_ids) + 1}: its weights overflow or are broken on this input, so no token can be "
                    "chosen. Try another prompt or model; the server and other requests are unaffected",
                    status=422,
                )
                finished.add(i)
                continue
            try:
                token = greedy[i] if seq.params.greedy else sample_token(logits[i], seq.params, seq.generator)
                self.stats["tokens"] += 1
                if seq.push(token, self.host.eos_ids):
                    finished.add(i)
            except Exception as err:
                logger.exception("sampling failed for request %d", seq.id)
                seq.fail(f"sampling failed: {type(err).__name__}: {err}")
                finished.add(i)
        return finished

    def _retire(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._batch = None
        else:
            assert self._batch is not None
            self._batch.select(keep)
