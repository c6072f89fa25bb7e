"""Projector files on disk: which `mmproj-*.gguf` goes with a model (llama.cpp's pairing), and
reading one's header (never its tensor data)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from localllm.errors import GGUFError
from localllm.gguf_header import FileSource, parse_source
from localllm.models import model_stem, quant_label
from localllm.vision.projector import PROJECTOR_MARK, Projector, projector_from_header


def read_projector(path: Path | str) -> Projector:
    """Read a projector file's header (local; never its tensor data)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(path, "no such file")
    source = FileSource(path)
    try:
        raw = parse_source(source)
    finally:
        source.close()
    return projector_from_header(path, raw.metadata, raw.tensors)


def is_projector_name(filename: str) -> bool:
    return PROJECTOR_MARK in Path(filename).name.lower()


_BITS = re.compile(r"\d+")


def _quant_bits(filename: str) -> int:
    """llama.cpp's extract_quant_bits: the first number of the quant tag (F16 -> 16)."""
    found = _BITS.search(quant_label(filename))
    return int(found.group()) if found else 0


def best_projector(files: Iterable[str], model: str) -> str | None:
    """The projector llama.cpp pairs with `model` among a repo's or folder's files.

    As `find_best_sibling` (common/download.cpp) does for `-hf`: GGUFs whose path contains
    "mmproj" in the model's folder or one above it; the deepest shared folder wins, then the
    quantization closest in bits to the model's (an F16 projector beside an F16 model, else the
    nearest), the first listed on a tie.
    """
    model_parts = model.split("/")
    model_dir = model_parts[:-1]
    model_bits = _quant_bits(model_parts[-1])
    best: tuple[int, int] | None = None
    chosen: str | None = None
    for path in files:
        if not path.endswith(".gguf") or PROJECTOR_MARK not in path:
            continue
        sib_dir = path.split("/")[:-1]
        if len(sib_dir) > len(model_dir) or model_dir[: len(sib_dir)] != sib_dir:
            continue
        score = (len(sib_dir), -abs(_quant_bits(path.split("/")[-1]) - model_bits))
        if best is None or score > best:
            best, chosen = score, path
    return chosen


def find_projector(model_path: Path) -> Path | None:
    """The projector beside a local model file (same folder, llama.cpp's naming), if any.

    In a folder of several models, projectors whose name holds the model's name (as `pull` names
    them) are its own; the others are considered only when none does."""
    folder = model_path.parent
    if not folder.is_dir():
        return None
    names = sorted(p.name for p in folder.glob("*.gguf") if is_projector_name(p.name))
    stem = model_stem(model_path.name)
    own = [name for name in names if stem in name.lower()]
    found = best_projector(own or names, model_path.name)
    return folder / found if found is not None else None


def local_projector_name(remote_name: str, model_filename: str) -> str:
    """The name a pulled projector gets in the (flat) models folder: the hub's when it holds the
    model's name, else `mmproj-<model>-<its quant>.gguf`, so that two repos' `mmproj-model-f16`
    files neither collide nor pair with the other's model."""
    name = Path(remote_name).name
    stem = model_stem(model_filename)
    if stem in name.lower():
        return name
    return f"{PROJECTOR_MARK}-{stem}-{quant_label(name)}.gguf"


def projector_path(model_path: Path, mmproj: str) -> Path | None:
    """The projector file a model loads with under the `mmproj` setting: "auto" finds the one
    beside it, "off" none (llama-server's --no-mmproj), anything else is a path (--mmproj FILE)."""
    if mmproj == "off":
        return None
    if mmproj == "auto":
        return find_projector(model_path)
    return Path(mmproj).expanduser()


def projector_for(model_path: Path, mmproj: str) -> Projector | None:
    """The projector record for `projector_path` (reads its header)."""
    found = projector_path(model_path, mmproj)
    return read_projector(found) if found is not None else None
