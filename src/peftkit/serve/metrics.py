"""Prometheus metrics for ``GET /metrics``, labelled per adapter (the request's ``model``; the base model by its id).

Each app gets its own :class:`prometheus_client.CollectorRegistry` (never the process-wide default), so several apps
in one process (tests, embedding) keep separate counts. Counters and histograms are updated where things happen:
requests when they are submitted and when they end (from the scheduler thread, through the request's event
callback), adapter cache hits/misses when a ``model`` is resolved, loads and evictions on the scheduler thread.
Gauges of what is resident and queued, and the scheduler's own counters (decode steps and their rows, seconds spent
decoding, prefilling, loading adapters and idle), are read at scrape time from the registry and the scheduler, so
they are never stale.

Timings (seconds, ``time.monotonic``) of a request, from the timestamps the scheduler sets on its Sequence:
queue time = admitted to a prefill - submitted; time to first token = first token sampled - submitted; latency =
finished - submitted.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..tuners.base import BASE
from .registry import AdapterRegistry
from .residency import Residency

# request timings on a CPU server run from milliseconds (a hit's first token) to minutes (long generations)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

__all__ = ["ServeMetrics", "CONTENT_TYPE_LATEST"]


class ServeMetrics:
    """The app's metrics. ``label(adapter)`` names an adapter in labels (the base model by its id)."""

    def __init__(self, registry: AdapterRegistry, residency: Residency, load: Callable[[], dict[str, int]],
                 engine: Callable[[], dict[str, float]] = dict) -> None:
        self.base_name = registry.base_name
        self.prometheus = CollectorRegistry(auto_describe=True)
        r, a = self.prometheus, ["adapter"]
        self.requests = Counter("peftkit_requests", "Generation requests submitted (one per choice)", a, registry=r)
        self.finished = Counter("peftkit_requests_finished", "Requests that ended, by finish reason (stop, length, "
                                "error)", [*a, "finish_reason"], registry=r)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "Prompt tokens of finished requests", a, registry=r)
        self.completion_tokens = Counter("peftkit_completion_tokens", "Generated tokens of finished requests", a, registry=r)
        self.ttft = Histogram("peftkit_time_to_first_token_seconds", "From submission to the first sampled token", a,
                              registry=r, buckets=_REQUEST_BUCKETS)
        self.latency = Histogram("peftkit_request_latency_seconds", "From submission to the last token (or the error)",
                                 a, registry=r, buckets=_REQUEST_BUCKETS)
        self.queue_time = Histogram("peftkit_queue_time_seconds", "From submission until a prefill takes the request",
                                    a, registry=r, buckets=_REQUEST_BUCKETS)
        self.cache_hits = Counter("peftkit_adapter_cache_hits", "Requests whose adapter was resident", a, registry=r)
        self.cache_misses = Counter("peftkit_adapter_cache_misses", "Requests whose adapter had to be loaded from "
                                    "--adapters-dir (or was being loaded)", a, registry=r)
        self.loads = Counter("peftkit_adapter_loads", "Adapter loads (reads of a folder attached to the model)", a, registry=r)
        self.load_failures = Counter("peftkit_adapter_load_failures", "Adapter loads refused (bad folder, no room)", a,
                                     registry=r)
        self.load_time = Histogram("peftkit_adapter_load_seconds", "Time to read an adapter folder and attach it "
                                   "(waiting for room included)", a, registry=r, buckets=_LOAD_BUCKETS)
        self.room_waits = Counter("peftkit_adapter_room_waits", "Loads that waited for a busy adapter to become idle "
                                  "(the budget was full of adapters in use)", a, registry=r)
        self.evictions = Counter("peftkit_adapter_evictions", "Idle adapters evicted to make room", a, registry=r)
        r.register(_Resident(registry, residency, load))
        r.register(_Engine(engine))

    def label(self, adapter: str) -> str:
        return self.base_name if adapter == BASE else adapter

    def watch(self, seq: Any) -> Callable[[Any], None]:
        """An event callback for ``seq`` that passes each event on to its current one and records the request's
        counts and timings when it ends. The caller sets it as ``seq.on_event``."""
        label, deliver = self.label(seq.adapter), seq.on_event
        self.requests.labels(label).inc()

        def on_event(event: Any) -> None:
            try:
                if event.kind != "text":
                    self._ended(seq, label, event.finish_reason or "error")
            finally:
                deliver(event)

        return on_event

    def _ended(self, seq: Any, label: str, reason: str) -> None:
        now = time.monotonic()
        self.finished.labels(label, reason).inc()
        self.prompt_tokens.labels(label).inc(len(seq.prompt_ids))
        self.completion_tokens.labels(label).inc(len(seq.output_ids))
        self.latency.labels(label).observe(now - seq.created_at)
        if seq.admitted_at is not None:
            self.queue_time.labels(label).observe(seq.admitted_at - seq.created_at)
        if seq.first_token_at is not None:
            self.ttft.labels(label).observe(seq.first_token_at - seq.created_at)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (what GET /metrics returns, as CONTENT_TYPE_LATEST)."""
        return generate_latest(self.prometheus)


class _Resident(Collector):
    """Gauges read at scrape time: resident adapters and their bytes, the budget, the peak, running and waiting."""

    def __init__(self, registry: AdapterRegistry, residency: Residency, load: Callable[[], dict[str, int]]) -> None:
        self.registry, self.residency, self.load = registry, residency, load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        resident = self.registry.models()
        budget = self.residency.budget
        yield GaugeMetricFamily("peftkit_adapters_resident", "Adapters attached to the model", len(resident))
        yield GaugeMetricFamily("peftkit_adapters_resident_peak", "The most adapters attached at once so far",
                                max(self.residency.peak, len(resident)))
        yield CounterMetricFamily("peftkit_adapter_reuses", "Loads that took over an evicted adapter's layers (same "
                                  "layout: nothing built or taken apart)", self.residency.reused)
        yield GaugeMetricFamily("peftkit_adapters_resident_bytes", "Bytes of every resident adapter's tensors",
                                sum(a.bytes for a in resident))
        per = GaugeMetricFamily("peftkit_adapter_resident_bytes", "Bytes of one resident adapter's tensors",
                                labels=["adapter", "pinned"])
        for info in resident:
            per.add_metric([info.name, str(info.pinned).lower()], info.bytes)
        yield per
        if budget.max_adapters is not None:
            yield GaugeMetricFamily("peftkit_adapters_max", "--max-adapters", budget.max_adapters)
        if budget.max_bytes is not None:
            yield GaugeMetricFamily("peftkit_adapter_memory_limit_bytes", "--adapter-memory in bytes", budget.max_bytes)
        load = self.load()
        yield GaugeMetricFamily("peftkit_requests_running", "Requests in the decode batch", load["running"])
        yield GaugeMetricFamily("peftkit_requests_waiting", "Requests waiting for a batch slot", load["waiting"])


# the scheduler's counters (Scheduler.stats) exported, with their help text
_ENGINE = {
    "steps": ("peftkit_scheduler_steps", "Scheduler iterations (commands, admissions, a prefill chunk, a decode step)"),
    "decode_steps": ("peftkit_decode_steps", "Decode steps (one forward for every running row)"),
    "decode_rows": ("peftkit_decode_rows", "Rows over all decode steps (/ decode steps = the mean batch)"),
    "decode_s": ("peftkit_decode_seconds", "Seconds in decode steps (forward and sampling; a fused step's prompts "
                 "included)"),
    "fused": ("peftkit_fused_prefills", "Prompts prefilled inside a decode step's forward (fused steps)"),
    "prefill_tokens": ("peftkit_prefill_tokens", "Prompt tokens prefilled, padding included"),
    "prefill_s": ("peftkit_prefill_seconds", "Seconds in prefill forwards"),
    "command_s": ("peftkit_adapter_change_seconds", "Seconds the scheduler spent attaching and removing adapters "
                  "between steps (reading the folders happens on another thread)"),
    "idle_s": ("peftkit_scheduler_idle_seconds", "Seconds the scheduler waited with nothing to do"),
}


class _Engine(Collector):
    """Counters of the scheduler thread, read at scrape time: how its time splits, and the mean decode batch."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.stats()
        for key, (name, text) in _ENGINE.items():
            if key in stats:
                yield CounterMetricFamily(name, text, stats[key])
