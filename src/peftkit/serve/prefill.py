"""Chunked prefill: newcomers' prompts enter the cache a bounded number of tokens per scheduler step.

Prefilling a prompt in one forward stalls every running row for as long as that forward takes, which grows with
the prompt (and with how many newcomers arrive together). Instead each scheduler step spends at most a token
budget (``--prefill-chunk``) on prefill, then runs the decode step for the running rows, so a decode row waits at
most one chunk's forward between its tokens whatever the newcomers' lengths, and a newcomer's first token comes
after ceil(prompt / budget) steps.

Per step, within the budget:

- newcomers whose whole context (with any prompt-tuning virtual tokens) fits in a budget are *short*: in arrival
  order they join this step's *group*, whose contexts are left-padded and prefilled in one forward (``host.prefill``
  on a fresh cache), the cost counted as rows x (the most virtual tokens + the longest context), padding included.
  The first that does not fit waits for the next step, and so does everyone behind it (splitting a short prompt
  would only add forwards);
- the others are *long*: each is prefilled alone in chunks, in arrival order, with what the group leaves: its first
  chunk through ``host.prefill`` on a fresh cache of its own (which adds the virtual columns of prompt or prefix
  tuning), each later chunk through ``host.forward`` on that cache with the mask and positions tracked here
  (:meth:`KVBatch.step_inputs`), so no virtual columns are added twice. One row alone needs no padding, so its
  cache never has holes.

Short newcomers go first so that one long prompt does not hold every later first token back for all its chunks,
but the group may use only half the budget while a long prompt is under way, so long prompts always progress:
a long prompt of L tokens is in after at most ceil(L / (budget / 2)) steps, a short one after a few.

When a newcomer's last chunk has run, its logits give its first token and its cache joins the decode batch.

When rows are decoding, the scheduler does not run the group's forward here: its prompts go into the decode
step's own forward as one flat sequence beside the decode tokens (:mod:`peftkit.serve.fused`), so the weights are
read once for both (prompt- and prefix-tuning newcomers with their virtual fronts); the budget and the order above
still decide which newcomers go. Long prompts' chunks and groups while nothing decodes are prefilled in forwards of
their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .batch import KVBatch

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass
class PrefillJob:
    """One request on its way into the decode batch."""

    seq: "Sequence"
    batch: KVBatch | None = None  # its own one-row cache once its first chunk ran (chunked prefill only)
    done: int = 0  # context tokens already in ``batch``
    virtual: int = 0  # tokens its first forward feeds besides its context: a prompt-tuning adapter's virtual tokens

    @property
    def remaining(self) -> int:
        return len(self.seq.context) - self.done

    @property
    def front(self) -> int:
        """Virtual tokens still to feed: all of them before its first forward, none after."""
        return self.virtual if self.batch is None else 0

    @property
    def tokens(self) -> int:
        """Tokens the rest of its prefill feeds the model: its front, then the remaining context."""
        return self.front + self.remaining


@dataclass
class PrefillPlan:
    """What one step prefills: a group prefilled whole in one forward, and chunks of (job, tokens) run alone."""

    group: list[PrefillJob]
    chunks: list[tuple[PrefillJob, int]]

    @property
    def cost(self) -> int:
        """Tokens this plan feeds the model, padding and virtual tokens included."""
        return group_cost(self.group) + sum(job.front + n for job, n in self.chunks)


def group_cost(jobs: list[PrefillJob]) -> int:
    """Tokens of a left-padded group prefill: rows x (the most virtual tokens + the longest context)."""
    if not jobs:
        return 0
    return len(jobs) * (max(j.front for j in jobs) + max(j.remaining for j in jobs))


def plan_step(jobs: list[PrefillJob], budget: int) -> PrefillPlan:
    """Choose this step's prefill work within ``budget`` tokens (padding and prompt-tuning virtual tokens counted);
    see the module's docstring. A chunk's context tokens are what its forward's budget leaves after any virtual tokens,
    at least one (so a long prompt always moves; its first chunk may then exceed the budget by its virtual tokens)."""
    long = [j for j in jobs if j.batch is not None or j.tokens > budget]
    short = [j for j in jobs if j.batch is None and j.tokens <= budget]
    reserve = min((budget + 1) // 2, sum(j.tokens for j in long))  # what the long prompts are sure to get
    group: list[PrefillJob] = []
    for job in short:
        if group_cost([*group, job]) > budget - reserve:
            break
        group.append(job)
    left = budget - group_cost(group)
    chunks: list[tuple[PrefillJob, int]] = []
    for job in long:
        if left <= 0:
            break
        chunks.append((job, min(job.remaining, max(1, left - job.front))))
        left -= job.front + chunks[-1][1]
    return PrefillPlan(group, chunks)
