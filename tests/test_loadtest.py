"""`localllm bench` against a live localllm server on 127.0.0.1 (the real embedded model)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from localllm.errors import BenchError
from localllm.loadtest import check_target, format_bench, plot_bench, run_bench
from tests.conftest import API_KEY


def test_bench_sweeps_concurrency(live_server: Any, tmp_path: Path) -> None:
    result = run_bench(
        live_server.url,
        concurrency=(1, 2),
        prompt_words=(16,),
        max_tokens=(8,),
        requests_per_point=2,
        time_limit_s=60,
        api_key=API_KEY,
    )
    assert result.model == "gemma-3-270m"
    assert [p.concurrency for p in result.points] == [1, 2]
    for point in result.points:
        assert point.errors == 0, point.error_samples
        assert point.requests_done == 2
        assert point.aggregate_tok_s > 0 and point.per_stream_tok_s > 0
        assert 0 < point.ttft_p50_ms <= point.ttft_p95_ms <= point.ttft_p99_ms
        assert 0 < point.itl_p50_ms <= point.itl_p99_ms
    table = format_bench(result)
    assert "agg tok/s" in table and "gemma-3-270m" in table
    json.dumps(result.to_dict())  # --json output is plain JSON
    chart = plot_bench(result, tmp_path / "bench.png")
    header = chart.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 800 and height > 300


def test_bench_counts_errors_instead_of_crashing(live_server: Any) -> None:
    result = run_bench(
        live_server.url,
        concurrency=(1,),
        prompt_words=(4,),
        max_tokens=(4,),
        requests_per_point=2,
        time_limit_s=30,
        api_key="wrong-key",
        model="gemma-3-270m",
    )
    assert result.points[0].errors == 2
    assert "401" in result.points[0].error_samples[0]


def test_bench_refuses_non_loopback_targets() -> None:
    with pytest.raises(BenchError, match="not a loopback address"):
        check_target("http://192.0.2.10:8080", allow_remote=False)
    check_target("http://127.0.0.1:8080", allow_remote=False)
    check_target("http://localhost:8080", allow_remote=False)
    check_target("http://192.0.2.10:8080", allow_remote=True)  # said explicitly
