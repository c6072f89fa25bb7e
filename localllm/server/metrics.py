"""Prometheus metrics on a per-app registry (no process-global state).

Engine figures (slots, queue, KV cells, token counters, tok/s) are read from `engine.stats()`
at scrape time by a collector; request counts and the TTFT histogram are recorded by the app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from localllm.engine.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # still loading
            return
        gauges = {
            "localllm_slots": ("Slots (requests decoded at once).", stats.n_slots),
            "localllm_busy_slots": ("Slots running a request.", stats.busy_slots),
            "localllm_queue_length": ("Requests waiting for a slot.", stats.queue_length),
            "localllm_kv_cells_used": ("KV cache cells holding tokens.", stats.kv_cells_used),
            "localllm_kv_cells": ("KV cache cells in total.", stats.kv_cells_total),
            "localllm_prompt_tokens_per_second": (
                "Prompt tokens computed per second of prefill.",
                stats.prompt_tokens_per_s,
            ),
            "localllm_decode_tokens_per_second": (
                "Tokens generated per second of decoding (all slots together).",
                stats.decode_tokens_per_s,
            ),
            "localllm_context_checkpoint_bytes": (
                "Host memory the slots' context checkpoints hold (recurrent, hybrid and "
                "sliding-window models).",
                stats.checkpoint_bytes,
            ),
        }
        rate = stats.spec_acceptance_rate
        if rate is not None:
            gauges["localllm_spec_decode_acceptance_rate"] = (
                "Share of speculative guesses the model accepted (accepted / drafted).",
                rate,
            )
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "localllm_prompt_tokens": ("Prompt tokens computed.", stats.prompt_tokens_total),
            "localllm_cached_prompt_tokens": (
                "Prompt tokens reused from the KV cache.",
                stats.cached_tokens_total,
            ),
            "localllm_generated_tokens": ("Tokens generated.", stats.generated_tokens_total),
            "localllm_engine_requests": ("Requests the engine finished.", stats.requests_total),
            "localllm_context_checkpoints_saved": (
                "Context checkpoints saved while decoding prompts.",
                stats.checkpoints_saved_total,
            ),
            "localllm_context_checkpoints_restored": (
                "Context checkpoints restored to reuse a prompt's prefix.",
                stats.checkpoints_restored_total,
            ),
            # llama-server's spec_decode_* counters (speculative decoding, engine.speculative)
            "localllm_spec_decode_num_draft_tokens": (
                "Speculative: draft tokens verified.",
                stats.spec_draft_tokens_total,
            ),
            "localllm_spec_decode_num_accepted_tokens": (
                "Speculative: draft tokens accepted by the model.",
                stats.spec_accepted_tokens_total,
            ),
            "localllm_spec_decode_num_drafts": (
                "Speculative: verification steps.",
                stats.spec_drafts_total,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "localllm_requests",
            "HTTP requests answered, by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "localllm_time_to_first_token_seconds",
            "Time from request to first generated token, by model.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
