"""Vision models: the multimodal projector (`mmproj-*.gguf`) found beside a model, read and costed.

    find_projector(model_path) -> Path | None        llama.cpp's pairing, in the model's folder
    best_projector(files, model) -> str | None       the same over a hub repo's file list
    read_projector(path) -> Projector                the header: weights, compute, image tokens
    projector_for(model_path, mmproj) -> Projector   under the `mmproj` setting (auto/off/path)

Serving images (OpenAI image parts through llama.cpp's mtmd) is not here yet.
"""

from localllm.vision.files import (
    best_projector,
    find_projector,
    is_projector_name,
    local_projector_name,
    projector_for,
    projector_path,
    read_projector,
)
from localllm.vision.projector import (
    PROJECTOR_KINDS,
    Projector,
    ProjectorKind,
    is_projector_metadata,
    projector_from_header,
)

__all__ = [
    "PROJECTOR_KINDS",
    "Projector",
    "ProjectorKind",
    "best_projector",
    "find_projector",
    "is_projector_metadata",
    "is_projector_name",
    "local_projector_name",
    "projector_for",
    "projector_from_header",
    "projector_path",
    "read_projector",
]
