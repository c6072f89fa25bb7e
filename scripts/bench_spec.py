"""Speculative decoding speed (issue 25): tokens per second and acceptance, localllm against no
speculation and against llama-server with the same --spec-type, on a code-editing prompt set and
a chat prompt set, single stream and 4 streams. Prints one table.

    .venv/bin/python scripts/bench_spec.py [--model instruct|gemma|PATH] [--spec-type ngram-simple]
        [--tokens 128] [--threads 2] [--streams 1,4] [--sets code,chat] [--size-n 12]
        [--n-max 16] [--llama-server PATH] [--small]

Greedy (temperature 0), the model's chat template, 4 slots of 1024 tokens, no weight repacking
(llama-server: --no-repack -t THREADS -np 4). tok/s is the set's completion tokens over its wall
time (prefill included, the same definition for both servers); "x" is against the same server
without speculation; acceptance is accepted / drafted guesses from each server's own counters
(localllm: stats(); llama-server: /metrics llamacpp:spec_decode_*). Without --llama-server only
localllm runs. --small is a smoke run (2 prompts per set, 32 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localllm.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from localllm.models import embedded_model_path, instruct_model_path  # noqa: E402

CODE = [
    (
        "Rename the variable `total` to `subtotal` everywhere and show the whole function:\n"
        "```python\ndef total_price(items, tax_rate):\n    total = 0\n    for item in items:\n"
        "        total += item.price * item.quantity\n    if total > 100:\n"
        "        total = total * 0.95\n    return total * (1 + tax_rate)\n```"
    ),
    (
        "Add type hints to this function and show the whole code:\n```python\n"
        "def merge(left, right):\n    result = []\n    i = j = 0\n"
        "    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
        "            result.append(left[i])\n            i += 1\n        else:\n"
        "            result.append(right[j])\n            j += 1\n    result.extend(left[i:])\n"
        "    result.extend(right[j:])\n    return result\n```"
    ),
    (
        "Change the port from 8080 to 9090 in this config and show the whole file:\n```yaml\n"
        "server:\n  host: 0.0.0.0\n  port: 8080\n  workers: 4\nlogging:\n  level: info\n"
        "  file: /var/log/app.log\ndatabase:\n  url: postgres://db:5432/app\n  pool: 10\n```"
    ),
    (
        "Fix the bug (the loop skips the last element) and show the corrected code:\n```python\n"
        "def find_max(values):\n    best = values[0]\n    for i in range(1, len(values) - 1):\n"
        "        if values[i] > best:\n            best = values[i]\n    return best\n```"
    ),
    (
        "Convert this JavaScript to use const and let instead of var, and show all of it:\n"
        "```javascript\nvar count = 0;\nvar names = ['ann', 'bob', 'cid'];\n"
        "for (var i = 0; i < names.length; i++) {\n  var name = names[i];\n"
        "  if (name.length > 2) {\n    count = count + 1;\n  }\n}\nconsole.log(count);\n```"
    ),
]
CHAT = [
    "What are three good habits for staying healthy?",
    "Explain in a few sentences why the sky is blue.",
    "Give me a short recipe for pancakes.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short friendly email inviting a colleague to lunch on Friday.",
]
SETS = {"code": CODE, "chat": CHAT}


@dataclass
class Row:
    server: str
    spec: str
    prompt_set: str
    streams: int
    tokens: int
    seconds: float
    drafted: int
    accepted: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> str:
        return f"{self.accepted / self.drafted:.2f}" if self.drafted else "-"


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def run_parallel(jobs: list[Any], streams: int, one: Any) -> int:
    """Run one(job) for every job, `streams` at a time; the tokens they return, summed."""
    total = 0
    lock = threading.Lock()
    pending = list(jobs)

    def worker() -> None:
        nonlocal total
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            n = one(job)
            with lock:
                total += n

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total


# ---------------------------------------------------------------------------- localllm


def bench_localllm(args: argparse.Namespace, spec: str, model: Path) -> list[Row]:
    config = EngineConfig(
        model_path=model,
        n_ctx=4096,
        n_parallel=4,
        n_threads=args.threads,
        use_extra_bufts=False,
        spec_type=spec,
        spec_draft_n_max=args.n_max,
        spec_ngram_simple_size_n=args.size_n,
        spec_draft_model=Path(args.draft_model) if args.draft_model else None,
    )
    rows = []
    with Engine.load(config) as engine:
        for name in args.sets:
            prompts = [engine.chat_prompt(messages(p)) for p in SETS[name][: args.n_prompts]]
            greedy(engine, prompts[0], 4)  # warm up
            for streams in args.streams:
                before = engine.stats()
                started = time.perf_counter()
                tokens = run_parallel(
                    prompts, streams, lambda p: greedy(engine, p, args.tokens)
                )
                seconds = time.perf_counter() - started
                after = engine.stats()
                rows.append(
                    Row(
                        "localllm",
                        spec,
                        name,
                        streams,
                        tokens,
                        seconds,
                        after.spec_draft_tokens_total - before.spec_draft_tokens_total,
                        after.spec_accepted_tokens_total - before.spec_accepted_tokens_total,
                    )
                )
    return rows


def greedy(engine: Engine, prompt: tuple[int, ...], n: int) -> int:
    request = GenerationRequest(
        prompt=prompt, max_tokens=n, sampling=SamplingParams(temperature=0), add_special=False
    )
    return int(engine.submit(request).result().usage.completion_tokens)


# ---------------------------------------------------------------------------- llama-server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 600) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def server_counters(base: str) -> tuple[int, int]:
    text = http(base + "/metrics").decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:spec_decode_num_"):
            name, value = line.split()[:2]
            values[name] = int(float(value))
    return (
        values.get("llamacpp:spec_decode_num_draft_tokens_total", 0),
        values.get("llamacpp:spec_decode_num_accepted_tokens_total", 0),
    )


def bench_llama_server(args: argparse.Namespace, spec: str, model: Path) -> list[Row]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        args.llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--no-repack", "-t", str(args.threads), "-np", "4", "-c", "4096", "--metrics",
        "--no-webui",
    ]
    if spec != "none":
        command += ["--spec-type", spec, "--spec-draft-n-max", str(args.n_max)]
        if spec == "ngram-simple":
            command += ["--spec-ngram-simple-size-n", str(args.size_n)]
        if args.draft_model:
            command += ["--spec-draft-model", args.draft_model]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if json.loads(http(base + "/health", timeout=5)).get("status") == "ok":
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start: {' '.join(command)}")
            time.sleep(0.5)

        def one(prompt: str) -> int:
            body = {
                "messages": messages(prompt),
                "max_tokens": args.tokens,
                "temperature": 0,
                "cache_prompt": True,
            }
            answer = json.loads(http(base + "/v1/chat/completions", body))
            return int(answer["usage"]["completion_tokens"])

        for name in args.sets:
            prompts = SETS[name][: args.n_prompts]
            one(prompts[0])
            for streams in args.streams:
                drafted0, accepted0 = server_counters(base)
                started = time.perf_counter()
                tokens = run_parallel(prompts, streams, one)
                seconds = time.perf_counter() - started
                drafted1, accepted1 = server_counters(base)
                rows.append(
                    Row("llama-server", spec, name, streams, tokens, seconds,
                        drafted1 - drafted0, accepted1 - accepted0)
                )
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return rows


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="instruct", help="instruct, gemma, or a GGUF path")
    parser.add_argument("--spec-type", default="ngram-simple")
    parser.add_argument("--draft-model", help="for --spec-type draft-simple")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--sets", default="code,chat")
    parser.add_argument("--size-n", type=int, default=12, help="--spec-ngram-simple-size-n")
    parser.add_argument("--n-max", type=int, default=16, help="--spec-draft-n-max")
    parser.add_argument("--prompts", type=int, default=5, dest="n_prompts")
    parser.add_argument("--llama-server", help="a llama-server binary to compare with")
    parser.add_argument("--small", action="store_true", help="smoke run: 2 prompts, 32 tokens")
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    args.sets = [s for s in args.sets.split(",") if s]
    if args.small:
        args.n_prompts, args.tokens = 2, 32
    models = REPO / "models"
    if args.model == "instruct":
        model = instruct_model_path(models)
    elif args.model == "gemma":
        model = embedded_model_path(models)
    else:
        model = Path(args.model)

    rows: list[Row] = []
    for spec in ("none", args.spec_type):
        rows += bench_localllm(args, spec, model)
    if args.llama_server:
        if not shutil.which(args.llama_server) and not os.access(args.llama_server, os.X_OK):
            raise SystemExit(f"{args.llama_server} is not an executable")
        for spec in ("none", args.spec_type):
            rows += bench_llama_server(args, spec, model)

    base = {(r.server, r.prompt_set, r.streams): r.tok_s for r in rows if r.spec == "none"}
    load = os.getloadavg()[0]
    print(
        f"\n{model.name}, {args.threads} threads, {args.tokens} tokens a request, "
        f"{args.n_prompts} prompts a set, greedy; load average {load:.1f}"
    )
    header = ["server", "spec", "set", "streams", "tokens", "tok/s", "x", "accept", "drafted"]
    table = [header] + [
        [
            r.server,
            r.spec,
            r.prompt_set,
            str(r.streams),
            str(r.tokens),
            f"{r.tok_s:.1f}",
            f"{r.tok_s / base[(r.server, r.prompt_set, r.streams)]:.2f}"
            if base.get((r.server, r.prompt_set, r.streams))
            else "-",
            r.acceptance,
            str(r.drafted),
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))


if __name__ == "__main__":
    main()
