"""Multimodal projectors (`mmproj-*.gguf`): what one holds and what it costs.

A projector is llama.cpp's second file for a vision model: a CLIP/SigLIP-style image encoder and
the projection of its output into the text model's embeddings (`tools/mtmd/clip.cpp`). This module
is pure (the fitter uses it): a parsed header becomes a `Projector` record (`files` reads one), and
the figures the fitter needs follow from it:

- `weights_bytes`: every tensor's bytes (clip.cpp's "model size" line);
- `compute_bytes(flash_attn)`: the encoder's compute buffer for one image of the largest size
  (clip.cpp's "compute buffer size" line: at warm-up for the fixed-size families; for the
  dynamic-resolution ones llama.cpp reserves a smaller warm-up image at load and grows the buffer
  when a larger image comes, so the plan counts the largest; `warmup_compute_bytes` is the line
  printed at load);
- `image_tokens`: the context tokens one image takes (clip.cpp's `clip_n_output_tokens`).

For Gemma 3 and the Qwen2-VL / Qwen2.5-VL / Qwen3-VL families the compute buffer comes from
replaying ggml's graph allocator over the encoder's graph as llama.cpp builds it (`encoders`),
which gives llama.cpp's figure to the byte; other types get a ViT estimate (`_vit_compute_bytes`),
marked not measured.

What differs between projector types lives in `PROJECTOR_KINDS`, one row per type.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from localllm.errors import GGUFError
from localllm.gguf_header import TensorInfo
from localllm.vision.encoders import (
    EncoderShape,
    gemma3_buffer_bytes,
    gemma4_buffer_bytes,
    idefics3_buffer_bytes,
    internvl_buffer_bytes,
    pixtral_buffer_bytes,
    qwen2vl_buffer_bytes,
    qwen3vl_buffer_bytes,
)

# A GGUF is a projector when its name says so (llama.cpp's own test: the file name contains
# "mmproj") or its header does (`general.type = "mmproj"`, `clip.*` keys, written by
# convert_hf_to_gguf.py --mmproj).
PROJECTOR_MARK = "mmproj"
F32_BYTES = 4


@dataclass(frozen=True)
class ProjectorKind:
    """How one `clip.projector_type` turns an image into tokens (clip.cpp, `load_hparams`)."""

    # "pooled": a fixed square image of `image_size`, (image_size / patch / n_merge)^2 tokens
    # (InternVL, Idefics3: per tile, an image being up to `Projector.tiles` of them).
    # "dynamic": any size up to `max_tokens` merged tokens; the encoder sees n_merge^2 patches
    # per token.
    tokens: Literal["pooled", "dynamic"]
    n_merge: int  # the default when the header has no `merge_key`
    merge_key: str
    max_tokens: int = 0  # dynamic only: llama.cpp's set_limit_image_tokens maximum
    warmup_tokens: int = 0  # dynamic only: set_warmup_n_tokens, the image reserved at load
    # "vit": the formula in `compute_bytes` (an estimate); the others: llama.cpp's graph replayed
    graph: Literal[
        "vit", "gemma3", "gemma4", "idefics3", "internvl", "qwen2vl", "qwen3vl", "pixtral"
    ] = "vit"
    measured: bool = False  # the compute figure checked against llama.cpp for this type


_SCALE = "clip.vision.projector.scale_factor"
_SPATIAL = "clip.vision.spatial_merge_size"
PROJECTOR_KINDS: Mapping[str, ProjectorKind] = {
    # Gemma 3: SigLIP at 896 px, 14 px patches, 4x4 average pooling -> 256 tokens
    "gemma3": ProjectorKind("pooled", 4, _SCALE, graph="gemma3", measured=True),
    # Qwen2-VL / 2.5-VL / 3-VL: any size, 2x2 patch merge, 8 to 4096 tokens per image, a
    # 46 x 46-token warm-up image at load
    "qwen2vl_merger": ProjectorKind("dynamic", 2, _SPATIAL, 4096, 46 * 46, "qwen2vl", True),
    "qwen2.5vl_merger": ProjectorKind("dynamic", 2, _SPATIAL, 4096, 46 * 46, "qwen2vl", True),
    "qwen3vl_merger": ProjectorKind("dynamic", 2, _SPATIAL, 4096, 46 * 46, "qwen3vl", True),
    # Idefics3 / SmolVLM: tiles of image_size, pixel unshuffle by scale_factor; an image is
    # resized to preproc_image_size on its longer side, cut into tiles, plus an overview
    "idefics3": ProjectorKind("pooled", 1, _SCALE, graph="idefics3", measured=True),
    # InternVL: 448 px tiles, pixel shuffle by scale_factor; an image is up to preproc_max_tiles
    # tiles and an overview, each its own chunk for mtmd
    "internvl": ProjectorKind("pooled", 1, _SCALE, graph="internvl", measured=True),
    # Gemma 4: 3x3 average pooling, 70 to 1120 tokens per image, a 16 x 16-token warm-up
    "gemma4v": ProjectorKind("dynamic", 3, _SCALE, 1120, 16 * 16, "gemma4", True),
    # Pixtral (n_merge 1), Mistral Small 3.x (a 2x2 patch merger): up to 1024 tokens per image,
    # a 16 x 16-token warm-up image
    "pixtral": ProjectorKind("dynamic", 1, _SPATIAL, 1024, 16 * 16, "pixtral", True),
}
MAX_ENCODER_LAYERS = 256  # vision encoders have 12 to 48 blocks
# ggml's CPU buffers align tensors to 32 bytes (CUDA's to 128: a few KiB more per graph)
BUFFER_ALIGNMENT = 32
# Types without a row: weights are counted, the encoder is assumed to see one image of
# `image_size` with no merge (an upper bound on tokens for the pooled families).
_UNKNOWN_KIND = ProjectorKind("pooled", 1, _SCALE)


@dataclass(frozen=True)
class Projector:
    """What a projector file's header says, and what follows for memory and context."""

    path: Path
    projector_type: str  # clip.projector_type, e.g. "gemma3", "qwen2.5vl_merger"
    image_size: int
    patch_size: int
    n_embd: int  # the encoder's width
    n_ff: int
    n_head: int
    n_layer: int
    projection_dim: int  # the text model's embedding width it projects into
    n_merge: int
    weights_bytes: int
    patch_kernel_bytes: int  # bytes per element of the patch-embedding kernel (im2col's type)
    patch_kernel_type: str = "F16"  # its ggml type: im2col runs in F16, in F32 for a BF16 one
    n_wa_pattern: int = 0  # Qwen2.5-VL: every n-th layer full attention, the others windowed
    ffn_gate: bool = False  # the encoder's FFN is gated (ffn_gate tensors)
    pre_norm: bool = False  # v.pre_ln
    post_norm: bool = True  # v.post_ln
    pos_embd_side: int = 0  # Qwen3-VL: learned positions on a side x side grid
    deepstack_layers: tuple[int, ...] = ()  # Qwen3-VL: blocks followed by a deepstack merger
    patch_bias: bool = False  # v.patch_embd.bias
    linear_bias: bool = True  # the encoder's matrices have biases (v.blk.0.attn_q.bias)
    projector_bias: bool = True  # the projection's do (mm.1.bias / mm.0.bias)
    img_break: bool = False  # Pixtral: an [IMG_BREAK] token after each row but the last
    std_scale: bool = False  # Gemma 4: v.std_bias / v.std_scale
    layer_scale: bool = False  # InternVL: v.blk.N.ls1 / ls2
    max_tiles: int = 0  # InternVL: an image is cut into up to this many tiles, plus an overview

    @property
    def kind(self) -> ProjectorKind:
        return PROJECTOR_KINDS.get(self.projector_type, _UNKNOWN_KIND)

    @property
    def compute_measured(self) -> bool:
        """The compute formula was checked against llama.cpp for this projector type."""
        return self.kind.measured

    @property
    def image_tokens(self) -> int:
        """Context tokens one image takes at most (clip_n_output_tokens)."""
        kind = self.kind
        if kind.tokens == "dynamic":
            # the largest image; Pixtral adds an [IMG_BREAK] after each row but the last
            return kind.max_tokens + (self._largest_grid[1] - 1 if self.img_break else 0)
        side = self.image_size // self.patch_size // max(1, self.n_merge)
        return side * side * self.tiles

    @property
    def encoder_patches(self) -> int:
        """Patches the encoder runs over for the largest image."""
        if self.kind.tokens == "dynamic":
            return self.kind.max_tokens * self.n_merge * self.n_merge
        side = self.image_size // self.patch_size
        return side * side

    @property
    def _largest_grid(self) -> tuple[int, int]:
        """(columns, rows) of tokens of the largest image: the most tokens llama.cpp allows, as
        square as they divide (64 x 64 for 4096, 35 x 32 for Gemma 4's 1120)."""
        n = self.kind.max_tokens
        rows = next(r for r in range(math.isqrt(n), 0, -1) if n % r == 0)
        return n // rows, rows

    @property
    def largest_image(self) -> tuple[int, int]:
        """(width, height) in pixels of the largest image the encoder takes."""
        if self.kind.tokens == "dynamic":
            cols, rows = self._largest_grid
            step = self.patch_size * self.n_merge
            return cols * step, rows * step
        return self.image_size, self.image_size

    @property
    def image_side(self) -> int:
        """Pixels on the longer side of the largest image the encoder takes."""
        return max(self.largest_image)

    @property
    def warmup_side(self) -> int:
        """Pixels per side of the image llama.cpp reserves the compute buffer with at load."""
        kind = self.kind
        if kind.tokens == "dynamic" and kind.warmup_tokens:
            return math.isqrt(kind.warmup_tokens) * self.patch_size * self.n_merge
        return self.image_side

    def encoder_shape(self) -> EncoderShape:
        return EncoderShape(
            patch_size=self.patch_size, n_embd=self.n_embd, n_ff=self.n_ff, n_head=self.n_head,
            n_layer=self.n_layer, projection_dim=self.projection_dim, n_merge=self.n_merge,
            n_wa_pattern=self.n_wa_pattern,
            rms_norm=self.projector_type in ("qwen2.5vl_merger", "pixtral"),
            ffn_gate=self.ffn_gate, pre_norm=self.pre_norm, post_norm=self.post_norm,
            pos_embd_side=self.pos_embd_side, deepstack_layers=self.deepstack_layers,
            patch_bias=self.patch_bias, linear_bias=self.linear_bias,
            projector_bias=self.projector_bias, img_break=self.img_break,
            std_scale=self.std_scale, layer_scale=self.layer_scale,
            kernel_dtype="bf16" if self.patch_kernel_type == "BF16" else "f16",
        )

    def image_compute_bytes(self, width: int, height: int, flash_attn: bool) -> int:
        """The compute buffer llama.cpp reserves for one image of width x height pixels (after
        its resize to whole merged patches; InternVL: one tile), for the graph types replayed
        in `encoders`."""
        if self.kind.graph != "vit":
            return _graph_bytes(self.kind.graph, self.encoder_shape(), width, height, flash_attn)
        raise ValueError(f"no encoder graph for {self.projector_type}")

    def warmup_compute_bytes(self, flash_attn: bool) -> int:
        """The compute buffer llama.cpp prints at load (its warm-up image)."""
        side = self.warmup_side
        if self.kind.graph == "vit":
            return self.compute_bytes(flash_attn)
        return self.image_compute_bytes(side, side, flash_attn)

    def compute_bytes(self, flash_attn: bool) -> int:
        """The encoder's compute buffer for one image of the largest size (Qwen-VL: the largest
        square image, 4096 tokens; llama.cpp grows its buffer to this when such an image comes).
        """
        if self.kind.graph != "vit":
            # InternVL's tiles are encoded one at a time (mtmd makes a chunk of each)
            return self.image_compute_bytes(*self.largest_image, flash_attn)
        return self._vit_compute_bytes(flash_attn)

    @property
    def tiles(self) -> int:
        """Encoder inputs one image becomes at most: InternVL's tiles and overview, else 1."""
        return self.max_tiles + 1 if self.max_tiles else 1

    def _vit_compute_bytes(self, flash_attn: bool) -> int:
        """An estimate for projector types whose graph is not replayed: the largest of three live
        sets of a ViT, in f32 (it equals the replay for Gemma 3's SigLIP at the sizes tested): the
        FFN (n_ff + 3 n_embd per patch); without flash attention the attention scores (n_head x
        patches per patch, plus 6 n_embd); and the image with its im2col copy.
        """
        n = self.encoder_patches
        ffn = F32_BYTES * n * (self.n_ff + 3 * self.n_embd)
        attention = 0 if flash_attn else F32_BYTES * n * (self.n_head * n + 6 * self.n_embd)
        image = 3 * self.image_side**2 * (F32_BYTES + self.patch_kernel_bytes)
        return max(ffn, attention, image)

    def total_bytes(self, flash_attn: bool) -> int:
        return self.weights_bytes + self.compute_bytes(flash_attn)

    def to_dict(self, flash_attn: bool) -> dict[str, object]:
        return {
            "file": str(self.path),
            "projector_type": self.projector_type,
            "image_size": self.image_side,
            "image_width": self.largest_image[0],
            "image_height": self.largest_image[1],
            "image_tokens": self.image_tokens,
            "weights_bytes": self.weights_bytes,
            "compute_bytes": self.compute_bytes(flash_attn),
            "warmup_image_size": self.warmup_side,
            "warmup_compute_bytes": self.warmup_compute_bytes(flash_attn),
            "compute_measured": self.compute_measured,
        }


def is_projector_metadata(metadata: Mapping[str, object]) -> bool:
    """The header of a projector: `general.type = "mmproj"` or clip.cpp's keys."""
    if metadata.get("general.type") == "mmproj":
        return True
    return metadata.get("general.architecture") == "clip" or any(
        key.startswith("clip.") for key in metadata
    )


def projector_from_header(
    path: Path, metadata: Mapping[str, object], tensors: Iterable[TensorInfo]
) -> Projector:
    """A Projector from a parsed header (pure: tests build headers without files)."""
    if not is_projector_metadata(metadata):
        raise GGUFError(path, "not a multimodal projector (no general.type mmproj, no clip.* keys)")
    if metadata.get("clip.has_vision_encoder") is False:
        raise GGUFError(path, "this projector has no vision encoder (audio only)")

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            if default is not None:
                return default
            raise GGUFError(path, f"projector key {key} is missing or not a positive integer")
        return value

    ptype = metadata.get("clip.vision.projector_type", metadata.get("clip.projector_type"))
    projector_type = ptype if isinstance(ptype, str) else "unknown"
    kind = PROJECTOR_KINDS.get(projector_type, _UNKNOWN_KIND)
    tensor_list = list(tensors)
    names = {t.name for t in tensor_list}
    positions = next((t for t in tensor_list if t.name == "v.position_embd.weight"), None)
    kernel = next((t for t in tensor_list if t.name == "v.patch_embd.weight"), None)
    kernel_bytes = 2 if kernel is not None and kernel.ggml_type in ("F16", "BF16") else F32_BYTES
    image_size = number("clip.vision.image_size")
    patch_size = number("clip.vision.patch_size")
    if image_size > 16384 or patch_size > image_size:
        raise GGUFError(path, f"image size {image_size} / patch size {patch_size} not plausible")
    n_layer, n_embd, n_head = (number("clip.vision.block_count"),
                               number("clip.vision.embedding_length"),
                               number("clip.vision.attention.head_count"))
    # the plan replays the encoder's graph layer by layer: a hostile header must not make that
    # loop run for ever
    if n_layer > MAX_ENCODER_LAYERS or n_head > n_embd:
        raise GGUFError(path, f"{n_layer} blocks of {n_head} heads over {n_embd} not plausible")
    return Projector(
        path=path,
        projector_type=projector_type,
        image_size=image_size,
        patch_size=patch_size,
        n_embd=n_embd,
        n_ff=number("clip.vision.feed_forward_length"),
        n_head=n_head,
        n_layer=n_layer,
        projection_dim=number("clip.vision.projection_dim", 0),
        n_merge=number(kind.merge_key, kind.n_merge),
        weights_bytes=sum(t.n_bytes for t in tensor_list),
        patch_kernel_bytes=kernel_bytes,
        patch_kernel_type=kernel.ggml_type if kernel is not None else "F32",
        n_wa_pattern=number("clip.vision.n_wa_pattern", 0),
        ffn_gate="v.blk.0.ffn_gate.weight" in names,
        pre_norm="v.pre_ln.weight" in names,
        post_norm="v.post_ln.weight" in names,
        # Qwen3-VL: a side x side grid; Gemma 4: an x and a y table of that many rows each
        pos_embd_side=0 if positions is None or len(positions.shape) < 2 else (
            positions.shape[1] if projector_type == "gemma4v"
            else math.isqrt(positions.shape[1])),
        std_scale="v.std_scale" in names,
        layer_scale="v.blk.0.ls1.weight" in names,
        max_tiles=_max_tiles(projector_type, metadata, image_size, number),
        patch_bias="v.patch_embd.bias" in names,
        linear_bias="v.blk.0.attn_q.bias" in names,
        projector_bias=bool(names & {"mm.0.bias", "mm.1.bias"}),
        img_break="v.token_embd.img_break" in names,
        deepstack_layers=tuple(sorted(
            int(m.group(1)) for n in names if (m := _DEEPSTACK.fullmatch(n)) is not None
        )),
    )


def _max_tiles(
    projector_type: str, metadata: Mapping[str, object], image_size: int,
    number: Callable[[str, int], int],
) -> int:
    """Tiles an image is cut into at most, besides its overview (0: not tiled)."""
    if projector_type == "internvl":
        return number("clip.vision.preproc_max_tiles", 12)
    if projector_type == "idefics3" and "clip.vision.preproc_image_size" in metadata:
        # the longer side resized to preproc_image_size, a square image: side x side tiles
        side = -(-number("clip.vision.preproc_image_size", image_size) // image_size)
        return side * side
    return 0


_DEEPSTACK = re.compile(r"v\.deepstack\.(\d+)\.fc1\.weight")


@functools.lru_cache(maxsize=64)
def _graph_bytes(graph: str, shape: EncoderShape, width: int, height: int, flash_attn: bool) -> int:
    # the fitter asks again for each candidate plan: replay the allocator once per shape
    build = {"gemma3": gemma3_buffer_bytes, "qwen2vl": qwen2vl_buffer_bytes,
             "qwen3vl": qwen3vl_buffer_bytes, "pixtral": pixtral_buffer_bytes,
             "gemma4": gemma4_buffer_bytes, "internvl": internvl_buffer_bytes,
             "idefics3": idefics3_buffer_bytes}[graph]
    return build(shape, width, height, flash_attn, BUFFER_ALIGNMENT)
