"""How long a streaming user waits while another user's image is encoded and decoded (issue 24),
in-process, 2 slots. One user streams; once it has produced tokens, another sends a chat with an
image (a new one each run, so it is encoded). Prints the streaming user's median gap between two
tokens, its worst gap while the image request ran, the image request's time to first token, and
the image's encode time alone (what every other stream would wait per image if the encode ran on
the scheduler thread; the engine runs it on a worker), each the median of --reps runs.

By default the text model is the embedded Gemma 3 270M and the projector synthetic (random
weights, written to a temporary folder): a Gemma 3-style SigLIP of --image-size px, --vision-layers
layers of --vision-width projecting into the model's width (the defaults give an encoder heavy
enough to see on a CPU; Gemma 3's real one is 896 px, 27 layers of 1152). --model and --mmproj
take real files instead.

    .venv/bin/python scripts/bench_vision.py [--reps 3] [--threads 1] [--model M --mmproj P]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localllm.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    TextEvent,
)
from localllm.gguf_header import read_header  # noqa: E402
from localllm.models import embedded_model_path  # noqa: E402
from localllm.vision.images import MEDIA_MARKER  # noqa: E402
from tests import tiny_vision as tv  # noqa: E402
from tests.tiny_images import png  # noqa: E402


@dataclass
class Run:
    median_gap_s: float  # the streaming user's, over the whole stream
    worst_gap_s: float  # the streaming user's, while the image request ran
    image_ttft_s: float
    encode_s: float  # the image's encode alone (no stream beside it)
    covered: bool  # the stream was still running when the image request finished


def chat_text(engine: Engine, text: str) -> str:
    """The rendered chat with its image markers, which `submit` tokenizes with the images."""
    rendered, _ = engine.chat_render([{"role": "user", "content": text}])
    assert isinstance(rendered, str), "the model has no projector"
    return rendered


def encode_alone(engine: Engine, image: bytes) -> float:
    media = engine.media
    assert media is not None
    prompt = media.prompt(chat_text(engine, f"{MEDIA_MARKER} What is it?"), [image], False, True)
    try:
        span = prompt.spans[0]
        started = time.perf_counter()
        done = threading.Event()
        media.encode_later(span, lambda _: done.set())
        done.wait()
        return time.perf_counter() - started
    finally:
        prompt.free()


def one_run(engine: Engine, rep: int, image_side: int, stream_tokens: int) -> Run:
    bias = ((engine.backend.eos_id, -100.0),) if engine.backend.eos_id >= 0 else ()
    sampling = SamplingParams(temperature=0, logit_bias=bias)
    stamps: list[float] = []
    stream = engine.submit(
        GenerationRequest(
            prompt=engine.chat_prompt([{"role": "user", "content": f"Run {rep}: a long story."}]),
            add_special=False,
            max_tokens=stream_tokens,
            sampling=sampling,
        )
    )

    def read() -> None:
        for event in stream:
            if isinstance(event, TextEvent):
                stamps.append(time.perf_counter())

    reader = threading.Thread(target=read)
    reader.start()
    while len(stamps) < 20 and reader.is_alive():
        time.sleep(0.005)
    image = png(image_side, image_side, seed=1000 + rep)  # new bytes: encoded, not reused
    submitted = time.perf_counter()
    handle = engine.submit(
        GenerationRequest(
            prompt=chat_text(engine, f"{MEDIA_MARKER} Run {rep}: what is it?"),
            images=(image,),
            add_special=False,
            max_tokens=1,
            sampling=sampling,
        )
    )
    handle.result()
    finished = time.perf_counter()
    reader.join()
    gaps = [(b - a, a, b) for a, b in zip(stamps, stamps[1:], strict=False)]
    during = [g for g, a, b in gaps if b > submitted and a < finished]
    return Run(
        median_gap_s=statistics.median(g for g, _, _ in gaps),
        worst_gap_s=max(during) if during else 0.0,
        image_ttft_s=finished - submitted,
        encode_s=encode_alone(engine, png(image_side, image_side, seed=5000 + rep)),
        covered=stamps[-1] > finished,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument("--vision-width", type=int, default=384)
    parser.add_argument("--stream-tokens", type=int, default=300)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or embedded_model_path(REPO / "models")
        mmproj = args.mmproj
        if mmproj is None:
            mmproj = Path(tmp) / "mmproj-synthetic-f16.gguf"
            spec = tv.VisionSpec(
                image_size=args.image_size, n_embd=args.vision_width, n_ff=4 * args.vision_width,
                n_layer=args.vision_layers, n_head=max(1, args.vision_width // 64),
                projection_dim=read_header(model).n_embd,
            )
            tv.write_gemma3_mmproj(mmproj, spec)
        config = EngineConfig(
            model_path=model, n_ctx=4096, n_parallel=2, n_threads=args.threads,
            n_batch=512, n_ubatch=512, mmproj_path=mmproj,
        )
        with Engine.load(config) as engine:
            runs = [one_run(engine, rep, 64, args.stream_tokens) for rep in range(args.reps)]
            load = os.getloadavg()[0]

    def median(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:9.1f}"

    print(f"\nbench_vision: {model.name} + {mmproj.name}, 2 slots, --threads {args.threads}, "
          f"median of {args.reps} runs, load average {load:.1f}")
    print("| stream median gap ms | stream worst gap during image ms | image TTFT ms "
          "| image encode alone ms | stream outlived image |")
    print("|---:|---:|---:|---:|---|")
    print(f"| {median([r.median_gap_s for r in runs])} "
          f"| {median([r.worst_gap_s for r in runs])} "
          f"| {median([r.image_ttft_s for r in runs])} "
          f"| {median([r.encode_s for r in runs])} "
          f"| {sum(r.covered for r in runs)}/{len(runs)} |")


if __name__ == "__main__":
    main()
