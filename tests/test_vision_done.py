"""Issue 24's whole path, as a user goes through it, in one test: a vision model and its projector
on a (local, emulated) hub are fitted with the projector counted, pulled with it, served, and answer
a chat request that carries an image. The other tests cover each step in depth; this one checks
that the steps fit together through the real CLI and a real server process."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from localllm.vision import read_projector
from tests import tiny_vision as tv
from tests.conftest import served_process
from tests.tiny_images import png
from tests.tiny_models import write_gemma3_swa

REPO = "org/tiny-vision-GGUF"


def _cli(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("LOCALLLM_")}
    (home / "none.toml").write_text("")
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], capture_output=True, text=True, timeout=240,
        cwd=home, env={**clean, "XDG_CACHE_HOME": str(home / "cache"),
                       "LOCALLLM_CONFIG": str(home / "none.toml"), **env},
    )


def test_pulled_fitted_served_and_answering_an_image(tmp_path: Path) -> None:
    from tests.fake_hub import FakeHub, running_hub

    upstream = tmp_path / "upstream"
    upstream.mkdir()
    write_gemma3_swa(upstream / "tiny-gemma3-F16.gguf")
    tv.write_gemma3_mmproj(upstream / "mmproj.gguf")
    projector = read_projector(upstream / "mmproj.gguf")
    fake = FakeHub()
    fake.add(REPO, upstream / "tiny-gemma3-F16.gguf")
    fake.add(REPO, upstream / "mmproj.gguf", name="mmproj-model-f16.gguf")
    models = tmp_path / "models"
    with running_hub(fake):
        env = {"HF_ENDPOINT": fake.url}
        # 1. fit before download: the projector is read by its header and counted
        fitted = _cli(tmp_path, env, "fit", REPO, "--vram", "8GiB", "--json")
        assert fitted.returncode == 0, fitted.stderr
        plan = json.loads(fitted.stdout)
        assert plan["projector"]["file"] == f"{REPO}/mmproj-model-f16.gguf"
        assert plan["projector"]["weights_bytes"] == projector.weights_bytes
        assert plan["devices"][0]["projector_bytes"] == projector.total_bytes(plan["flash_attn"])
        assert not list(tmp_path.rglob("*.gguf.partial"))
        # 2. pull: the model and its projector, named after the model
        pulled = _cli(tmp_path, env, "pull", REPO, "--models-dir", str(models), "--quiet")
        assert pulled.returncode == 0, pulled.stderr
    assert sorted(p.name for p in models.glob("*.gguf")) == [
        "mmproj-tiny-gemma3-F16.gguf", "tiny-gemma3-F16.gguf"
    ]
    # 3. serve the models folder (no hub now) and 4. ask about an image
    settings = "threads=1, n_ctx=1024, parallel=1, n_batch=256, n_ubatch=256"
    with served_process(settings, models / "tiny-gemma3-F16.gguf", tmp_path) as (_, url):
        listed = httpx.get(url + "/v1/models", timeout=60).json()["data"]
        [entry] = [m for m in listed if m["id"] == "tiny-gemma3-F16"]
        assert "vision" in entry["localllm"]["capabilities"]
        image = base64.b64encode(png(16, 16, seed=3)).decode()
        body = {
            "model": "tiny-gemma3-F16",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ]}],
            "max_tokens": 2,
            "temperature": 0,
            "logit_bias": {"2": -100},  # random weights: keep them from ending at once
        }
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=240)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == 2
    assert usage["prompt_tokens"] > projector.image_tokens  # the image's tokens are counted
