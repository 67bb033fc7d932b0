"""Adapters on demand: a request whose ``model`` names a folder in ``--adapters-dir`` that is not loaded loads it.

How a ``model`` is resolved (:meth:`AdapterLoader.resolve`, on the event loop):

1. the base model's id selects the base; otherwise the request *holds* the name (serve/residency.py) until its
   handler task ends, so the adapter stays resident while the request needs it;
2. a loaded adapter is a cache hit;
3. otherwise the name must be a folder directly inside ``--adapters-dir`` (a name that leads outside it, through
   ``..``, an absolute path or a symlink, is refused with 400; a missing folder is 404 ``model_not_found``);
4. one load per name at a time (single flight): the first request starts it as a task of its own, every
   concurrent request for the name awaits that same task, and a client that goes away does not cancel it for the
   others. The load reads the folder on a worker thread (:func:`read_adapter`), then the scheduler thread, between
   decode steps, evicts least recently used idle adapters if the budget needs room and attaches the new one
   (:meth:`Residency.attach_evicting`), in the place of an evicted one of the same layout when there is one.
   Decoding of other rows goes on during the read.

When the budget is full of adapters in use, the load waits for one to become idle (woken whenever a request
releases its hold), up to ``wait_s``; then the request gets 503 ``adapter_budget_full`` with Retry-After. Waiting
rather than refusing at once is deliberate: under skewed popularity the budget is often briefly full of busy
adapters, and each finishing request frees room within one generation, so a wait serves the request where an
immediate 503 would make every client retry blindly. A budget that can never fit the adapter (pinned adapters
alone fill it) is answered 503 ``adapter_budget_exceeded`` at once.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..tuners.base import BASE
from .metrics import ServeMetrics
from .protocol import APIError, busy
from .registry import (AdapterConflict, AdapterInfo, AdapterPathError, AdapterRegistry, layout_of, read_adapter,
                       resolve_adapter_path)
from .residency import NoRoom, Residency
from .scheduler import QueueFull

# a folder name that is also a usable model id: no separators, no leading dot
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_LISTED = 20  # loaded models named in a 404 at most (a server may hold hundreds)
_RETRY_CONFLICT_S = 0.02  # a name being removed (evicted, deleted) right now: try again after this


class AdapterLoader:
    """Resolves request ``model`` names to adapters, loading folders of ``adapters_dir`` on demand."""

    def __init__(self, registry: AdapterRegistry, scheduler: Any, residency: Residency, metrics: ServeMetrics,
                 adapters_dir: Path | None, wait_s: float = 30.0) -> None:
        self.registry, self.scheduler, self.residency, self.metrics = registry, scheduler, residency, metrics
        self.adapters_dir = adapters_dir
        self.wait_s = wait_s
        self._flights: dict[str, asyncio.Task] = {}
        self._freed = asyncio.Event()  # set (and replaced) whenever a request releases its hold
        self._waiting = 0  # requests awaiting a load: they count against the scheduler's queue bound

    # ---------------------------------------------------------------------------------------------------------
    # Names

    async def resolve(self, model: str) -> str:
        """The adapter ``model`` selects (``BASE`` for the base), loaded and held until the calling task ends."""
        if model == self.registry.base_name:
            return BASE
        loaded = self.residency.acquire(model)
        task = asyncio.current_task()
        assert task is not None, "resolve runs inside a request's task"
        task.add_done_callback(lambda _: self._release(model))
        if loaded:
            self.metrics.cache_hits.labels(model).inc()
            return model
        folder = self.folder(model)
        try:
            self.scheduler.check_room(self._waiting + 1)
        except QueueFull as err:
            raise busy(err) from None
        self.metrics.cache_misses.labels(model).inc()
        flight = self._flights.get(model)
        if flight is None:
            flight = asyncio.create_task(self._load(model, folder, pinned=False), name=f"load adapter {model}")
            self._flights[model] = flight
            flight.add_done_callback(lambda done: self._landed(model, done))
        self._waiting += 1
        try:
            await asyncio.shield(flight)  # the load goes on for the others if this client goes away
        finally:
            self._waiting -= 1
        return model

    def folder(self, model: str) -> Path:
        """The folder ``model`` names in the adapters directory, or an APIError saying why it names none."""
        if self.adapters_dir is None:
            raise self.not_found(model)
        try:
            folder = resolve_adapter_path(self.adapters_dir, model)
        except AdapterPathError as err:
            raise APIError(400, f"model {model!r}: {err}", param="model", code="invalid_model") from None
        if folder.parent != self.adapters_dir or not _FOLDER_NAME.match(model):
            raise APIError(400, f"model {model!r} is not a folder name directly inside the adapters directory "
                           "(letters, digits, '_', '-', '.'; no path separators)", param="model", code="invalid_model")
        if not folder.is_dir():
            raise self.not_found(model)
        if not (folder / checkpoint.CONFIG_NAME).is_file():
            raise APIError(404, f"The model {model!r} does not exist: the folder {model!r} in the adapters directory "
                           f"has no {checkpoint.CONFIG_NAME}, so it is not an adapter", param="model",
                           code="model_not_found")
        return folder

    def not_found(self, model: str) -> APIError:
        where = " or a folder of --adapters-dir (see GET /v1/models)" if self.adapters_dir is not None else ""
        loaded = [self.registry.base_name] + sorted(a.name for a in self.registry.models())
        shown = f"{loaded}" if len(loaded) <= _LISTED else f"{loaded[:_LISTED]} and {len(loaded) - _LISTED} more"
        return APIError(404, f"The model {model!r} does not exist. Available models: {shown}{where}",
                        param="model", code="model_not_found")

    def loadable(self) -> list[str]:
        """Names of the adapter folders in the adapters directory (each holding adapter_config.json), sorted."""
        if self.adapters_dir is None:
            return []
        return sorted(p.name for p in self.adapters_dir.iterdir()
                      if _FOLDER_NAME.match(p.name) and (p / checkpoint.CONFIG_NAME).is_file()
                      and p.resolve().parent == self.adapters_dir)

    def _landed(self, name: str, flight: asyncio.Task) -> None:
        self._flights.pop(name, None)
        if not flight.cancelled():
            flight.exception()  # retrieved: every client may have gone, and its waiters have their copy

    def _release(self, name: str) -> None:
        self.residency.release(name)
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()

    # ---------------------------------------------------------------------------------------------------------
    # Loading

    async def load(self, name: str, folder: Path, requested: str) -> AdapterInfo:
        """Load ``folder`` as the pinned adapter ``name`` (POST /v1/adapters, whose ``path`` was ``requested``);
        an unloadable folder is 400 naming ``requested``, a taken or busy name 409."""
        return await self._load(name, folder, pinned=True, requested=requested)

    async def _load(self, name: str, folder: Path, pinned: bool, requested: str | None = None) -> AdapterInfo:
        start = time.monotonic()
        try:
            info = await self._read_and_attach(name, folder, pinned, start + self.wait_s, requested)
        except BaseException:
            self.metrics.load_failures.labels(name).inc()
            raise
        self.metrics.loads.labels(name).inc()
        self.metrics.load_time.labels(name).observe(time.monotonic() - start)
        return info

    async def _read_and_attach(self, name: str, folder: Path, pinned: bool, deadline: float,
                               requested: str | None) -> AdapterInfo:
        loaded = await self._reserve(name, pinned, deadline)
        if loaded is not None:
            return loaded
        try:
            try:  # disk reads off the event loop and off the scheduler: serving goes on meanwhile
                config, tensors = await asyncio.to_thread(read_adapter, folder)
            except (OSError, ValueError, TypeError) as err:
                raise self._refused(name, err, requested) from None
            new_bytes, layout = self.registry.tensor_bytes(tensors), layout_of(config, tensors)
            waited = False
            while True:
                freed = self._freed  # taken before trying, so a release in between is not missed
                command = self.scheduler.call(lambda: self.residency.attach_evicting(
                    lambda: self.registry.attach(name, config, tensors, str(folder), pinned=pinned), new_bytes,
                    layout, lambda old: self.registry.replace(old, name, config, tensors, str(folder), pinned)))
                try:
                    info, evicted = await asyncio.wrap_future(command)
                    break
                except NoRoom as err:
                    left = deadline - time.monotonic()
                    if err.lasting or left <= 0:
                        raise self._no_room(name, err, waited=not err.lasting) from None
                    if not waited:
                        self.metrics.room_waits.labels(name).inc()
                        waited = True
                    try:  # woken when a request lets go of an adapter; re-checked at least once a second
                        await asyncio.wait_for(freed.wait(), timeout=min(left, 1.0))
                    except TimeoutError:
                        pass
                except (OSError, ValueError, TypeError) as err:
                    raise self._refused(name, err, requested) from None
        finally:
            self.registry.release(name)
        for victim in evicted:
            self.metrics.evictions.labels(victim.name).inc()
        return info

    async def _reserve(self, name: str, pinned: bool, deadline: float) -> AdapterInfo | None:
        """Claim ``name`` for loading: None once claimed. On demand (not ``pinned``), an adapter that got loaded
        meanwhile is returned as it is, and a removal of the name under way (an eviction) is waited out; an admin
        load of a taken or busy name is refused at once (409)."""
        while True:
            try:
                self.registry.reserve(name, loading=True)
                return None
            except AdapterConflict as err:
                info = self.registry.info(name)
                if pinned or time.monotonic() > deadline:
                    raise APIError(409, str(err), param="name" if pinned else "model",
                                   code="adapter_exists" if pinned or info is not None else "adapter_busy") from None
                if info is not None:
                    return info
                await asyncio.sleep(_RETRY_CONFLICT_S)

    def _refused(self, name: str, err: Exception, requested: str | None) -> APIError:
        """A folder that cannot be loaded: 422 for a request's ``model`` (the request is fine, the folder is not),
        400 naming ``path`` for an admin load (as before on-demand loading existed). The directory is not shown."""
        shown = str(err).replace(str(self.adapters_dir), "<adapters-dir>") if self.adapters_dir else str(err)
        if requested is not None:
            return APIError(400, f"cannot load adapter {name!r} from {requested!r}: {shown}", param="path")
        return APIError(422, f"cannot load adapter {name!r}: {shown}", param="model", code="adapter_load_failed")

    def _no_room(self, name: str, err: NoRoom, waited: bool) -> APIError:
        if waited:
            message = f"cannot load adapter {name!r}: {err}; waited {self.wait_s:g} s, none became idle. Retry later"
            return APIError(503, message, type_="server_error", code="adapter_budget_full", headers={"Retry-After": "1"})
        return APIError(503, f"cannot load adapter {name!r}: {err}", type_="server_error", code="adapter_budget_exceeded")
