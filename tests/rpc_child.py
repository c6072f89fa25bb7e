"""Run the engine in a child process for the RPC tests: `python tests/rpc_child.py JSON`.

A child, because the RPC-enabled llama.cpp is chosen when llama_cpp is first imported
(LLAMA_CPP_LIB_PATH) and the test process already holds the stock build; and because llama.cpp
ends a process whose RPC host goes away, which must not be the test runner.

JSON: {"model": path, "rpc": "host:port,...", "n_gpu_layers": int, "tensor_split": [..],
       "max_tokens": int, "mode": "generate" | "stream"}
generate: prints one JSON line {"text", "memory_lines", "decode_tokens_per_s"}.
stream:   prints "token" per streamed piece, then "error <class>: <message>" if the stream fails,
          and waits (the engine ends the process).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from localllm.engine import Engine, EngineConfig, FinishEvent, GenerationRequest, SamplingParams
from localllm.rpc import parse_rpc_servers

PROMPT = "The three primary colours are"


def main() -> None:
    spec = json.loads(sys.argv[1])
    config = EngineConfig(
        model_path=Path(spec["model"]),
        n_ctx=512,
        n_parallel=1,
        n_threads=1,
        n_batch=512,
        n_ubatch=512,
        use_extra_bufts=False,  # the same (unrepacked) CPU kernels on every host
        n_gpu_layers=spec.get("n_gpu_layers", 0),
        tensor_split=tuple(spec["tensor_split"]) if spec.get("tensor_split") else None,
        rpc_servers=parse_rpc_servers(spec.get("rpc") or None),
    )
    max_tokens = spec.get("max_tokens", 32)
    with Engine.load(config) as engine:
        request = GenerationRequest(
            prompt=PROMPT, max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0)
        )
        if spec.get("mode", "generate") == "generate":
            completion = engine.submit(request).result()
            memory = [line.strip() for line in engine.load_log if "size" in line]
            print(
                json.dumps(
                    {
                        "text": completion.text,
                        "memory_lines": memory,
                        "decode_tokens_per_s": completion.decode_tokens_per_s,
                        "n_generated": completion.usage.completion_tokens,
                    }
                ),
                flush=True,
            )
            return
        try:
            for event in engine.submit(request):
                if not isinstance(event, FinishEvent):
                    print("token", flush=True)
            print("finished", flush=True)
        except Exception as exc:
            print(f"error {type(exc).__name__}: {exc}", flush=True)
            time.sleep(60)  # the engine ends the process; the test measures how fast


if __name__ == "__main__":
    main()
