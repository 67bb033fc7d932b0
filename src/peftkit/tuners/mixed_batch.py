"""Mixed batches: which adapter each row (or token) of one forward uses, and the per-row gathers of stacked adapter
weights that :class:`~peftkit.tuners.layer.StackedAdapterLayer` methods run on them.

Each adapter keeps one slot (:class:`Slots`) in every layer's stacks for as long as it is loaded; a
:class:`MixedBatch` names each row's slot for one forward, with the index tensors built once on the host so that no
layer asks the device which rows it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable

import torch

FREE_SLOT = ""  # a name in MixedBatch.order that no adapter has: a free slot (its adapter was deleted)


class Slots:
    """Each adapter's slot in mixed batches (``MixedBatch.order``): the lowest free one when it is added, kept until it
    is deleted, so the layers' stacks change one slot per load or deletion instead of being rebuilt (StackCache)."""

    def __init__(self) -> None:
        self.names: list[str | None] = []  # None: a free slot

    def take(self, name: str) -> None:
        free = next((k for k, n in enumerate(self.names) if n is None), len(self.names))
        self.names[free : free + 1] = [name]

    def rename(self, old: str, new: str) -> None:
        self.names = [new if n == old else n for n in self.names]

    def free(self, name: str) -> None:
        self.names = [None if n == name else n for n in self.names]
        while self.names and self.names[-1] is None:
            self.names.pop()

    def order(self, base: str) -> tuple[str, ...]:
        """``base`` (slot 0), then every slot's adapter, :data:`FREE_SLOT` where none."""
        return (base, *(FREE_SLOT if n is None else n for n in self.names))


class Scratch:
    """Memory that one mixed forward's per-row gathers reuse, layer after layer (:func:`gather_rows` with a key):
    one buffer per key, grown to the largest gather asked of it.

    Why: each mixed LoRA layer gathers its rows' factors, blocks of 0.2-0.8 MiB (16 rows of SmolLM2-135M's
    rank-padded stacks: 360 gathers, 194 MiB in one decode step). A server's malloc serves every block over
    256 KiB with fresh pages (``serve/command.py``, ``tune_malloc``, which keeps its peak memory from creeping), so
    each gather faulted its pages in again: a 16-row step of 12 mixed adapters took 145-149 ms that way against
    85-89 ms with these buffers (three interleaved rounds in one process under that setting), which stay mapped and
    warm in the cache for the whole forward. Not used while
    autograd records: a backward pass would need every layer's gather intact."""

    def __init__(self) -> None:
        self.buffers: dict[Hashable, torch.Tensor] = {}

    def take(self, key: Hashable, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, in ``key``'s buffer."""
        n = math.prod(shape)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < n or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffers[key] = like.new_empty(n)
        return buffer[:n].view(shape)


@dataclass
class MixedBatch:
    """Per-row adapter choice for one forward: row i uses adapter ``order[index[i]]``; ``order[0]`` is the base.
    ``order`` is the model's slots, one per adapter, in the order they were added, with :data:`FREE_SLOT` where an
    adapter was deleted (kept so the other adapters keep their slots).

    ``rows[k]``: the rows that use ``order[k]`` (a tensor on the model's device) or None when no row does. Built
    once from the host-side choice (:meth:`build`), so that no layer asks the device which rows it has: a
    ``nonzero()`` per adapter per layer would stop the host until the GPU catches up, at every layer.
    ``single``: the one slot every row uses, when they all use one (a layer may then skip the per-row gather).
    ``per_token``: the choice is per token of a single flat sequence (a fused serving step, :mod:`peftkit.serve.
    fused`): layers then see each token as a row. ``segments`` then cut those rows into (start, stop, slot): a
    run of rows on one slot (a prompt), or ``slot`` None for rows of mixed slots (the decode tokens), so a layer
    may treat a run with its slot's weights once instead of gathering a copy per token. ``hold_in_slots``: frozen
    adapters' weights may become views of their slots in the stacks (:attr:`PeftModel.hold_in_slots`, a server's
    choice), so they exist once. ``capacity``: adapters the stacks should have slots for from their first build (a
    server's budget, :attr:`PeftModel.slot_capacity`), so that they are not built again as adapters arrive.
    ``scratch``: buffers the layers' per-row gathers reuse during this forward (:class:`Scratch`). ``choice``: the
    host-side slot of each row, from which :meth:`members` picks the rows a layer's adapters act on; ``used``: the
    distinct slots it names, the only ones this forward reads (None: not known, every slot counts). ``epoch``: the
    model's count of adapter changes (:attr:`PeftModel._epoch`), given when it holds adapters in their slots: a layer
    whose adapters are all held then skips its checks until the count moves (:meth:`StackCache.get`)."""

    order: tuple[str, ...]
    index: torch.Tensor
    rows: tuple[torch.Tensor | None, ...]
    single: int | None = None
    per_token: bool = False
    segments: tuple[tuple[int, int, int | None], ...] = ()
    hold_in_slots: bool = False
    capacity: int | None = None
    scratch: Scratch = field(default_factory=Scratch)
    choice: tuple[int, ...] = ()
    used: tuple[int, ...] | None = None
    epoch: int | None = None
    _members: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, order: tuple[str, ...], choice: list[int], device: torch.device, per_token: bool = False,
              hold_in_slots: bool = False, capacity: int | None = None, epoch: int | None = None) -> "MixedBatch":
        """From ``choice`` (row b uses ``order[choice[b]]``, a host list), with the index tensors on ``device``."""
        members: list[list[int]] = [[] for _ in order]
        for row, k in enumerate(choice):
            members[k].append(row)
        rows = tuple(torch.tensor(m, dtype=torch.long, device=device) if m else None for m in members)
        single = choice[0] if choice and len(set(choice)) == 1 else None
        return cls(order, torch.tensor(choice, dtype=torch.long, device=device), rows, single, per_token,
                   segments(choice) if per_token else (), hold_in_slots, capacity, choice=tuple(choice),
                   used=tuple(k for k, m in enumerate(members) if m), epoch=epoch)

    def members(self, present: frozenset[int], start: int = 0, stop: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None | bool:
        """The rows in ``start:stop`` whose slot is in ``present`` (the slots of the adapters a layer holds), as
        (their positions from ``start``, their slots) on the device; None when no row is, True when every row is.

        Why: a row whose adapter does not target the layer (or the base's row) would gather a slot of zeros and
        add nothing. With serve_load.py's four LoRA shapes about half of a mixed step's rows are such in each
        layer. Asked by every layer of a forward, so worked out once per set of slots (layers of one kind share
        it: every q_proj holds the same adapters) on the host."""
        stop = len(self.choice) if stop is None else stop
        key = (present, start, stop)
        if key not in self._members:
            rows = [b for b in range(start, stop) if self.choice[b] in present]
            if len(rows) in (0, stop - start):
                self._members[key] = bool(rows) or None
            else:
                device = self.index.device
                self._members[key] = (torch.tensor([b - start for b in rows], dtype=torch.long, device=device),
                                      torch.tensor([self.choice[b] for b in rows], dtype=torch.long, device=device))
        return self._members[key]


def segments(choice: list[int], shortest_run: int = 2) -> tuple[tuple[int, int, int | None], ...]:
    """``choice`` cut into maximal runs of one slot at least ``shortest_run`` long, (start, stop, slot), and the rows
    between them, (start, stop, None)."""
    out: list[tuple[int, int, int | None]] = []
    start = 0
    while start < len(choice):
        stop = start
        while stop < len(choice) and choice[stop] == choice[start]:
            stop += 1
        if stop - start >= shortest_run:
            out.append((start, stop, choice[start]))
        elif out and out[-1][2] is None:
            out[-1] = (out[-1][0], stop, None)
        else:
            out.append((start, stop, None))
        start = stop
    return tuple(out)


def slot_address(stack: torch.Tensor, slot: int) -> int:
    """Where ``stack[slot]`` starts in memory, without making the view (this runs for every touched layer of a load)."""
    return stack.data_ptr() + slot * stack.stride(0) * stack.element_size()


def gather_rows(stack: torch.Tensor, index: torch.Tensor, batch: int, scratch: Scratch | None = None,
                key: Hashable = None) -> torch.Tensor:
    """Per-row weights ``stack[index]``, checking the index matches the input's batch size; into ``scratch``'s
    buffer ``key`` when given and autograd is off (the result is then valid until the next gather with that key)."""
    if index.numel() != batch:
        raise ValueError(f"adapter_names has {index.numel()} entries but the batch has {batch} rows")
    if scratch is None or torch.is_grad_enabled():
        return stack.index_select(0, index)
    return torch.index_select(stack, 0, index, out=scratch.take(key, stack, (index.numel(), *stack.shape[1:])))
