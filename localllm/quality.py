"""`localllm eval`: how much a quantization costs on the user's own text.

For each model: the perplexity of the text, scored like llama.cpp's perplexity tool (windows of
n_ctx tokens, only the second half of each window scored, so every scored token has context).
When a higher-precision quantization of the same model is among those given, every other one is
also compared with it token by token: the mean KL divergence of its next-token distribution from
the reference's (the measure llama.cpp's `--kl-divergence` reports), and how often both pick the
same top token. Results go into `<model>.quality.json` beside the model, keyed by the text's hash,
where `localllm fit --max-quality-loss` finds them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from localllm.errors import LocalLLMError, ModelLoadError
from localllm.gguf_header import ModelHeader, read_header
from localllm.models import quality_sidecar_path

log = logging.getLogger(__name__)


def default_text() -> str:
    """The small text that ships with localllm (written for it: prose, a recipe, maths, code)."""
    return resources.files("localllm").joinpath("data/eval_text.txt").read_text()


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QualityResult:
    model: str
    file_type: str | None
    bits_per_weight: float
    text_key: str
    n_tokens_scored: int
    perplexity: float
    reference: str | None = None  # the higher-precision model compared against
    mean_kld: float | None = None  # nats; 0 for the reference itself
    kld_p99: float | None = None
    top1_agreement: float | None = None  # fraction of positions with the same top token
    ppl_ratio: float | None = None  # perplexity / the reference's

    @property
    def quality_loss(self) -> float | None:
        """What --max-quality-loss compares: the mean KL divergence from the reference, in nats."""
        return self.mean_kld


class _Scorer:
    """A model loaded for scoring: log-probabilities at every position of a window of tokens."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None) -> None:
        from localllm.engine.backend import LlamaBackend
        from localllm.engine.config import EngineConfig

        config = EngineConfig(
            model_path=path,
            n_ctx=n_ctx,
            n_parallel=1,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            queue_size=0,
        )
        self.backend = LlamaBackend(config)
        self.bos: int | None = self.backend.bos_id if self.backend.add_bos else None

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text, add_special=False, parse_special=False)

    def log_probs(self, window: Sequence[int]) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Log-softmax of the logits at every position of the window: (len(window), n_vocab)."""
        from localllm.engine.backend import BatchItem

        self.backend.seq_rm(0, 0, -1)
        items = [BatchItem(token, pos, 0, True) for pos, token in enumerate(window)]
        status = self.backend.decode(items)
        if status != 0:
            raise ModelLoadError(f"llama_decode failed with status {status} while scoring")
        return np.stack([self.backend.logprobs(i) for i in range(len(window))])

    def close(self) -> None:
        self.backend.close()


def _windows(tokens: list[int], n_ctx: int, bos: int | None) -> Iterator[list[int]]:
    step = n_ctx
    for start in range(0, max(1, len(tokens) - n_ctx // 2), step):
        window = tokens[start : start + n_ctx - (1 if bos is not None else 0)]
        if len(window) < n_ctx // 2 + 2:
            return
        yield ([bos] if bos is not None else []) + window


def evaluate(
    models: Sequence[Path],
    text: str | None = None,
    n_ctx: int = 256,
    threads: int | None = None,
    reference: Path | None = None,
    save: bool = True,
) -> list[QualityResult]:
    """Perplexity of each model on the text, and KL divergence against the reference model.

    The reference defaults to the given model with the most bits per weight when there are several
    quantizations of the same model (same architecture, layers and vocabulary).
    """
    text = text if text is not None else default_text()
    headers = {path: read_header(path) for path in models}
    if reference is None and len(models) > 1:
        reference = _pick_reference(headers)
    if reference is not None and reference not in headers:
        headers[reference] = read_header(reference)
    order = ([reference] if reference is not None else []) + [m for m in models if m != reference]

    key = text_key(text)
    ref_log_probs: list[np.ndarray[Any, np.dtype[np.float32]]] = []
    ref_ppl: float | None = None
    results = []
    tokens: list[int] | None = None
    for path in order:
        scorer = _Scorer(path, n_ctx, threads)
        try:
            if tokens is None:  # the same tokens for every quantization of a model
                tokens = scorer.tokenize(text)
                if len(tokens) < n_ctx:
                    raise LocalLLMError(
                        f"the text has {len(tokens)} tokens; give at least {n_ctx} "
                        "(a longer --text or a smaller --ctx)"
                    )
            nll: list[float] = []
            klds: list[float] = []
            agree = scored = 0
            for index, window in enumerate(_windows(tokens, n_ctx, scorer.bos)):
                log_probs = scorer.log_probs(window)
                first = len(window) // 2
                positions = np.arange(first, len(window) - 1)
                targets = np.asarray(window[first + 1 :])
                nll.extend((-log_probs[positions, targets]).tolist())
                scored += len(positions)
                if path == reference:
                    ref_log_probs.append(log_probs[positions])
                elif reference is not None:
                    ref = ref_log_probs[index]
                    ours = log_probs[positions]
                    klds.extend((np.exp(ref) * (ref - ours)).sum(axis=1).tolist())
                    agree += int((ref.argmax(axis=1) == ours.argmax(axis=1)).sum())
        finally:
            scorer.close()
        perplexity = float(np.exp(np.mean(nll)))
        header = headers[path]
        measured = QualityResult(
            model=str(path),
            file_type=header.file_type,
            bits_per_weight=header.bits_per_weight,
            text_key=key,
            n_tokens_scored=scored,
            perplexity=perplexity,
        )
        if path == reference:
            ref_ppl = perplexity
            result = replace(
                measured,
                reference=str(path),
                mean_kld=0.0,
                kld_p99=0.0,
                top1_agreement=1.0,
                ppl_ratio=1.0,
            )
        elif reference is not None:
            kld = np.asarray(klds)
            result = replace(
                measured,
                reference=str(reference),
                mean_kld=float(kld.mean()),
                kld_p99=float(np.percentile(kld, 99)),
                top1_agreement=agree / scored,
                ppl_ratio=perplexity / ref_ppl if ref_ppl else None,
            )
        else:
            result = measured
        results.append(result)
        if save:
            save_result(path, result)
    by_model = {r.model: r for r in results}
    return [by_model[str(path)] for path in models if str(path) in by_model] + [
        r for r in results if Path(r.model) not in models
    ]


def _pick_reference(headers: dict[Path, ModelHeader]) -> Path | None:
    shapes = {(h.architecture, h.n_layer, h.n_embd, h.n_vocab) for h in headers.values()}
    if len(shapes) != 1:
        return None  # different models: perplexity only
    return max(headers, key=lambda p: headers[p].bits_per_weight)


def save_result(model: Path, result: QualityResult) -> None:
    path = quality_sidecar_path(model)
    stored: dict[str, Any] = {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = {}
    stored[result.text_key] = asdict(result)
    path.write_text(json.dumps(stored, indent=2))


def format_quality(results: Sequence[QualityResult]) -> str:
    lines = [
        f"{'model':<40} {'type':<8} {'bpw':>5} {'tokens':>6} {'PPL':>9} {'PPL ratio':>9} "
        f"{'mean KLD':>9} {'KLD p99':>8} {'same top':>8}"
    ]
    for r in results:

        def opt(value: float | None, fmt: str) -> str:
            return format(value, fmt) if value is not None else "-"

        lines.append(
            f"{Path(r.model).name[:40]:<40} {r.file_type or '?':<8} {r.bits_per_weight:>5.2f} "
            f"{r.n_tokens_scored:>6} {r.perplexity:>9.3f} {opt(r.ppl_ratio, '.4f'):>9} "
            f"{opt(r.mean_kld, '.5f'):>9} {opt(r.kld_p99, '.4f'):>8} "
            f"{opt(r.top1_agreement and 100 * r.top1_agreement, '.1f'):>7}%"
        )
    reference = next((r.reference for r in results if r.reference), None)
    if reference:
        lines.append(f"reference: {Path(reference).name} (KL divergence in nats, lower is better)")
    return "\n".join(lines)


def quantize(source: Path, target: Path, file_type: str, threads: int | None = None) -> Path:
    """Write `source` requantized to `file_type` ('Q2_K', 'Q8_0', ...) with llama.cpp's quantizer.

    Requantizing an already-quantized file compounds the error; that is what a quality check of
    low-bit types wants to see, but for real use quantize from F16/BF16.
    """
    import ctypes

    import llama_cpp
    from gguf.constants import LlamaFileType

    from localllm.engine import logs

    try:
        ftype = LlamaFileType[f"MOSTLY_{file_type.upper()}"]
    except KeyError:
        raise LocalLLMError(f"unknown quantization type {file_type!r}") from None
    logs.install()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.allow_requantize = True
    params.nthread = threads or 0
    partial = target.with_name(target.name + ".partial")
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(partial).encode(), ctypes.byref(params)
    )
    if status != 0:
        partial.unlink(missing_ok=True)
        raise LocalLLMError(
            f"llama.cpp could not quantize {source} to {file_type} (status {status})"
        )
    partial.replace(target)
    return target
