"""Embeddings through the engine: equal to llama-cpp-python's `Llama.embed`, batched, validated,
for the embedded chat model (mean pooling) and a real BERT-architecture GGUF (its own pooling)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localllm.engine import Engine, EngineConfig
from localllm.engine.build import repack_supported
from localllm.engine.embed import l2_normalize
from localllm.errors import (
    ContextLengthExceededError,
    EmbeddingsNotSupportedError,
    GenerationNotSupportedError,
    RequestError,
)
from tests.gguf_factory import write_bert

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "Embeddings put similar sentences close together, and different ones apart.",
]


def reference_llama(monkeypatch: pytest.MonkeyPatch, path: Path, pooling: int) -> Any:
    """llama-cpp-python's Llama on the same file, with the engine's weight-repacking choice
    (repacked CPU kernels round differently, and crash on some AMX VMs)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default_params = low.llama_model_default_params

    def params() -> Any:
        p = default_params()
        p.use_extra_bufts = repack_supported().supported
        return p

    monkeypatch.setattr(low, "llama_model_default_params", params)
    return llama_cpp.Llama(
        str(path), embedding=True, pooling_type=pooling, n_ctx=512, n_batch=512, n_threads=1,
        verbose=False,
    )


def test_l2_normalize_is_llama_cpp_s_euclidean_norm() -> None:
    v = l2_normalize(np.array([3.0, 4.0], dtype=np.float32))
    assert v.tolist() == pytest.approx([0.6, 0.8])
    assert l2_normalize(np.zeros(3, dtype=np.float32)).tolist() == [0.0, 0.0, 0.0]


def test_embedded_model_embeddings_equal_llama_embed(
    engine: Any, embedded_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = engine.embed(TEXTS)
    llm = reference_llama(monkeypatch, embedded_model_path, pooling=1)  # mean
    try:
        theirs = llm.embed(TEXTS, normalize=True)
    finally:
        llm.close()
    assert len(ours.vectors) == 3 and all(len(v) == 640 for v in ours.vectors)
    np.testing.assert_allclose(np.array(ours.vectors), np.array(theirs), atol=2e-5)
    assert ours.prompt_tokens == sum(len(engine.tokenize(t)) for t in TEXTS)


def test_batched_vectors_equal_vectors_computed_alone_and_are_unit_length(engine: Any) -> None:
    batched = np.array(engine.embed(TEXTS).vectors)
    alone = np.array([engine.embed([t]).vectors[0] for t in TEXTS])
    # ggml picks its matmul kernels by batch size, so the last bits differ (about 1e-3 per
    # component measured); the direction is the same.
    cosine = np.sum(batched * alone, axis=1)
    assert cosine.min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    similarity = batched @ batched.T
    assert similarity[0, 1] < 0.99  # different sentences, different vectors


def test_token_ids_embed_like_the_text_they_spell(engine: Any) -> None:
    tokens = engine.tokenize(TEXTS[1])
    by_text, by_tokens = engine.embed([TEXTS[1], tokens]).vectors
    np.testing.assert_allclose(by_text, by_tokens, atol=1e-6)


def test_bad_embedding_inputs_are_request_errors(engine: Any) -> None:
    with pytest.raises(RequestError, match="empty"):
        engine.embed([])
    with pytest.raises(RequestError, match="not in the vocabulary"):
        engine.embed([[1, 10**9]])
    too_long = engine.backend.embedder().max_tokens + 1
    with pytest.raises(ContextLengthExceededError, match="split the text"):
        engine.embed([[2] * too_long])


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert(tmp_path_factory.mktemp("bert") / "tiny-bert-f32.gguf")


@pytest.fixture(scope="module")
def bert_engine(bert_path: Path) -> Iterator[Engine]:
    config = EngineConfig(
        model_path=bert_path, n_ctx=256, n_parallel=1, n_threads=1, n_batch=128, n_ubatch=128
    )
    with Engine.load(config) as loaded:
        yield loaded


def test_bert_model_embeds_with_its_declared_pooling_like_llama_embed(
    bert_engine: Engine, bert_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bert_engine.backend.embedding_only
    ours = np.array(bert_engine.embed(TEXTS).vectors)
    llm = reference_llama(monkeypatch, bert_path, pooling=-1)  # unspecified: the GGUF's (mean)
    try:
        theirs = np.array(llm.embed(TEXTS, normalize=True))
    finally:
        llm.close()
    assert ours.shape == (3, 64)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    alone = np.array([bert_engine.embed([t]).vectors[0] for t in TEXTS])
    np.testing.assert_allclose(ours, alone, atol=1e-5)


def test_chat_on_an_embedding_model_is_refused(bert_engine: Engine) -> None:
    with pytest.raises(GenerationNotSupportedError, match="embedding model"):
        bert_engine.generate("hello", max_tokens=2)


def test_a_reranker_has_no_embeddings(tmp_path: Path) -> None:
    path = write_bert(tmp_path / "tiny-reranker.gguf", pooling_type=4)
    config = EngineConfig(model_path=path, n_ctx=256, n_parallel=1, n_threads=1, n_batch=128)
    with Engine.load(config) as reranker, pytest.raises(EmbeddingsNotSupportedError):
        reranker.embed(["a query"])
