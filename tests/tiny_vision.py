"""Tiny random-weight multimodal projectors (`mmproj-*.gguf`) that llama.cpp's mtmd loads for real.

`write_gemma3_mmproj`: a SigLIP-style vision tower with Gemma 3's projector (average pooling by
`n_merge` per side, RMS norm, one projection into the text model's embedding). Keys and tensors
follow llama.cpp's `tools/mtmd/clip.cpp` (`clip_model_loader`: `clip.vision.*` hyperparameters,
`v.blk.N.*` layers, `mm.input_projection.weight` / `mm.soft_emb_norm.weight` for gemma3) and
what `convert_hf_to_gguf.py` writes (`general.type = "mmproj"`).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

MIB = 1024 * 1024


@dataclass(frozen=True)
class VisionSpec:
    projector_type: str = "gemma3"
    image_size: int = 224
    patch_size: int = 14
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    projection_dim: int = 64  # the text model's embedding width


def metadata(spec: VisionSpec) -> dict[str, object]:
    """The header keys clip.cpp reads for a vision projector (what the converter writes)."""
    v = "clip.vision."
    return {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "clip.has_vision_encoder": True,
        "clip.projector_type": spec.projector_type,
        v + "image_size": spec.image_size,
        v + "patch_size": spec.patch_size,
        v + "embedding_length": spec.n_embd,
        v + "feed_forward_length": spec.n_ff,
        v + "block_count": spec.n_layer,
        v + "attention.head_count": spec.n_head,
        v + "projection_dim": spec.projection_dim,
    }


def tensor_plan(spec: VisionSpec) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, ggml shape, constant fill or None for random) of a Gemma 3 projector's tensors."""
    e, f, p = spec.n_embd, spec.n_ff, spec.patch_size
    n_patches = (spec.image_size // p) ** 2
    plan: list[tuple[str, tuple[int, ...], float | None]] = [
        ("v.patch_embd.weight", (p, p, 3, e), None),
        ("v.patch_embd.bias", (e,), None),
        ("v.position_embd.weight", (e, n_patches), None),
    ]
    for il in range(spec.n_layer):
        b = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            plan += [(b + name + ".weight", (e, e), None), (b + name + ".bias", (e,), None)]
        for name in ("ln1", "ln2"):
            plan += [(b + name + ".weight", (e,), 1.0), (b + name + ".bias", (e,), 0.0)]
        plan += [
            (b + "ffn_up.weight", (e, f), None),
            (b + "ffn_up.bias", (f,), None),
            (b + "ffn_down.weight", (f, e), None),
            (b + "ffn_down.bias", (e,), None),
        ]
    plan += [
        ("v.post_ln.weight", (e,), 1.0),
        ("v.post_ln.bias", (e,), 0.0),
        ("mm.input_projection.weight", (spec.projection_dim, e), None),
        ("mm.soft_emb_norm.weight", (e,), 1.0),
    ]
    return plan


def _is_f16(name: str, ggml_shape: tuple[int, ...]) -> bool:
    """The converter's types: matrices (and the conv kernel) F16; vectors and the position
    embeddings F32 (`tensor_force_quant`; clip adds them to F32 activations, which ggml's CPU
    add cannot do from F16)."""
    return len(ggml_shape) > 1 and ".position_embd." not in name


def tensor_bytes(spec: VisionSpec) -> int:
    """By hand, with the types `write_gemma3_mmproj` writes."""
    total = 0
    for name, shape, _ in tensor_plan(spec):
        n = int(np.prod(shape))
        total += n * (2 if _is_f16(name, shape) else 4)
    return total


def write_gemma3_mmproj(path: Path, spec: VisionSpec | None = None, seed: int = 0) -> VisionSpec:
    spec = spec or VisionSpec()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type("mmproj")
    writer.add_name("tiny gemma3 mmproj")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value in metadata(spec).items():
        if key in ("general.architecture", "general.type"):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            assert isinstance(value, int)
            writer.add_uint32(key, value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_bool("clip.use_gelu", True)
    for name, ggml_shape, fill in tensor_plan(spec):
        shape = tuple(reversed(ggml_shape))
        if fill is not None:
            data = np.full(shape, fill, dtype=np.float32)
        else:
            data = rng.standard_normal(shape).astype(np.float32) * 0.05
        writer.add_tensor(name, data.astype(np.float16) if _is_f16(name, ggml_shape) else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return spec


@dataclass(frozen=True)
class QwenVisionSpec:
    """A Qwen2-VL / Qwen2.5-VL-style projector (`clip_graph_qwen2vl`)."""

    projector_type: str = "qwen2.5vl_merger"  # or "qwen2vl_merger"
    patch_size: int = 14
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    projection_dim: int = 64
    n_wa_pattern: int = 0  # 2.5-VL: every n-th layer full attention, the others windowed; 0 none
    image_size: int = 560


def write_qwen25vl_mmproj(
    path: Path, n_embd: int = 64, n_ff: int = 128, n_head: int = 4, projection_dim: int = 64
) -> None:
    """The default tiny Qwen2.5-VL-style projector (full attention), see `write_qwen_mmproj`."""
    write_qwen_mmproj(path, QwenVisionSpec(n_embd=n_embd, n_ff=n_ff, n_head=n_head,
                                           projection_dim=projection_dim))


@dataclass(frozen=True)
class Qwen3VisionSpec:
    """A Qwen3-VL-style projector (`clip_graph_qwen3vl`)."""

    patch_size: int = 16
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 3
    n_head: int = 4
    projection_dim: int = 16  # x (1 + deepstack layers) = the text model's width (64)
    deepstack_layers: tuple[int, ...] = (0, 1, 2)
    pos_embd_side: int = 8  # learned positions on this grid, resized to the image's
    image_size: int = 768


def qwen3_header(
    spec: Qwen3VisionSpec,
) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], float | None]]]:
    """(header keys, tensors) of a Qwen3-VL-style projector: the two patch convolutions with a
    bias, learned positions, fused QKV, layer norms, a plain GELU FFN, deepstack mergers
    (`v.deepstack.N.*`) after some blocks whose outputs are concatenated to the main merger's."""
    e, f, p, m = spec.n_embd, spec.n_ff, spec.patch_size, 4 * spec.n_embd
    v = "clip.vision."
    keys: dict[str, object] = {
        "general.architecture": "clip", "general.type": "mmproj",
        "clip.has_vision_encoder": True, "clip.projector_type": "qwen3vl_merger",
        v + "image_size": spec.image_size, v + "patch_size": p, v + "embedding_length": e,
        v + "feed_forward_length": f, v + "block_count": spec.n_layer,
        v + "projection_dim": spec.projection_dim, v + "attention.head_count": spec.n_head,
    }
    plan: list[tuple[str, tuple[int, ...], float | None]] = [
        ("v.patch_embd.weight", (p, p, 3, e), None),
        ("v.patch_embd.weight.1", (p, p, 3, e), None),
        ("v.patch_embd.bias", (e,), None),
        ("v.position_embd.weight", (e, spec.pos_embd_side**2), None),
    ]
    for il in range(spec.n_layer):
        b = f"v.blk.{il}."
        plan += [(b + "attn_qkv.weight", (e, 3 * e), None), (b + "attn_qkv.bias", (3 * e,), None),
                 (b + "attn_out.weight", (e, e), None), (b + "attn_out.bias", (e,), None)]
        for name in ("ln1", "ln2"):
            plan += [(b + name + ".weight", (e,), 1.0), (b + name + ".bias", (e,), 0.0)]
        plan += [(b + "ffn_up.weight", (e, f), None), (b + "ffn_up.bias", (f,), None),
                 (b + "ffn_down.weight", (f, e), None), (b + "ffn_down.bias", (e,), None)]
        if il in spec.deepstack_layers:
            d = f"v.deepstack.{il}."
            plan += [(d + "norm.weight", (m,), 1.0), (d + "norm.bias", (m,), 0.0),
                     (d + "fc1.weight", (m, m), None), (d + "fc1.bias", (m,), None),
                     (d + "fc2.weight", (m, spec.projection_dim), None),
                     (d + "fc2.bias", (spec.projection_dim,), None)]
    plan += [
        ("v.post_ln.weight", (e,), 1.0), ("v.post_ln.bias", (e,), 0.0),
        ("mm.0.weight", (m, m), None), ("mm.0.bias", (m,), None),
        ("mm.2.weight", (m, spec.projection_dim), None),
        ("mm.2.bias", (spec.projection_dim,), None),
    ]
    return keys, plan


@dataclass(frozen=True)
class PixtralVisionSpec:
    """A Pixtral / Mistral Small 3.x-style projector (`clip_graph_pixtral`)."""

    patch_size: int = 14
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    projection_dim: int = 64
    n_merge: int = 2  # Mistral Small 3.1's patch merger; 1: Pixtral 12B's none
    biases: bool = False  # Mistral's vision matrices have none
    image_size: int = 1540


def pixtral_header(
    spec: PixtralVisionSpec,
) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], float | None]]]:
    """(header keys, tensors) of a Pixtral-style projector: one patch convolution, RMS norms
    (ln_pre too), 2D RoPE (no tensor), a gated SiLU FFN, with n_merge > 1 an RMS norm and a
    patch merger (`mm.patch_merger`), the two-layer GELU projector `mm.1` / `mm.2` and the
    [IMG_BREAK] embedding."""
    e, f, p, m, o = spec.n_embd, spec.n_ff, spec.patch_size, spec.n_merge, spec.projection_dim
    v = "clip.vision."
    keys: dict[str, object] = {
        "general.architecture": "clip", "general.type": "mmproj",
        "clip.has_vision_encoder": True, "clip.projector_type": "pixtral",
        v + "image_size": spec.image_size, v + "patch_size": p, v + "embedding_length": e,
        v + "feed_forward_length": f, v + "block_count": spec.n_layer,
        v + "projection_dim": o, v + "attention.head_count": spec.n_head,
    }
    if m > 1:
        keys[v + "spatial_merge_size"] = m
    plan: list[tuple[str, tuple[int, ...], float | None]] = [
        ("v.patch_embd.weight", (p, p, 3, e), None),
        ("v.pre_ln.weight", (e,), 1.0),
    ]

    def linear(name: str, n_in: int, n_out: int, bias: bool) -> None:
        plan.append((name + ".weight", (n_in, n_out), None))
        if bias:
            plan.append((name + ".bias", (n_out,), None))

    for il in range(spec.n_layer):
        b = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            linear(b + name, e, e, spec.biases)
        plan += [(b + "ln1.weight", (e,), 1.0), (b + "ln2.weight", (e,), 1.0)]
        linear(b + "ffn_up", e, f, spec.biases)
        linear(b + "ffn_gate", e, f, spec.biases)
        linear(b + "ffn_down", f, e, spec.biases)
    if m > 1:
        plan += [("mm.input_norm.weight", (e,), 1.0),
                 ("mm.patch_merger.weight", (m * m * e, e), None)]
    linear("mm.1", e, o, spec.biases)
    linear("mm.2", o, o, spec.biases)
    plan.append(("v.token_embd.img_break", (o,), None))
    return keys, plan


@dataclass(frozen=True)
class Gemma4VisionSpec:
    """A Gemma 4-style projector (`clip_graph_gemma4v`)."""

    patch_size: int = 16
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    projection_dim: int = 64
    pos_rows: int = 256  # rows of each of the x and y position tables
    std_scale: bool = False
    image_size: int = 768


def gemma4_header(
    spec: Gemma4VisionSpec,
) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], float | None]]]:
    """(header keys, tensors) of a Gemma 4-style projector: one patch convolution without bias,
    x and y position tables, RMS norms before and after attention and FFN, per-head Q/K norms,
    a gated GELU FFN, no biases, then 3x3 pooling and `mm.input_projection`."""
    e, f, p, o = spec.n_embd, spec.n_ff, spec.patch_size, spec.projection_dim
    d_head = e // spec.n_head
    v = "clip.vision."
    keys: dict[str, object] = {
        "general.architecture": "clip", "general.type": "mmproj",
        "clip.has_vision_encoder": True, "clip.projector_type": "gemma4v",
        v + "image_size": spec.image_size, v + "patch_size": p, v + "embedding_length": e,
        v + "feed_forward_length": f, v + "block_count": spec.n_layer,
        v + "projection_dim": o, v + "attention.head_count": spec.n_head,
    }
    plan: list[tuple[str, tuple[int, ...], float | None]] = [
        ("v.patch_embd.weight", (p, p, 3, e), None),
        ("v.position_embd.weight", (e, spec.pos_rows, 2), None),
    ]
    for il in range(spec.n_layer):
        b = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            plan.append((b + name + ".weight", (e, e), None))
        plan += [(b + "attn_q_norm.weight", (d_head,), 1.0),
                 (b + "attn_k_norm.weight", (d_head,), 1.0)]
        for name in ("ln1", "ln2", "attn_post_norm", "ffn_post_norm"):
            plan.append((b + name + ".weight", (e,), 1.0))
        plan += [(b + "ffn_up.weight", (e, f), None), (b + "ffn_gate.weight", (e, f), None),
                 (b + "ffn_down.weight", (f, e), None)]
    if spec.std_scale:
        plan += [("v.std_bias", (e,), 0.0), ("v.std_scale", (e,), 1.0)]
    plan.append(("mm.input_projection.weight", (e, o), None))
    return keys, plan


@dataclass(frozen=True)
class Idefics3VisionSpec:
    """An Idefics3 / SmolVLM-style projector (`clip_graph_siglip` with pixel unshuffle)."""

    image_size: int = 224  # one tile
    patch_size: int = 14
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    projection_dim: int = 64
    scale_factor: int = 4
    longest_edge: int = 448  # clip.vision.preproc_image_size: 2 x 2 tiles and an overview


def idefics3_header(
    spec: Idefics3VisionSpec,
) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], float | None]]]:
    """(header keys, tensors) of an Idefics3-style projector: Gemma 3's SigLIP tower (see
    `tensor_plan`) with `mm.model.fc` after a pixel unshuffle instead of Gemma 3's pooling."""
    vit = VisionSpec("idefics3", spec.image_size, spec.patch_size, spec.n_embd, spec.n_ff,
                     spec.n_layer, spec.n_head, spec.projection_dim)
    keys = metadata(vit)
    keys["clip.vision.projector.scale_factor"] = spec.scale_factor
    keys["clip.vision.preproc_image_size"] = spec.longest_edge
    plan = [t for t in tensor_plan(vit) if not t[0].startswith("mm.")]
    plan.append(("mm.model.fc.weight", (spec.n_embd * spec.scale_factor**2,
                                        spec.projection_dim), None))
    return keys, plan


@dataclass(frozen=True)
class InternVisionSpec:
    """An InternVL-style projector (`clip_graph_internvl`)."""

    image_size: int = 224  # one tile
    patch_size: int = 14
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    projection_dim: int = 64
    scale_factor: int = 2
    max_tiles: int = 6


def intern_header(
    spec: InternVisionSpec,
) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], float | None]]]:
    """(header keys, tensors) of an InternVL-style projector (InternViT-300M's shape): a patch
    convolution with bias, a CLS token, learned positions, layer norms, layer scales, a GELU FFN,
    then pixel shuffle and the `mm.model.mlp.{0,1,3}` projector."""
    e, f, p, o = spec.n_embd, spec.n_ff, spec.patch_size, spec.projection_dim
    merged = e * spec.scale_factor**2
    v = "clip.vision."
    keys: dict[str, object] = {
        "general.architecture": "clip", "general.type": "mmproj",
        "clip.has_vision_encoder": True, "clip.projector_type": "internvl",
        v + "image_size": spec.image_size, v + "patch_size": p, v + "embedding_length": e,
        v + "feed_forward_length": f, v + "block_count": spec.n_layer,
        v + "projection_dim": o, v + "attention.head_count": spec.n_head,
        v + "projector.scale_factor": spec.scale_factor,
        v + "preproc_max_tiles": spec.max_tiles,
    }
    n_pos = (spec.image_size // p) ** 2 + 1
    plan: list[tuple[str, tuple[int, ...], float | None]] = [
        ("v.patch_embd.weight", (p, p, 3, e), None),
        ("v.patch_embd.bias", (e,), None),
        ("v.class_embd", (e,), None),
        ("v.position_embd.weight", (e, n_pos), None),
    ]
    for il in range(spec.n_layer):
        b = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            plan += [(b + name + ".weight", (e, e), None), (b + name + ".bias", (e,), None)]
        for name in ("ln1", "ln2"):
            plan += [(b + name + ".weight", (e,), 1.0), (b + name + ".bias", (e,), 0.0)]
        plan += [(b + "ls1.weight", (e,), 0.1), (b + "ls2.weight", (e,), 0.1),
                 (b + "ffn_up.weight", (e, f), None), (b + "ffn_up.bias", (f,), None),
                 (b + "ffn_down.weight", (f, e), None), (b + "ffn_down.bias", (e,), None)]
    plan += [
        ("mm.model.mlp.0.weight", (merged,), 1.0), ("mm.model.mlp.0.bias", (merged,), 0.0),
        ("mm.model.mlp.1.weight", (merged, o), None), ("mm.model.mlp.1.bias", (o,), None),
        ("mm.model.mlp.3.weight", (o, o), None), ("mm.model.mlp.3.bias", (o,), None),
    ]
    return keys, plan


def qwen_header(
    spec: QwenVisionSpec,
) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], float | None]]]:
    """(header keys, [(tensor name, ggml shape, constant fill or None for random)]) of a Qwen2-VL
    / Qwen2.5-VL-style projector: two patch-embedding convolutions (the temporal pair), no
    learned positions (M-RoPE), the 2x2 merger `mm.0` / `mm.2` (clip.cpp `clip_graph_qwen2vl`).
    2.5-VL: RMS norms, a gated SiLU FFN, window attention in every layer but each
    `n_wa_pattern`-th; 2-VL: layer norms with bias, a plain GELU FFN."""
    qwen25 = spec.projector_type == "qwen2.5vl_merger"
    e, f, p = spec.n_embd, spec.n_ff, spec.patch_size
    v = "clip.vision."
    keys: dict[str, object] = {
        "general.architecture": "clip", "general.type": "mmproj",
        "clip.has_vision_encoder": True, "clip.projector_type": spec.projector_type,
        v + "image_size": spec.image_size, v + "patch_size": p, v + "embedding_length": e,
        v + "feed_forward_length": f, v + "block_count": spec.n_layer,
        v + "projection_dim": spec.projection_dim, v + "attention.head_count": spec.n_head,
    }
    if qwen25:
        keys[v + "n_wa_pattern"] = spec.n_wa_pattern
    plan: list[tuple[str, tuple[int, ...], float | None]] = [
        ("v.patch_embd.weight", (p, p, 3, e), None),
        ("v.patch_embd.weight.1", (p, p, 3, e), None),
    ]
    ffn = (("ffn_up", (e, f)), ("ffn_gate", (e, f)), ("ffn_down", (f, e)))
    for il in range(spec.n_layer):
        b = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            plan += [(b + name + ".weight", (e, e), None), (b + name + ".bias", (e,), None)]
        for name in ("ln1", "ln2"):
            plan.append((b + name + ".weight", (e,), 1.0))
            if not qwen25:
                plan.append((b + name + ".bias", (e,), 0.0))
        for name, shape in ffn if qwen25 else (ffn[0], ffn[2]):
            plan += [(b + name + ".weight", shape, None), (b + name + ".bias", (shape[1],), None)]
    plan.append(("v.post_ln.weight", (e,), 1.0))
    if not qwen25:
        plan.append(("v.post_ln.bias", (e,), 0.0))
    plan += [
        ("mm.0.weight", (4 * e, 4 * e), None),
        ("mm.0.bias", (4 * e,), None),
        ("mm.2.weight", (4 * e, spec.projection_dim), None),
        ("mm.2.bias", (spec.projection_dim,), None),
    ]
    return keys, plan


AnySpec = (QwenVisionSpec | Qwen3VisionSpec | PixtralVisionSpec | Gemma4VisionSpec
           | InternVisionSpec | Idefics3VisionSpec)


def write_qwen_mmproj(path: Path, spec: AnySpec | None = None, seed: int = 0) -> AnySpec:
    """Write the projector `qwen_header` (or `qwen3_header`, `pixtral_header`) describes
    (matrices F16, vectors F32)."""
    spec = spec or QwenVisionSpec()
    rng = np.random.default_rng(seed)
    if isinstance(spec, Qwen3VisionSpec):
        keys, plan = qwen3_header(spec)
    elif isinstance(spec, PixtralVisionSpec):
        keys, plan = pixtral_header(spec)
    elif isinstance(spec, Gemma4VisionSpec):
        keys, plan = gemma4_header(spec)
    elif isinstance(spec, InternVisionSpec):
        keys, plan = intern_header(spec)
    elif isinstance(spec, Idefics3VisionSpec):
        keys, plan = idefics3_header(spec)
    else:
        keys, plan = qwen_header(spec)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type("mmproj")
    writer.add_name("tiny qwen-vl mmproj")
    for key, value in keys.items():
        if key in ("general.architecture", "general.type"):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            assert isinstance(value, int)
            writer.add_uint32(key, value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    silu = keys["clip.projector_type"] in ("qwen2.5vl_merger", "pixtral")
    writer.add_bool("clip.use_silu" if silu else "clip.use_gelu", True)
    for name, ggml_shape, fill in plan:
        shape = tuple(reversed(ggml_shape))
        data = (np.full(shape, fill, dtype=np.float32) if fill is not None
                else rng.standard_normal(shape).astype(np.float32) * 0.05)
        # the learned positions stay F32 (ggml_interpolate resizes them in F32 only)
        half = len(shape) > 1 and name != "v.position_embd.weight"
        writer.add_tensor(name, data.astype(np.float16) if half else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return spec


@dataclass(frozen=True)
class ClipMeasurement:
    """What llama.cpp's clip logs when it loads a projector: weights and warmup compute buffer."""

    model_bytes: int  # "load_hparams: model size: X MiB" (0.01 MiB rounding)
    compute_bytes: int  # "reserve_compute_meta: CPU compute buffer size = X MiB"
    flash_attn: bool
    lines: tuple[str, ...]
    image_tokens: int = 0  # the encoded image's tokens, when one was encoded


_MODEL_SIZE = re.compile(r"model size:\s*([\d.]+) MiB")
_COMPUTE = re.compile(r"compute buffer size =\s*([\d.]+) MiB")
_FLASH = re.compile(r"flash attention is (enabled|disabled)")


def load_with_mtmd(
    mmproj: Path, text_model: Path, flash_attn: bool | None, image: tuple[int, int] | None = None
) -> ClipMeasurement:
    """Load a projector through llama-cpp-python's mtmd bindings beside a text model (CPU) and
    read llama.cpp's own buffer lines. flash_attn None: llama.cpp's auto.

    image (width, height): no warm-up at load; one blank image of that size is encoded instead,
    so the compute buffer is reserved for it (clip_encode warms up with the image it is given)
    and `image_tokens` is what mtmd counted for it."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from localllm.engine import logs

    fa = {None: -1, False: 0, True: 1}[flash_attn]
    llm = llama_cpp.Llama(str(text_model), n_ctx=256, n_threads=1, verbose=False)
    image_tokens = 0
    try:
        with logs.capture() as lines:
            # clip has its own logger: route it through localllm's capture like llama.cpp's
            mtmd.mtmd_log_set(logs._callback, ctypes.c_void_p(0))
            params = mtmd.mtmd_context_params_default()
            params.use_gpu = False
            params.n_threads = 2
            params.warmup = image is None
            params.flash_attn_type = fa
            ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
            if not ctx:
                raise RuntimeError("mtmd_init_from_file failed:\n" + "\n".join(lines))
            try:
                assert mtmd.mtmd_support_vision(ctx)
                if image is not None:
                    image_tokens = _encode_blank(mtmd, ctx, *image)
            finally:
                mtmd.mtmd_free(ctx)
    finally:
        llm.close()
    text = "\n".join(lines)
    model = _MODEL_SIZE.search(text)
    compute = _COMPUTE.findall(text)
    flash = _FLASH.findall(text)
    assert model and compute and flash, text
    return ClipMeasurement(
        round(float(model[1]) * MIB),
        round(float(compute[-1]) * MIB),  # the last reserve is the one kept
        flash[-1] == "enabled",
        tuple(lines),
        image_tokens,
    )


def _encode_blank(mtmd: Any, ctx: Any, width: int, height: int) -> int:
    """Encode one black RGB image of width x height through mtmd; its tokens (every chunk)."""
    data = (ctypes.c_uint8 * (width * height * 3))()
    bitmap = mtmd.mtmd_bitmap_init(width, height, data)
    chunks = mtmd.mtmd_input_chunks_init()
    marker = mtmd.mtmd_default_marker()
    text = mtmd.mtmd_input_text(marker, len(marker), False, True)
    try:
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        tokens = 0  # an image can be several chunks (InternVL: one per tile and the overview)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == 1:  # MTMD_INPUT_CHUNK_TYPE_IMAGE
                if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                tokens += int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
        if not tokens:
            raise RuntimeError("no image chunk")
        return tokens
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


def compare_table() -> list[list[str]]:
    """llama.cpp's clip lines against the plan's figures for tiny projectors of each family
    (the shapes tests/test_vision*.py check), one row per load."""
    import tempfile

    from localllm.vision import read_projector
    from tests.tiny_models import write_gemma3_swa

    cases: list[tuple[str, VisionSpec | AnySpec, bool]] = []
    for fa in (True, False):
        cases += [
            ("gemma3 224px e64 h4", VisionSpec(), fa),
            ("gemma3 448px e256 h8", VisionSpec(image_size=448, n_embd=256, n_ff=1024,
                                                n_head=8), fa),
            ("qwen2vl e256 h8", QwenVisionSpec(projector_type="qwen2vl_merger", n_embd=256,
                                                n_ff=1024, n_head=8), fa),
            ("qwen2.5vl e64 h4", QwenVisionSpec(), fa),
            ("qwen2.5vl e128 h2 p16 window/4", QwenVisionSpec(
                n_embd=128, n_ff=384, n_head=2, n_layer=4, patch_size=16, n_wa_pattern=4), fa),
            ("qwen3vl e256 h4 deepstack x3", Qwen3VisionSpec(n_embd=256, n_ff=1024, n_head=4),
             fa),
            ("pixtral e256 h4 merger 2x2", PixtralVisionSpec(n_embd=256, n_ff=512, n_head=4),
             fa),
            ("gemma4 e128 h2 std scale", Gemma4VisionSpec(n_embd=128, n_ff=512, n_head=2,
                                                          std_scale=True), fa),
            ("internvl 448px tile e128 h2", InternVisionSpec(image_size=448, n_embd=128,
                                                             n_ff=512, n_head=2), fa),
            ("idefics3 224px tile e256 h4", Idefics3VisionSpec(n_embd=256, n_ff=1024,
                                                               n_head=4), fa),
        ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = folder / "text.gguf"
        write_gemma3_swa(text)
        for name, spec, fa in cases:
            mmproj = folder / "mmproj.gguf"
            if isinstance(spec, VisionSpec):
                write_gemma3_mmproj(mmproj, spec)
            else:
                write_qwen_mmproj(mmproj, spec)
            measured = load_with_mtmd(mmproj, text, fa)
            projector = read_projector(mmproj)
            plan = projector.warmup_compute_bytes(fa)
            rows.append([name, "on" if fa else "off", f"{projector.warmup_side} px",
                         f"{measured.compute_bytes / MIB:.2f}", f"{plan / MIB:.3f}",
                         f"{projector.compute_bytes(fa) / MIB:.2f}", str(projector.image_tokens)])
    return rows


if __name__ == "__main__":
    # .venv/bin/python -m tests.tiny_vision: the table in docs/vision.md
    header = ["projector", "flash attn", "reserved for", "llama.cpp MiB", "plan MiB",
              "plan, largest image MiB", "tokens/image"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in compare_table():
        print("| " + " | ".join(row) + " |")
