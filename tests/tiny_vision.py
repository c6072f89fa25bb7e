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


def write_qwen25vl_mmproj(
    path: Path, n_embd: int = 64, n_ff: int = 128, n_head: int = 4, projection_dim: int = 64
) -> None:
    """A Qwen2.5-VL-style projector (`qwen2.5vl_merger`): two patch-embedding convolutions (the
    temporal pair), no learned positions (M-RoPE), RMS norms, a gated SiLU FFN, full attention
    (`n_wa_pattern` 0), and the 2x2 merger `mm.0` / `mm.2` (clip.cpp `clip_graph_qwen2vl`)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type("mmproj")
    writer.add_name("tiny qwen2.5vl mmproj")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "qwen2.5vl_merger")
    e, f, p = n_embd, n_ff, 14
    keys = {"image_size": 560, "patch_size": p, "embedding_length": e, "feed_forward_length": f,
            "block_count": 2, "projection_dim": projection_dim, "n_wa_pattern": 0,
            "attention.head_count": n_head}
    for key, value in keys.items():
        writer.add_uint32("clip.vision." + key, value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_bool("clip.use_silu", True)

    def add(name: str, ggml_shape: tuple[int, ...], fill: float | None = None) -> None:
        shape = tuple(reversed(ggml_shape))
        data = (np.full(shape, fill, dtype=np.float32) if fill is not None
                else rng.standard_normal(shape).astype(np.float32) * 0.05)
        writer.add_tensor(name, data.astype(np.float16) if len(shape) > 1 else data)

    add("v.patch_embd.weight", (p, p, 3, e))
    add("v.patch_embd.weight.1", (p, p, 3, e))
    for il in range(2):
        b = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            add(b + name + ".weight", (e, e))
            add(b + name + ".bias", (e,))
        add(b + "ln1.weight", (e,), 1.0)
        add(b + "ln2.weight", (e,), 1.0)
        for name, shape in (("ffn_up", (e, f)), ("ffn_gate", (e, f)), ("ffn_down", (f, e))):
            add(b + name + ".weight", shape)
            add(b + name + ".bias", (shape[1],))
    add("v.post_ln.weight", (e,), 1.0)
    add("mm.0.weight", (4 * e, 4 * e))
    add("mm.0.bias", (4 * e,))
    add("mm.2.weight", (4 * e, projection_dim))
    add("mm.2.bias", (projection_dim,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass(frozen=True)
class ClipMeasurement:
    """What llama.cpp's clip logs when it loads a projector: weights and warmup compute buffer."""

    model_bytes: int  # "load_hparams: model size: X MiB" (0.01 MiB rounding)
    compute_bytes: int  # "reserve_compute_meta: CPU compute buffer size = X MiB"
    flash_attn: bool
    lines: tuple[str, ...]


_MODEL_SIZE = re.compile(r"model size:\s*([\d.]+) MiB")
_COMPUTE = re.compile(r"compute buffer size =\s*([\d.]+) MiB")
_FLASH = re.compile(r"flash attention is (enabled|disabled)")


def load_with_mtmd(mmproj: Path, text_model: Path, flash_attn: bool | None) -> ClipMeasurement:
    """Load a projector through llama-cpp-python's mtmd bindings beside a text model (CPU) and
    read llama.cpp's own buffer lines. flash_attn None: llama.cpp's auto."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from localllm.engine import logs

    fa = {None: -1, False: 0, True: 1}[flash_attn]
    llm = llama_cpp.Llama(str(text_model), n_ctx=256, n_threads=1, verbose=False)
    try:
        with logs.capture() as lines:
            # clip has its own logger: route it through localllm's capture like llama.cpp's
            mtmd.mtmd_log_set(logs._callback, ctypes.c_void_p(0))
            params = mtmd.mtmd_context_params_default()
            params.use_gpu = False
            params.n_threads = 1
            params.warmup = True
            params.flash_attn_type = fa
            ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
            if not ctx:
                raise RuntimeError("mtmd_init_from_file failed:\n" + "\n".join(lines))
            assert mtmd.mtmd_support_vision(ctx)
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
    )
