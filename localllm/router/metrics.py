"""Prometheus figures of a router, per model (the `model` label), read at scrape time.

Loads, unloads (by reason: evicted, expired, requested, crashed, shutdown) and their durations
come from the router's counters; slots, queue and token counters from each loaded worker's engine
(`stats` over its pipe, with a short timeout so a stuck worker cannot stall a scrape).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from localllm.errors import LocalLLMError
from localllm.router.router import LoadedModel, Router
from localllm.router.worker import rss_bytes

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 1.0


class RouterCollector(Collector):
    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        router = self._router
        loaded = {m.name: m for m in router.loaded()}
        names = sorted(set(router.counters) | set(loaded))

        def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["model", *labels])

        def counter(name: str, doc: str, *labels: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["model", *labels])

        up = gauge("localllm_model_loaded", "1 while loaded.")
        loads = counter("localllm_model_loads", "Model loads.")
        load_s = counter("localllm_model_load_seconds", "Time spent loading.")
        unloads = counter("localllm_model_unloads", "Unloads, by reason.", "reason")
        unload_s = counter("localllm_model_unload_seconds", "Time spent unloading.")
        crashes = counter("localllm_model_crashes", "Worker deaths.")
        requests = counter("localllm_model_requests", "Requests routed to it.")
        in_flight = gauge("localllm_model_requests_in_flight", "Requests running.")
        planned = gauge("localllm_model_planned_bytes", "Planned bytes per device.", "device")
        rss = gauge("localllm_model_rss_bytes", "Worker resident memory.")
        for name in names:
            counters = router.counters.get(name)
            model = loaded.get(name)
            up.add_metric([name], 1.0 if model else 0.0)
            if counters is not None:
                loads.add_metric([name], counters.loads)
                load_s.add_metric([name], counters.load_seconds_total)
                for reason, count in sorted(counters.unloads.items()):
                    unloads.add_metric([name, reason], count)
                unload_s.add_metric([name], counters.unload_seconds_total)
                crashes.add_metric([name], counters.crashes)
                requests.add_metric([name], counters.requests)
            if model is not None:
                in_flight.add_metric([name], model.in_flight)
                for device in model.need:
                    planned.add_metric([name, device], model.bytes_on(device))
                resident = rss_bytes(model.worker.pid)
                if resident is not None:
                    rss.add_metric([name], resident)
        yield from (up, loads, load_s, unloads, unload_s, crashes, requests, in_flight, planned)
        yield rss
        yield from self._engine_metrics(loaded)

    def _engine_metrics(self, loaded: dict[str, LoadedModel]) -> Iterator[Metric]:
        gauges = {
            "localllm_slots": ("Slots (requests decoded at once).", "n_slots"),
            "localllm_busy_slots": ("Slots running a request.", "busy_slots"),
            "localllm_queue_length": ("Requests waiting for a slot.", "queue_length"),
            "localllm_kv_cells_used": ("KV cache cells holding tokens.", "kv_cells_used"),
            "localllm_decode_tokens_per_second": (
                "Tokens generated per second of decoding (all slots together).",
                "decode_tokens_per_s",
            ),
        }
        counters = {
            "localllm_prompt_tokens": ("Prompt tokens computed.", "prompt_tokens_total"),
            "localllm_generated_tokens": ("Tokens generated.", "generated_tokens_total"),
        }
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for metric, (doc, _) in gauges.items():
            families[metric] = GaugeMetricFamily(metric, doc, labels=["model"])
        for metric, (doc, _) in counters.items():
            families[metric] = CounterMetricFamily(metric, doc, labels=["model"])
        fields = {**{k: v[1] for k, v in gauges.items()}, **{k: v[1] for k, v in counters.items()}}
        for name, model in loaded.items():
            try:
                stats = model.worker.stats(timeout_s=STATS_TIMEOUT_S)
            except (LocalLLMError, FutureTimeout):
                log.warning("no engine figures from %s within %.1f s", name, STATS_TIMEOUT_S)
                continue
            for metric, field in fields.items():
                families[metric].add_metric([name], getattr(stats, field))
        yield from families.values()
