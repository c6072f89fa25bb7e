"""`localllm chat` as a person uses it: typed into a terminal (a pseudo-terminal here), piped on
stdin, or pointed at a running server with --url. The embedded model answers for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import API_KEY, UvicornThread
from tests.terminal import Terminal
from tests.test_cli import clean_env, one_line_error

# One decode thread (see conftest's engine) and a small context: quick to load and to answer.
SMALL = ("--threads", "1", "-c", "1024")


def chat_args(embedded_model_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "localllm", "chat", str(embedded_model_path), *SMALL, *extra]


def test_chat_on_stdin(embedded_model_path: Path) -> None:
    result = subprocess.run(
        chat_args(embedded_model_path, "--max-tokens", "8", "--seed", "1"),
        input="Hello there\nWhat is the sea?\n/bye\nnever read\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    # The plan before the first answer, on stderr; two answers, one line each, on stdout.
    assert "gemma-3-270m-q4_k_m.gguf: Q4_K_M" in result.stderr
    assert "1024 tokens per conversation" in result.stderr
    assert "Traceback" not in result.stderr
    answers = [line for line in result.stdout.split("\n") if line.strip()]
    assert len(answers) >= 2 and result.stdout.strip()


@pytest.mark.timeout(900)  # a loaded machine: the model loads slowly and keys may be re-pressed
def test_chat_in_a_terminal_ctrl_c_stops_one_answer_ctrl_d_ends(
    embedded_model_path: Path,
) -> None:
    term = Terminal(
        chat_args(embedded_model_path, "--max-tokens", "400", "--seed", "3"), clean_env()
    )
    term.read_until("tokens per conversation")
    term.read_until(">>> ")
    # Ctrl-C at the prompt: a hint, not the end. Python loses a signal that arrives between
    # drawing the prompt and waiting for input (a human is never that fast): press it once chat
    # waits for the terminal. Where /proc cannot tell, press again until it is heard.
    for _ in range(10):
        known = term.wait_reading()
        term.type("\x03")
        if term.wait_for("Use /bye or Ctrl-D to leave.", 20.0 if known else 5.0):
            break
    else:
        raise AssertionError(f"Ctrl-C at the prompt went unanswered: {term.seen[-2000:]!r}")
    term.read_until(">>> ", since=term.seen.index("Use /bye"))
    # Ctrl-C once the answer has begun: the answer stops, the session goes on. Should the model
    # end its answer in the moment before the key arrives, the key lands on the next prompt (the
    # hint above) and the question is asked again.
    for _ in range(3):
        start = len(term.seen)
        term.type("Write a long story about a ship at sea.\r")
        term.read_until("sea.\r\n", 60, since=start)
        term.read_more(3, 120)
        term.type("\x03")
        term.read_until(">>> ", 120, since=term.seen.index("sea.\r\n", start))
        if "[stopped]" in term.seen[start:]:
            break
        term.wait_for("Use /bye", 3.0)  # the key met the next prompt (or readline lost it)
    else:
        raise AssertionError(f"three answers ended before Ctrl-C: {term.seen[-2000:]!r}")
    answer = term.seen[start:].split("sea.\r\n", 1)[1].split("[stopped]")[0]
    assert answer.strip() and "^C" in answer
    term.type("\x04")  # Ctrl-D on an empty line ends the chat
    assert term.exit_code(240) == 0
    assert "Traceback" not in term.seen and "KeyboardInterrupt" not in term.seen


def test_chat_with_a_running_server(live_server: UvicornThread) -> None:
    argv = [sys.executable, "-m", "localllm", "chat", "--url", live_server.url, "--max-tokens",
            "8"]
    result = subprocess.run(
        [*argv, "--api-key", API_KEY],
        input="Hello\n",  # then end of input: the session ends
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert f"{live_server.url}: model gemma-3-270m" in result.stderr
    assert result.stdout.strip()

    refused = subprocess.run(argv, input="Hello\n", capture_output=True, text=True, timeout=60,
                             env=clean_env())
    one_line_error(refused, 1, live_server.url, "401")


def test_chat_forgets_the_oldest_exchange_when_the_context_is_full(
    embedded_model_path: Path,
) -> None:
    long_message = " ".join(["The river runs past the old mill and under the stone bridge."] * 9)
    argv = [sys.executable, "-m", "localllm", "chat", str(embedded_model_path), "--threads", "1",
            "-c", "256", "--max-tokens", "8", "--seed", "1"]
    result = subprocess.run(argv, input=f"{long_message}\n{long_message}\n", capture_output=True,
                            text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "256 tokens per conversation" in result.stderr
    assert "the oldest exchange is forgotten" in result.stderr
    assert "error" not in result.stderr
