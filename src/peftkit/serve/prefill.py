"""Chunked prefill: newcomers' prompts enter the cache a bounded number of tokens per scheduler step.

Prefilling a prompt in one forward stalls every running row for as long as that forward takes, which grows with
the prompt (and with how many newcomers arrive together). Instead each scheduler step spends at most a token
budget (``--prefill-chunk``) on prefill, then runs the decode step for the running rows, so a decode row waits at
most one chunk's forward between its tokens whatever the newcomers' lengths, and a newcomer's first token comes
after ceil(prompt / budget) steps.

Per step, newcomers are served first come, first served:

- a newcomer whose whole context still fits in what is left of the budget joins this step's *group*: the group's
  contexts are left-padded and prefilled in one forward (``host.prefill`` on a fresh cache), the cost counted as
  rows x longest context, padding included;
- a newcomer whose context could fit in a budget but not in what is left of this one waits for the next step (and
  so does everyone behind it): splitting a short prompt would only add forwards;
- a newcomer longer than the whole budget is prefilled *alone in chunks*: its first chunk through ``host.prefill`` on
  a fresh cache of its own (which adds the virtual columns of prompt or prefix tuning), each later chunk through
  ``host.forward`` on that cache with the mask and positions tracked here (:meth:`KVBatch.step_inputs`), so no
  virtual columns are added twice. One row alone needs no padding, so its cache never has holes.

When a newcomer's last chunk has run, its logits give its first token and its cache joins the decode batch.

Why not put newcomers' tokens in the decode step's own forward ("fused" prefill)? Batched HF attention needs
rectangular inputs: the decode rows would be padded to the chunk's length, multiplying their compute by it on the
CPU, where there is no varlen attention kernel to avoid that. Two forwards per step cost the sum of their work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .batch import KVBatch

if TYPE_CHECKING:
    from .scheduler import Sequence


@dataclass
class PrefillJob:
    """One request on its way into the decode batch."""

    seq: "Sequence"
    batch: KVBatch | None = None  # its own one-row cache once its first chunk ran (chunked prefill only)
    done: int = 0  # context tokens already in ``batch``

    @property
    def remaining(self) -> int:
        return len(self.seq.context) - self.done


@dataclass
class PrefillPlan:
    """What one step prefills: a group prefilled whole in one forward, and chunks of (job, tokens) run alone."""

    group: list[PrefillJob]
    chunks: list[tuple[PrefillJob, int]]

    @property
    def cost(self) -> int:
        """Tokens this plan feeds the model, padding included."""
        return group_cost(self.group) + sum(n for _, n in self.chunks)


def group_cost(jobs: list[PrefillJob]) -> int:
    """Tokens of a left-padded group prefill: rows x the longest context."""
    return len(jobs) * max((j.remaining for j in jobs), default=0)


def plan_step(jobs: list[PrefillJob], budget: int) -> PrefillPlan:
    """Choose this step's prefill work, first come first served, within ``budget`` tokens (padding counted)."""
    group: list[PrefillJob] = []
    chunks: list[tuple[PrefillJob, int]] = []
    spent = 0  # by chunks
    for job in jobs:
        left = budget - spent - group_cost(group)
        if left <= 0:
            break
        if job.batch is None and group_cost([*group, job]) - group_cost(group) <= left:
            group.append(job)
            continue
        if job.batch is None and job.remaining <= budget:
            break  # fits whole in the next step's budget
        n = min(job.remaining, left)
        chunks.append((job, n))
        spent += n
    return PrefillPlan(group, chunks)
