"""The default model as a new user meets it: `serve` with no model and the official openai client,
`localllm chat` on stdin, `localllm models`; and the router serving both embedded models by name
(two architectures, two tokenizers, a real ChatML template end to end)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from localllm.models import GEMMA3, SMOLLM2
from tests.conftest import served_process
from tests.test_cli import clean_env, run_cli

pytestmark = pytest.mark.model

# The README's first example: a one-line question at temperature 0.
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def default_server(
    instruct_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`serve` as `./scripts/dev serve` starts it: no model named, the models folder holding
    both embedded models; one decode thread per worker (two cores shared with the tests)."""
    settings = "threads=1, n_ctx=1024, parallel=1, n_batch=256, n_ubatch=256"
    config_dir = tmp_path_factory.mktemp("default-serve")
    with served_process(settings, instruct_model_path, config_dir) as (_, url):
        yield url


def ask(url: str, model: str, question: str = QUESTION, **extra: Any) -> Any:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=240)
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=extra.pop("max_tokens", 48),
        **extra,
    )


def test_serve_with_no_model_answers_a_question_through_the_openai_client(
    default_server: str,
) -> None:
    answer = ask(default_server, SMOLLM2.name)
    text = answer.choices[0].message.content
    assert "Paris" in text, text
    # The model ends its turn itself (ChatML's <|im_end|>), well before max_tokens.
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 48
    assert answer.model == SMOLLM2.name


def test_the_router_serves_both_embedded_models_by_name(default_server: str) -> None:
    listed = httpx.get(default_server + "/v1/models", timeout=60).json()["data"]
    cards = {card["id"]: card for card in listed}
    assert {SMOLLM2.name, GEMMA3.name} <= set(cards)
    # The default first, marked: clients that take the first model talk to it.
    assert listed[0]["id"] == SMOLLM2.name and listed[0]["localllm"]["default"] is True
    assert cards[GEMMA3.name]["localllm"]["default"] is False
    assert cards[GEMMA3.name]["localllm"]["architecture"] == "gemma3"
    assert cards[SMOLLM2.name]["localllm"]["architecture"] == "llama"
    assert cards[SMOLLM2.name]["status"]["value"] == "loaded"  # the default loads at start
    smol = ask(default_server, SMOLLM2.name, "Say hi", max_tokens=16)
    gemma = ask(default_server, GEMMA3.name, "Say hi", max_tokens=16)
    assert gemma.model == GEMMA3.name and gemma.choices[0].message.content
    # Same words, two tokenizers (49k and 262k entries), two chat prompts (ChatML and the
    # fallback): the prompts differ in length.
    assert smol.usage.prompt_tokens != gemma.usage.prompt_tokens
    states = {c["id"]: c["status"]["value"] for c in httpx.get(
        default_server + "/v1/models", timeout=60).json()["data"]}  # fmt: skip
    assert states[SMOLLM2.name] == states[GEMMA3.name] == "loaded"


def ask_chat(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`localllm chat ARGS` with no model named, the question on stdin, no config file."""
    (tmp_path / "none.toml").write_text("")
    return subprocess.run(
        [sys.executable, "-m", "localllm", "chat", *args, "--temperature", "0",
         "--max-tokens", "48"],
        input=QUESTION + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(LOCALLLM_CONFIG=str(tmp_path / "none.toml")),
    )  # fmt: skip


def test_chat_with_no_model_answers_on_stdin(instruct_model_path: Path, tmp_path: Path) -> None:
    folder = str(instruct_model_path.parent)
    result = ask_chat(tmp_path, "--models-dir", folder, "--threads", "1", "-c", "1024")
    assert result.returncode == 0, result.stderr
    assert f"{SMOLLM2.file}: Q4_1" in result.stderr
    assert "Paris" in result.stdout, result.stdout


def test_chat_url_with_no_model_talks_to_the_servers_default(
    default_server: str, tmp_path: Path
) -> None:
    result = ask_chat(tmp_path, "--url", default_server)
    assert result.returncode == 0, result.stderr
    assert f"{default_server}: model {SMOLLM2.name}" in result.stderr
    assert "Paris" in result.stdout, result.stdout


def test_models_lists_both_embedded_models_and_says_which_is_default_and_why(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    config = tmp_path / "none.toml"
    config.write_text("")
    env = {"LOCALLLM_CONFIG": str(config)}
    listed = run_cli("models", "--models-dir", str(folder), "--cpu", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {SMOLLM2.name, GEMMA3.name}
    assert rows[SMOLLM2.name]["default"] and not rows[GEMMA3.name]["default"]
    assert "chat template" in rows[SMOLLM2.name]["embedded"]
    assert "base model" in rows[GEMMA3.name]["embedded"]
    assert rows[SMOLLM2.name]["quant"] == "Q4_1" and rows[SMOLLM2.name]["size_bytes"] > 90e6
    assert list(folder.iterdir()) == []  # listed, not written

    table = run_cli("models", "--models-dir", str(folder), "--cpu", env=env)
    assert table.returncode == 0, table.stderr
    assert f"{SMOLLM2.name} (default)" in table.stdout
    assert f"default: {SMOLLM2.name} (the built-in default: an instruction-tuned" in table.stdout

    env["LOCALLLM_DEFAULT_MODEL"] = GEMMA3.name
    chosen = run_cli("models", "--models-dir", str(folder), "--cpu", env=env)
    assert f"{GEMMA3.name} (default)" in chosen.stdout
    assert f"default: {GEMMA3.name} (set by LOCALLLM_DEFAULT_MODEL)" in chosen.stdout
