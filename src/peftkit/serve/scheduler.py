"""Continuous batching: one thread owns the model and decodes every running request together.

Each loop iteration of the scheduler thread:

1. runs queued commands that change the model (adding or removing an adapter), so they happen between decode
   steps and never under a forward pass;
2. drops rows whose clients went away;
3. admits waiting requests into the prefilling set while running + prefilling rows stay within ``max_batch_size``;
4. runs at most ``prefill_chunk`` tokens of their prompts (chunked prefill, :mod:`peftkit.serve.prefill`: short
   prompts together in one forward, long ones alone in chunks); a request whose prompt is all in now samples its
   first token and its row joins the running :class:`~peftkit.serve.batch.KVBatch`;
5. runs one decode step for all running rows, each with its own adapter (``adapter_names``, the mixed-adapter
   path), samples one token per row and retires rows that finished. When rows are running, this step's short
   prompts go into the same forward (a *fused* step, :mod:`peftkit.serve.fused`: the weights are read once for
   both) unless a newcomer's adapter adds virtual tokens.

So the running rows wait at most one chunk's forward between tokens however long the newcomers' prompts are.

Failures stay with the request that caused them: a failing group prefill is retried one request at a time, a
failing chunk fails its request (it runs alone), and a failing decode step drops the shared cache and sends every
row back to prefill from its tokens so far, where only a request that fails on its own gets an error.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

import torch

from ..device import pin
from ..tuners.base import BASE
from .batch import KVBatch, left_pad
from .fused import FusedLayout, flat_step
from .prefill import PrefillJob, PrefillPlan, group_cost, plan_step
from .sampling import apply_penalties, greedy_and_unusable, sample_token, token_logprobs
from .sequence import Sequence

logger = logging.getLogger("peftkit.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


class ModelHost(Protocol):
    """What the scheduler needs from the model side (see :class:`peftkit.serve.registry.AdapterRegistry`)."""

    eos_ids: frozenset[int]
    pad_id: int
    device: torch.device  # where the model is: every batch tensor, the cache and the generators live there

    def forward(self, **inputs: Any) -> torch.Tensor: ...  # logits of the last position, (batch, vocab)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
                adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...  # logits, the cache's mask

    def new_cache(self) -> Any: ...

    def can_fuse(self) -> bool: ...  # whether newcomers may join the running rows' forward this step

    def front(self, adapter: str) -> tuple[int, int]: ...  # (prompt-tuning tokens, prefix columns) before a context

    def fused_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: FusedLayout,
                      adapter_names: list[str], keep: torch.Tensor) -> torch.Tensor: ...  # logits at ``keep``

    def has_adapter(self, name: str) -> bool: ...


class Scheduler:
    """Owns the model on one thread; requests join and leave the shared decode batch between steps."""

    def __init__(self, host: ModelHost, max_batch_size: int = 16, max_queue: int = 64, prefill_chunk: int = 256) -> None:
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1 and max_queue >= 0, got "
                             f"{max_batch_size}, {prefill_chunk}, {max_queue}")
        self.host = host
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk  # prompt tokens (padding counted) prefilled per step at most
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._commands: deque[tuple[Callable[[], Any], Callable[[], bool], concurrent.futures.Future]] = deque()
        self._rows: list[Sequence] = []
        self._prefilling: list[PrefillJob] = []  # taken from the queue, not yet in the batch (in arrival order)
        self._batch: KVBatch | None = None
        self._stopping = False
        self._idle_since: float | None = None  # perf_counter() when the thread began waiting for work, while it waits
        self._thread: threading.Thread | None = None
        # counters since start; decode_rows / decode_steps is the mean batch of a decode step, prefill_tokens /
        # steps the mean prefill work per step, prefill_s_max the longest any step's prefill held the decode rows.
        # The thread's time splits into decode_s (forwards and sampling of decode steps), prefill_s, command_s
        # (adapter loads and removals), idle_s (waiting for work) and the rest (admission, cancellation): what
        # /metrics exports, so a load test can say where a server's time went.
        self.stats: dict[str, float] = {
            "steps": 0, "decode_steps": 0, "decode_rows": 0, "mixed_steps": 0, "max_rows": 0, "prefills": 0,
            "prefill_tokens": 0, "prefill_s_max": 0.0, "tokens": 0, "recoveries": 0, "fused": 0,
            "decode_s": 0.0, "prefill_s": 0.0, "command_s": 0.0, "idle_s": 0.0,
        }

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
        for seq in [*self._rows, *(j.seq for j in self._prefilling), *self._waiting]:
            seq.fail("the server is shutting down")
        self._rows, self._batch, self._prefilling = [], None, []
        self._waiting.clear()
        for _, _, future in self._commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._commands.clear()

    def submit(self, *seqs: Sequence) -> None:
        """Queue requests (the choices of one API request: all or none); raises :class:`QueueFull` when
        ``max_batch_size`` rows would run and more than ``max_queue`` wait, rather than growing without bound."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._check_room(len(seqs))
            self._waiting.extend(seqs)
            self._cond.notify_all()

    def check_room(self, more: int) -> None:
        """Raise :class:`QueueFull` unless ``more`` requests could be submitted now: requests that wait elsewhere
        before they are submitted (for their adapter to load) count against the same bound."""
        with self._cond:
            self._check_room(more)

    def _check_room(self, more: int) -> None:
        in_flight = len(self._waiting) + len(self._prefilling) + len(self._rows)
        if in_flight + more > self.max_batch_size + self.max_queue:
            raise QueueFull(f"{in_flight} requests are running or waiting already "
                            f"(--max-batch-size {self.max_batch_size} + --max-queue {self.max_queue})")

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
            seqs = [*self._rows, *(j.seq for j in self._prefilling), *self._waiting]
            return any(s.adapter == adapter and not s.cancelled.is_set() for s in seqs)

    @property
    def load(self) -> dict[str, int]:
        with self._cond:
            # running: taken from the queue (prefilling, of which ``prefilling`` are, or decoding)
            return {"running": len(self._rows) + len(self._prefilling), "prefilling": len(self._prefilling),
                    "waiting": len(self._waiting)}

    def counters(self) -> dict[str, float]:
        """The counters now (any thread), an idle wait under way included (what /metrics exports)."""
        with self._cond:
            stats = dict(self.stats)
            if self._idle_since is not None:
                stats["idle_s"] += time.perf_counter() - self._idle_since
        return stats

    def summary(self) -> dict[str, float]:
        """The counters, with the means they imply: rows per decode step and prefill tokens per step."""
        stats = dict(self.stats)
        stats["mean_rows_per_decode_step"] = stats["decode_rows"] / max(1, stats["decode_steps"])
        stats["mean_prefill_tokens_per_step"] = stats["prefill_tokens"] / max(1, stats["steps"])
        return stats

    # ---------------------------------------------------------------------------------------------------------
    # The scheduler thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._stopping and not self._has_work():
                    self._idle_since = time.perf_counter()
                    while not self._stopping and not self._has_work():
                        self._cond.wait()
                    self.stats["idle_s"] += time.perf_counter() - self._idle_since
                    self._idle_since = None
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """One iteration: model-changing commands, cancellations, admissions, a prefill chunk, one decode step.

        The scheduler thread calls this in a loop; tests may call it directly (without :meth:`start`) to drive an
        exact schedule.
        """
        try:
            start = time.perf_counter()
            self._run_commands()  # outside inference mode: new adapter weights must be ordinary tensors
            self.stats["command_s"] += time.perf_counter() - start
            with torch.inference_mode():
                self._drop_cancelled()
                self._admit()
                fuse = self._prefill_step() if self._prefilling else []
                if self._rows:
                    start = time.perf_counter()
                    self._decode(fuse)
                    self.stats["decode_s"] += time.perf_counter() - start
                self.stats["steps"] += 1
        except Exception:  # never let the thread die: fail what is running and carry on
            logger.exception("scheduler step failed")
            for seq in [*self._rows, *(j.seq for j in self._prefilling)]:
                seq.fail("internal error in the scheduler; see the server log")
            with self._cond:
                self._rows, self._batch, self._prefilling = [], None, []

    def _has_work(self) -> bool:
        ready_command = bool(self._commands) and self._commands[0][1]()
        return ready_command or bool(self._waiting) or bool(self._prefilling) or bool(self._rows)

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
            self._prefilling = [j for j in self._prefilling if not j.seq.cancelled.is_set()]
        gone = {i for i, s in enumerate(self._rows) if s.cancelled.is_set()}
        if gone:
            self._retire(gone)

    def _admit(self) -> None:
        """Move waiting requests into the prefilling set while running + prefilling rows fit in the batch."""
        with self._cond:
            while self._waiting and len(self._rows) + len(self._prefilling) < self.max_batch_size:
                seq = self._waiting.popleft()
                if not self.host.has_adapter(seq.adapter):  # removed between validation and admission
                    seq.fail(f"adapter {seq.adapter!r} was removed before this request started")
                    continue
                if seq.generator is None:  # kept when a row is prefilled again: the request's draws continue
                    seq.generator = seq.params.make_generator(self.host.device)
                    seq.admitted_at = time.monotonic()
                self._prefilling.append(self._job(seq))

    def _job(self, seq: Sequence) -> PrefillJob:
        """``seq`` on its way into the batch from a fresh cache, its adapter's prompt-tuning tokens counted."""
        return PrefillJob(seq, virtual=self.host.front(seq.adapter)[0])

    def _prefill_step(self) -> list[PrefillJob]:
        """This step's prefill work (:func:`~peftkit.serve.prefill.plan_step`): the group, then the chunks. Returns
        the group instead of prefilling it when it can go into the decode step's forward (:meth:`_decode`)."""
        plan: PrefillPlan = plan_step(self._prefilling, self.prefill_chunk)
        fuse = plan.group if plan.group and self._rows and self.host.can_fuse() else []
        # counted before running: a joined row's context grows (a fused group has no padding)
        self.stats["prefill_tokens"] += plan.cost - (group_cost(fuse) - sum(j.tokens for j in fuse))
        start = time.perf_counter()
        if plan.group and not fuse:
            self._prefill_group(plan.group)
        for job, tokens in plan.chunks:
            self._prefill_chunk(job, tokens)
        took = time.perf_counter() - start
        self.stats["prefill_s"] += took
        self.stats["prefill_s_max"] = max(self.stats["prefill_s_max"], took)
        return fuse

    def _prefill_group(self, group: list[PrefillJob]) -> None:
        """Prefill whole contexts together (left-padded, one forward); each one's first token, then the batch."""
        seqs = [j.seq for j in group]
        try:
            ids, mask = left_pad([s.context for s in seqs], self.host.pad_id, self.host.device)
            cache = self.host.new_cache()
            logits, mask = self.host.prefill(ids, mask, cache, [s.adapter for s in seqs])
        except Exception as err:
            if len(group) > 1:  # find the request at fault: each one alone
                for job in group:
                    self._prefill_group([job])
                return
            self._prefill_failed(group[0], err)
            return
        self.stats["prefills"] += 1
        self._join(group, KVBatch(cache, mask, mask.sum(dim=1)), logits)

    def _prefill_chunk(self, job: PrefillJob, tokens: int) -> None:
        """Feed the next ``tokens`` of one request's context into its own cache; join the batch after the last."""
        seq = job.seq
        chunk = seq.context[job.done : job.done + tokens]
        try:
            if job.batch is None:  # the first chunk: a fresh cache, through prefill (which adds any virtual columns)
                ids, mask = left_pad([chunk], self.host.pad_id, self.host.device)
                cache = self.host.new_cache()
                logits, mask = self.host.prefill(ids, mask, cache, [seq.adapter])
                job.batch = KVBatch(cache, mask, mask.sum(dim=1))
            else:
                logits = self.host.forward(
                    input_ids=pin(torch.tensor([chunk], dtype=torch.long), self.host.device), cache=job.batch.cache,
                    adapter_names=[seq.adapter], **job.batch.step_inputs(tokens),
                )
                job.batch.advance(tokens)
        except Exception as err:
            self._prefill_failed(job, err)
            return
        self.stats["prefills"] += 1
        job.done += tokens
        if job.remaining == 0:
            self._join([job], job.batch, logits)

    def _prefill_failed(self, job: PrefillJob, err: Exception) -> None:
        logger.exception("prefill failed for request %d", job.seq.id, exc_info=err)
        with self._cond:
            self._prefilling.remove(job)
        job.seq.fail(f"generation failed: {type(err).__name__}: {err}")

    def _join(self, jobs: list[PrefillJob], batch: KVBatch, logits: torch.Tensor) -> None:
        """Jobs whose whole context is in ``batch``: sample each one's next token; the unfinished join the rows."""
        seqs = [j.seq for j in jobs]
        finished = self._sample(seqs, logits)
        if len(finished) == len(seqs):
            live = []
        else:  # the rows the batch keeps, in its order
            live = batch.drop(finished) if finished else list(range(len(seqs)))
        with self._cond:  # rows first, then out of prefilling: a concurrent submit may over-count, never under-count
            if live:
                if self._batch is None:
                    self._batch = batch
                else:
                    self._batch.extend(batch, self.max_batch_size)
                self._rows = self._rows + [seqs[i] for i in live]
            done = {id(j) for j in jobs}
            self._prefilling = [j for j in self._prefilling if id(j) not in done]

    def _decode(self, fuse: list[PrefillJob]) -> None:
        """One decode step for the running rows; with ``fuse``, those newcomers' whole contexts go into the same
        forward, and then each samples its first token and joins the batch."""
        assert self._batch is not None
        rows = self._rows
        try:
            inputs = self._batch.step_inputs()
            if fuse:
                logits, joining = self._fused_forward(rows, [j.seq for j in fuse], inputs["attention_mask"])
            else:
                logits = self.host.forward(
                    input_ids=pin(torch.tensor([[s.output_ids[-1]] for s in rows], dtype=torch.long), self.host.device),
                    cache=self._batch.cache, adapter_names=[s.adapter for s in rows], **inputs,
                )
        except Exception:
            # The shared cache may be half-updated. Start every row again on its own from its tokens so far:
            # the ones that still fail alone get the error, the others carry on unchanged.
            logger.exception("decode step failed; prefilling %d request(s) again", len(rows))
            self.stats["recoveries"] += 1
            with self._cond:  # back to the front of the prefilling set, ahead of newcomers
                self._rows, self._batch = [], None
                self._prefilling = [self._job(seq) for seq in rows] + self._prefilling
            return
        self._batch.advance()
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        self.stats["mixed_steps"] += len({s.adapter for s in rows}) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        finished = self._sample(rows, logits[: len(rows)])
        if finished:
            self._retire(finished)
        if fuse:  # (after the retirements: a finished row's place is free for them)
            self.stats["fused"] += len(fuse)
            self._join(fuse, joining, logits[len(rows) :])

    def _fused_forward(self, rows: list[Sequence], newcomers: list[Sequence],
                       mask: torch.Tensor) -> tuple[torch.Tensor, KVBatch]:
        """The decode tokens of ``rows`` and the whole contexts of ``newcomers`` as one flat sequence
        (:mod:`peftkit.serve.fused`): logits of the rows, then of each newcomer's last token; the newcomers' rows
        as one batch, to join (gathered among themselves first: one copy of the running cache to join them all).
        ``mask``: the running batch's mask for this step."""
        assert self._batch is not None
        device, fronts = self.host.device, [self.host.front(s.adapter) for s in newcomers]
        ids, positions, lengths, keep = flat_step([s.output_ids[-1] for s in rows], self._batch.lengths,
                                                  [s.context for s in newcomers], fronts, self.host.pad_id)
        names = [s.adapter for s in rows] + [s.adapter for s, n in zip(newcomers, lengths) for _ in range(n)]
        layout = FusedLayout(len(rows), self._batch.cache, mask, lengths, [self.host.new_cache() for _ in newcomers],
                             fronts)
        logits = self.host.fused_forward(pin(ids, device), positions, layout, names, pin(keep, device))
        joining = None
        for cache, n, (_, prefix) in zip(layout.caches, lengths, fronts):  # (n counts any prompt-tuning tokens)
            width = prefix + n
            row = KVBatch(cache, torch.ones(1, width, dtype=torch.bool, device=device), torch.tensor([width], device=device))
            if joining is None:
                joining = row
            else:
                joining.extend(row, len(newcomers))
        assert joining is not None
        return logits, joining

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> set[int]:
        """Sample one token per row; returns the rows that finished (or failed)."""
        self._penalize(seqs, logits)
        finished, chosen = set(), {}
        # one host transfer for every row: its greedy token, and whether its logits can be sampled at all
        greedy, broken = torch.stack([t.long() for t in greedy_and_unusable(logits)]).tolist()
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
                chosen[i] = greedy[i] if seq.params.greedy else sample_token(logits[i], seq.params, seq.generator)
            except Exception as err:
                logger.exception("sampling failed for request %d", seq.id)
                seq.fail(f"sampling failed: {type(err).__name__}: {err}")
                finished.add(i)
        asked = [i for i in chosen if seqs[i].params.logprobs is not None]
        logprobs = dict(zip(asked, token_logprobs(
            logits[asked], [seqs[i].params.temperature for i in asked], [chosen[i] for i in asked],
            max(seqs[i].params.logprobs for i in asked),
        ))) if asked else {}
        for i, token in chosen.items():
            seq, entry = seqs[i], logprobs.get(i)
            if entry is not None:  # the batch's widest k: keep this request's own
                entry = entry._replace(top=entry.top[: seq.params.logprobs])
            if seq.counts is not None:
                seq.counts[token] += 1
            self.stats["tokens"] += 1
            if seq.push(token, self.host.eos_ids, entry):
                finished.add(i)
        return finished

    @staticmethod
    def _penalize(seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Presence and frequency penalties, in place, for the rows that ask for them (one batched update)."""
        rows = [i for i, s in enumerate(seqs) if s.params.penalized]
        for i in rows:
            if seqs[i].counts is None:
                seqs[i].counts = torch.zeros(logits.shape[-1], device=logits.device)
        if rows:
            apply_penalties(logits, rows, [seqs[i].counts for i in rows], [seqs[i].params for i in rows])

    def _retire(self, gone: set[int]) -> None:
        """Remove the rows ``gone`` from the batch (the batch chooses the remaining rows' new order)."""
        if len(gone) == len(self._rows):
            self._rows, self._batch = [], None
        else:
            assert self._batch is not None
            self._rows = [self._rows[i] for i in self._batch.drop(gone)]
