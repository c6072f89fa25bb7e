"""`localllm ps`: the models a running server holds, like `ollama ps`.

Reads `GET /v1/models` (each loaded model carries `localllm.loaded`: devices, memory, context
per conversation, keep-alive deadline) and prints one row per loaded model.
"""

from __future__ import annotations

import time
from typing import Any

from localllm.errors import LocalLLMError
from localllm.units import gib


def fetch_loaded(
    url: str, api_key: str | None = None, timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """The `loaded` records of a server's models (empty when none is loaded)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise LocalLLMError(f"cannot reach {url}: {exc}; is `localllm serve` running?") from exc
    if response.status_code == 401:
        raise LocalLLMError(f"{url} wants an API key: pass --api-key")
    if response.status_code != 200:
        raise LocalLLMError(f"{url}/v1/models answered {response.status_code}")
    rows = []
    for model in response.json().get("data", []):
        loaded = (model.get("localllm") or {}).get("loaded")
        if isinstance(loaded, dict):  # a folder server's loaded model (`ModelsServing`)
            rows.append({**loaded, "model": model.get("id")})
    return rows


def _until(row: dict[str, Any], now: float) -> str:
    if row.get("pinned"):
        return "pinned"
    if row.get("in_flight"):
        return "in use"
    expires = row.get("expires_at")
    if expires is None:
        return "forever" if row.get("keep_alive_s") is None else "after this answer"
    seconds = max(0.0, float(expires) - now)
    if seconds < 90:
        return f"in {seconds:.0f} s"
    if seconds < 5400:
        return f"in {seconds / 60:.0f} min"
    return f"in {seconds / 3600:.1f} h"


def format_ps(rows: list[dict[str, Any]], now: float | None = None) -> str:
    if not rows:
        return "no model is loaded"
    now = time.time() if now is None else now
    table = [("NAME", "DEVICES", "RSS", "CONTEXT", "UNTIL")]
    for row in rows:
        devices = ", ".join(
            f"{device} {gib(n_bytes, 2)}"
            for device, n_bytes in sorted(row.get("devices", {}).items())
        )
        rss = row.get("rss_bytes")
        context = f"{row.get('n_ctx_per_slot')} x{row.get('n_parallel')}"
        table.append(
            (
                str(row.get("model")),
                devices or "-",
                f"{gib(rss, 2)}" if rss else "-",
                context,
                _until(row, now),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
