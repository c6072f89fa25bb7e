"""`localllm chat [MODEL]`: a conversation in the terminal, as `ollama run` has one.

The model runs in this process (planned by the fitter exactly as `serve` would plan it, the plan
and any slow-offload warning shown before the first prompt), or `--url` talks to a running
OpenAI-compatible server. `/bye` or Ctrl-D ends the session; Ctrl-C stops the answer being
written and keeps the session. The answer streams to stdout; everything else goes to stderr, so
`echo hi | localllm chat > answer.txt` keeps only the answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from localllm.cli.flags import settings_from_args
from localllm.errors import LocalLLMError, ServerError

Message = dict[str, str]
# Streams an answer to a conversation; yields text as it comes.
Answerer = Callable[[list[Message]], Iterator[str]]

BYE = ("/bye", "/exit", "/quit")


def cmd_chat(args: argparse.Namespace) -> int:
    if args.url:
        answer, close = _remote(args)
    else:
        answer, close = _in_process(args)
    try:
        _converse(answer, args.system)
    finally:
        close()
    return 0


def _say(message: str) -> None:
    print(f"localllm: {message}", file=sys.stderr, flush=True)


def _converse(answer: Answerer, system: str | None) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        _say("/bye or Ctrl-D ends the chat; Ctrl-C stops an answer")
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return
        except KeyboardInterrupt:
            print("\nUse /bye or Ctrl-D to leave.", file=sys.stderr)
            continue
        text = line.strip()
        if text.lower() in BYE:
            return
        if text:
            try:
                _turn(answer, history, text, interactive)
            except KeyboardInterrupt:  # a Ctrl-C just as the answer ended: the session goes on
                sys.stdout.write("\n")


def _turn(answer: Answerer, history: list[Message], text: str, interactive: bool) -> None:
    """One question and its streamed answer; Ctrl-C stops the answer, keeping what was said."""
    history.append({"role": "user", "content": text})
    parts: list[str] = []
    failed = False
    try:
        for piece in answer(history):
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    except LocalLLMError as exc:
        failed = True
        print(f"localllm: error: {exc}", file=sys.stderr)
    finally:  # user and assistant alternate, whatever happened (templates insist)
        if failed:
            history.pop()  # the turn never happened; the session goes on
        else:
            history.append({"role": "assistant", "content": "".join(parts).strip()})
    if not failed:
        sys.stdout.write("\n\n" if interactive else "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# The engine in this process


def _in_process(args: argparse.Namespace) -> tuple[Answerer, Callable[[], None]]:
    from localllm.engine import Engine, GenerationRequest, SamplingParams, TextEvent
    from localllm.errors import ContextLengthExceededError
    from localllm.hub import looks_like_repo
    from localllm.loading import plan_engine_config
    from localllm.pull import ensure_local, pull

    settings, given = settings_from_args(args)
    if "parallel" not in given:  # one person at the keyboard: one slot with the whole context
        settings = settings.model_copy(update={"parallel": 1})
    name = args.model or settings.model
    if name and looks_like_repo(name):  # pulled first (a no-op when it is here), with progress
        path = pull(name, settings, progress=sys.stderr.isatty())
    else:
        path = ensure_local(name, settings)
    if not args.verbose:  # the plan is said once below; llama.cpp's load notes only with -v
        logging.getLogger("localllm.loading").setLevel(logging.WARNING)
        logging.getLogger("localllm.llama").setLevel(logging.ERROR)
    config, summary, warnings = plan_engine_config(path, settings)
    _say(f"{path.name}: {summary['plan']}; {config.n_ctx_slot} tokens per conversation")
    for warning in warnings:
        print(f"localllm: warning: {warning}", file=sys.stderr)
    engine = Engine.load(config)
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)

    def answer(history: list[Message]) -> Iterator[str]:
        # Drop the oldest exchanges until the conversation and an answer fit one slot.
        while True:
            prompt = engine.chat_prompt(history)  # as the server builds it: tokens
            room = engine.n_ctx_slot - len(prompt)
            first = 1 if history[0]["role"] == "system" else 0
            if room >= min(args.max_tokens, engine.n_ctx_slot // 2) or len(history) - first <= 1:
                break
            del history[first : first + 2]
            _say(f"the chat outgrew the {engine.n_ctx_slot}-token context: the oldest exchange "
                 "is forgotten (--ctx-size sets it)")
        if room < 1:
            raise ContextLengthExceededError(
                f"this message does not fit the {engine.n_ctx_slot}-token context; shorten it "
                "or chat with a larger --ctx-size"
            )
        handle = engine.submit(
            GenerationRequest(
                prompt=prompt,
                max_tokens=min(args.max_tokens, room),
                sampling=sampling,
                add_special=False,  # the template wrote BOS where the model wants it
            )
        )
        try:
            for event in handle:
                if isinstance(event, TextEvent):
                    yield event.text
        finally:
            handle.cancel()  # Ctrl-C or an error: free the slot now (a no-op once finished)

    return answer, engine.close


# ---------------------------------------------------------------------------------------------
# A running server


def _remote(args: argparse.Namespace) -> tuple[Answerer, Callable[[], None]]:
    import httpx

    base = args.url.rstrip("/").removesuffix("/v1")
    key = args.chat_api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(10.0, read=600.0))
    model = args.model or _first_model(client, base)
    _say(f"{base}: model {model}")

    def answer(history: list[Message]) -> Iterator[str]:
        body: dict[str, Any] = {
            "model": model,
            "messages": history,
            "stream": True,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
        }
        if args.seed is not None:
            body["seed"] = args.seed
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise ServerError(f"{base} answered {response.status_code}: "
                                      f"{_error_text(response.text)}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServerError(f"{base}: {_error_text(data)}")
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot talk to {base} (--url): {exc}") from None

    return answer, client.close


def _first_model(client: Any, base: str) -> str:
    import httpx

    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach {base} (--url): {exc}") from None
    if response.status_code != 200:
        raise ServerError(f"{base}/v1/models answered {response.status_code}: "
                          f"{_error_text(response.text)}")
    models = response.json().get("data") or []
    if not models:
        raise ServerError(f"{base} serves no model; name one: localllm chat MODEL --url {base}")
    return str(models[0]["id"])


def _error_text(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200]
