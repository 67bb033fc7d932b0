"""Which adapters stay in memory: a budget (``--max-adapters N``, ``--adapter-memory MiB``), least recently used
idle adapters evicted to make room, and holds that keep an adapter resident while a request needs it.

An adapter is *idle* when no request holds it and the scheduler has no running, prefilling or waiting row for it
(``busy``). A request holds the adapter its ``model`` names from the moment the name is resolved until its handler
ends (streaming included), so an adapter cannot be evicted between the lookup and the request joining the queue,
nor while its rows are in flight. Pinned adapters (named at start with ``--adapter`` or posted by an admin) count
against the budget but are never evicted.

Eviction and attaching both run on the scheduler thread, inside one command between decode steps
(:meth:`Residency.attach_evicting`): the set of adapters a forward pass sees changes only there. The lookup that
takes a hold and the choice of victims happen under one lock, so a request either holds an adapter before it is
chosen (then it is not chosen) or finds it gone and loads it again.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .registry import AdapterConflict, AdapterInfo, AdapterRegistry, UnknownAdapter

MIB = 2**20


@dataclass(frozen=True)
class Budget:
    """How many adapters, and how many bytes of adapter tensors, may be resident at once (None: no limit)."""

    max_adapters: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_adapters is not None and self.max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {self.max_adapters}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")

    def describe(self) -> str:
        parts = [f"--max-adapters {self.max_adapters}"] if self.max_adapters is not None else []
        parts += [f"--adapter-memory {self.max_bytes / MIB:g} MiB"] if self.max_bytes is not None else []
        return " and ".join(parts) or "no budget"


def budget_bytes(mib: float | None) -> int | None:
    """``--adapter-memory`` (MiB) in bytes."""
    return None if mib is None else int(mib * MIB)


class NoRoom(Exception):
    """The budget is full of adapters that cannot be evicted now. ``lasting``: it never will be (pinned adapters
    alone, or this adapter alone, exceed the budget), so waiting is pointless."""

    def __init__(self, message: str, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


class Residency:
    """Holds, recency and the budget over ``registry``'s adapters; thread-safe."""

    def __init__(self, registry: AdapterRegistry, budget: Budget, busy: Callable[[str], bool]) -> None:
        self.registry = registry
        self.budget = budget
        self.busy = busy  # whether the scheduler has a live row (running, prefilling, waiting) for an adapter
        self.peak = 0  # the most adapters attached at once, measured after each load's evictions
        self.reused = 0  # loads that took over an evicted adapter's layers (attach_evicting's ``replace``)
        self._lock = threading.Lock()
        self._holds: Counter[str] = Counter()
        self._clock = itertools.count(1)
        self._last_used: dict[str, int] = {}

    # ---------------------------------------------------------------------------------------------------------
    # Requests (event loop)

    def acquire(self, name: str) -> bool:
        """Hold ``name`` (loaded or not) for a request, mark it most recently used, and say whether it is loaded."""
        with self._lock:
            self._holds[name] += 1
            self._last_used[name] = next(self._clock)
            return self.registry.lookup(name) is not None

    def release(self, name: str) -> None:
        with self._lock:
            self._holds[name] -= 1
            if self._holds[name] <= 0:
                del self._holds[name]
                if self.registry.lookup(name) is None:  # unknown or gone: keep no trace of the name
                    self._last_used.pop(name, None)

    def held(self, name: str) -> int:
        with self._lock:
            return self._holds[name]

    # ---------------------------------------------------------------------------------------------------------
    # Loading (scheduler thread)

    def attach_evicting(self, attach: Callable[[], AdapterInfo], new_bytes: int, layout: int | None = None,
                        replace: Callable[[str], AdapterInfo | None] | None = None) -> tuple[AdapterInfo, list[AdapterInfo]]:
        """Make room for an adapter of ``new_bytes`` and attach it with ``attach()``: the attached adapter's info,
        and the adapters evicted for it.

        Victims are chosen (least recently used idle ones first, see :meth:`_choose` for ``layout``) and hidden from
        new requests before the new adapter goes in, and detached only once it is: a refused folder leaves every
        adapter where it was. The new adapter takes the first victim's place with ``replace(victim)`` when their
        layouts allow (its layers are reused, nothing is built), else ``attach()`` adds it. Raises :class:`NoRoom`
        when idle adapters cannot make enough room.
        """
        with self._lock:
            victims = self._choose(new_bytes, layout)
            hidden = [info for info in victims if self._hide(info.name)]
        if len(hidden) < len(victims):  # an admin removal of one of them is under way: try again shortly
            for info in hidden:
                self.registry.restore(info)
            raise NoRoom("an adapter chosen for eviction is being removed right now", lasting=False)
        try:
            info = replace(hidden[0].name) if replace is not None and hidden else None
            replaced = info is not None
            info = info or attach()
        except BaseException:
            for victim in hidden:
                self.registry.restore(victim)
            raise
        for victim in hidden:
            if not (replaced and victim is hidden[0]):
                self.registry.detach(victim.name)
            self.registry.release(victim.name)
        self.reused += replaced
        self.peak = max(self.peak, self.registry.attached())
        return info, hidden

    def _choose(self, new_bytes: int, layout: int | None = None) -> list[AdapterInfo]:
        """The idle adapters to evict (least recently used first) so that one more of ``new_bytes`` fits.

        With ``layout``: if an idle adapter of that layout makes room on its own, the least recently used such one
        goes instead of the least recently used of all, so the new adapter can take over its layers. Not strictly
        LRU then: it may evict an adapter used more recently than another idle one, which costs at most one more
        load of it if it is asked for again, and a load into reused layers costs a third of building them (on
        SmolLM2-135M with 16 resident: 10-20 ms against 35 ms to attach and 6 to detach). Limiting the choice to the
        older half of the idle adapters left 36 of 76 evictions at 512 adapters of four layouts without reuse. With
        adapters of one layout (one recipe, the usual fleet) it is LRU exactly."""
        resident = self.registry.models()
        count, total = len(resident) + 1, sum(a.bytes for a in resident) + new_bytes
        if self.fits(count, total):
            return []
        pinned = [a for a in resident if a.pinned]
        pinned_count, pinned_bytes = len(pinned) + 1, sum(a.bytes for a in pinned) + new_bytes
        if not self.fits(pinned_count, pinned_bytes):
            raise NoRoom(f"this adapter ({new_bytes / MIB:.2f} MiB) and the {len(pinned)} pinned adapter(s) "
                         f"({(pinned_bytes - new_bytes) / MIB:.2f} MiB) do not fit in {self.budget.describe()}; "
                         "raise the budget or DELETE a pinned adapter", lasting=True)
        lru = sorted((a for a in resident if not a.pinned), key=lambda a: self._last_used.get(a.name, 0))
        idle = [a for a in lru if not self._holds[a.name] and not self.busy(a.name)]
        same = next((a for a in idle if layout is not None and a.layout == layout), None)
        if same is not None and self.fits(count - 1, total - same.bytes):
            return [same]
        victims = []
        for info in lru:
            if self.fits(count, total):
                break
            if self._holds[info.name] or self.busy(info.name):
                continue
            victims.append(info)
            count, total = count - 1, total - info.bytes
        if not self.fits(count, total):
            raise NoRoom(f"all {len(resident)} resident adapters are in use by requests ({self.budget.describe()}); "
                         "the request waits for one to become idle", lasting=False)
        return victims

    def _hide(self, name: str) -> bool:
        """Take ``name`` out of the names requests find (the caller detaches it); False if a removal is under way."""
        try:
            self.registry.reserve(name, loading=False)
        except (AdapterConflict, UnknownAdapter):
            return False
        return True

    def fits(self, count: int, total: int) -> bool:
        b = self.budget
        return (b.max_adapters is None or count <= b.max_adapters) and (b.max_bytes is None or total <= b.max_bytes)
