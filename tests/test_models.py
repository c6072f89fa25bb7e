"""The models folder: names resolve only inside it; split sets; the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from localllm.errors import ModelNotFoundError
from localllm.gguf_header import split_set
from localllm.models import model_files, resolve_model


def test_names_cannot_escape_the_models_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF")
    for name in ("../secret.gguf", "../secret", "sub/../../secret.gguf", str(secret)):
        with pytest.raises(ModelNotFoundError):
            resolve_model(name, models, allow_outside=False)
    # an explicit path given on the command line is the user's own choice
    assert resolve_model(str(secret), models, allow_outside=True) == secret


def test_names_resolve_by_file_stem_case_insensitively(tmp_path: Path) -> None:
    (tmp_path / "Llama-3-8B.Q4_K_M.gguf").write_bytes(b"GGUF")
    assert resolve_model("llama-3-8b.q4_k_m", tmp_path, allow_outside=False).name == (
        "Llama-3-8B.Q4_K_M.gguf"
    )
    with pytest.raises(ModelNotFoundError, match="available: Llama-3-8B.Q4_K_M.gguf"):
        resolve_model("mistral", tmp_path, allow_outside=False)


def test_split_sets_are_one_model(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        (tmp_path / f"big-{i:05d}-of-00003.gguf").write_bytes(b"GGUF")
    (tmp_path / "small.gguf").write_bytes(b"GGUF")
    assert [p.name for p in model_files(tmp_path)] == ["big-00001-of-00003.gguf", "small.gguf"]
    assert len(split_set(tmp_path / "big-00002-of-00003.gguf")) == 3
    (tmp_path / "big-00003-of-00003.gguf").unlink()
    with pytest.raises(ModelNotFoundError, match="missing big-00003-of-00003.gguf"):
        split_set(tmp_path / "big-00001-of-00003.gguf")
