"""The GGUF header reader: real architectures, the real embedded model, and hostile files."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from localllm.errors import GGUFError
from localllm.gguf_header import read_header
from tests.gguf_factory import (
    GEMMA3_27B,
    LLAMA_7B,
    LLAMA_70B,
    MIXTRAL_8X7B,
    ArchSpec,
    tensor_bytes,
    tensor_plan,
    write_gguf,
)

# ---------------------------------------------------------------------------------------------
# Real architectures, checked against numbers computed here from the published hyperparameters.


def _expected_params(spec: ArchSpec) -> int:
    e, hd, ff = spec.n_embd, spec.n_embd_head, spec.n_ff
    attn = e * spec.n_head * hd * 2 + e * spec.n_head_kv * hd * 2  # q, o, k, v
    ffn = 3 * e * ff * max(spec.n_expert, 1) + e * spec.n_expert
    norms = 2 * e + (2 * hd + 2 * e if spec.arch == "gemma3" else 0)
    per_layer = attn + ffn + norms
    embeddings = e * spec.n_vocab * (1 if spec.tied_output else 2)
    return spec.n_layer * per_layer + embeddings + e


@pytest.mark.parametrize(
    "spec", [LLAMA_7B, LLAMA_70B, MIXTRAL_8X7B, GEMMA3_27B], ids=lambda s: s.name
)
def test_real_architectures(tmp_path: Path, spec: ArchSpec) -> None:
    path = write_gguf(tmp_path / "m.gguf", spec)
    header = read_header(path)

    assert header.architecture == spec.arch
    assert header.n_layer == spec.n_layer
    assert header.n_embd == spec.n_embd
    assert header.n_head == (spec.n_head,) * spec.n_layer
    assert header.n_head_kv == (spec.n_head_kv,) * spec.n_layer
    assert header.n_embd_head_k == header.n_embd_head_v == spec.n_embd_head
    assert header.n_ff == (spec.n_ff,) * spec.n_layer
    assert header.n_vocab == spec.n_vocab
    assert header.n_ctx_train == spec.n_ctx_train
    assert header.n_expert == spec.n_expert and header.n_expert_used == spec.n_expert_used
    assert header.file_type == "Q4_K_M"
    assert header.n_params == _expected_params(spec)

    plan = tensor_plan(spec, "Q4_K_M")
    total = sum(tensor_bytes(q, shape) for _, shape, q in plan)
    assert header.total_bytes == total
    layer0 = sum(tensor_bytes(q, s) for n, s, q in plan if n.startswith("blk.0."))
    assert header.layer_bytes[0] == layer0
    assert sum(header.layer_bytes) + header.non_repeating_bytes == total
    assert header.bits_per_weight == pytest.approx(8 * total / _expected_params(spec))
    embd = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    assert header.token_embd_bytes == spec.n_embd * spec.n_vocab // embd[0] * embd[1]
    assert header.output_tied == spec.tied_output
    # the file is sparse: full size on paper, header only on disk
    assert header.data_complete
    assert header.file_bytes > total


def test_moe_expert_bytes(tmp_path: Path) -> None:
    header = read_header(write_gguf(tmp_path / "moe.gguf", MIXTRAL_8X7B))
    q4k, q6k = (
        GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K],
        GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K],
    )
    one = 4096 * 14336 * 8
    # layer 0 raises ffn_down to Q6_K in the factory's Q4_K_M mix
    expected = 2 * one // q4k[0] * q4k[1] + one // q6k[0] * q6k[1]
    assert header.expert_layer_bytes[0] == expected
    assert header.is_moe


def test_sliding_window_layers(tmp_path: Path) -> None:
    header = read_header(write_gguf(tmp_path / "g.gguf", GEMMA3_27B))
    assert header.sliding_window == 1024
    # llama.cpp's gemma3 pattern: every 6th layer (5, 11, ...) is global
    assert [il for il, swa in enumerate(header.swa_layers) if not swa] == list(range(5, 62, 6))


def test_embedded_model(embedded_model_path: Path) -> None:
    header = read_header(embedded_model_path)
    assert header.architecture == "gemma3"
    assert header.n_layer == 18
    assert header.sliding_window == 512
    assert header.file_type == "Q4_K_M"
    assert header.n_vocab == 262144
    assert not header.has_chat_template
    assert [il for il, swa in enumerate(header.swa_layers) if not swa] == [5, 11, 17]
    # llama.cpp logs "CPU_Mapped model buffer size = 235.16 MiB" for this file
    assert header.total_bytes / 2**20 == pytest.approx(235.16, abs=0.01)
    assert header.data_complete


def test_big_header_is_fast(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "70b.gguf", LLAMA_70B)
    assert path.stat().st_size > 40e9  # a 42 GB file, sparse on disk
    start = time.perf_counter()
    read_header(path)
    assert time.perf_counter() - start < 1.0


def test_header_only_file_reads_and_says_so(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "h.gguf", LLAMA_7B, sparse=False)
    header = read_header(path)
    assert header.n_layer == 32
    assert not header.data_complete
    assert "cannot be loaded" in header.warnings[0]


def test_split_set_is_one_model(tmp_path: Path) -> None:
    import gguf

    spec = LLAMA_7B
    plan = tensor_plan(spec, "Q4_K_M")
    halves = [plan[: len(plan) // 2], plan[len(plan) // 2 :]]
    for index, part in enumerate(halves, start=1):
        path = tmp_path / f"m-{index:05d}-of-00002.gguf"
        writer = gguf.GGUFWriter(str(path), spec.arch)
        if index == 1:
            full = write_gguf(tmp_path / "donor.gguf", spec)
            donor = gguf.GGUFReader(full)
            for field in donor.fields.values():
                if field.name.startswith(("GGUF.", "general.architecture")):
                    continue
                writer.add_key_value(
                    field.name,
                    field.contents(),
                    field.types[0],
                    field.types[-1] if len(field.types) > 1 else None,
                )
        writer.add_uint16("split.no", index - 1)
        writer.add_uint16("split.count", 2)
        writer.add_int32("split.tensors.count", len(plan))
        for name, shape, qtype in part:
            block, size = GGML_QUANT_SIZES[qtype]
            byte_shape = (*reversed(shape[1:]), shape[0] // block * size)
            import numpy as np

            writer.add_tensor_info(
                name, byte_shape, np.dtype(np.uint8), tensor_bytes(qtype, shape), raw_dtype=qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
    single = read_header(tmp_path / "donor.gguf")
    split = read_header(tmp_path / "m-00002-of-00002.gguf")
    assert len(split.paths) == 2
    assert split.total_bytes == single.total_bytes
    assert split.layer_bytes == single.layer_bytes
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    with pytest.raises(Exception, match="missing m-00002-of-00002.gguf"):
        read_header(tmp_path / "m-00001-of-00002.gguf")


# ---------------------------------------------------------------------------------------------
# Hostile files, written byte by byte.


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", GGUFValueType.STRING) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<I", GGUFValueType.UINT32) + struct.pack("<I", value)


GOOD_KVS = [
    _kv_str("general.architecture", "llama"),
    _kv_u32("llama.block_count", 1),
    _kv_u32("llama.embedding_length", 256),
    _kv_u32("llama.attention.head_count", 2),
]


def _tensor(name: str, dims: tuple[int, ...], qtype: int = 0, offset: int = 0) -> bytes:
    return (
        _s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", qtype, offset)
    )


def _gguf(
    kvs: list[bytes],
    tensors: list[bytes] = (),
    version: int = 3,  # type: ignore[assignment]
    n_tensors: int | None = None,
    n_kv: int | None = None,
    pad: int = 0,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    return head + b"".join(kvs) + b"".join(tensors) + b"\0" * pad


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    return path


def test_minimal_valid_file(tmp_path: Path) -> None:
    header = read_header(
        _write(tmp_path, _gguf(GOOD_KVS, [_tensor("blk.0.x", (256, 4))], pad=4096))
    )
    assert header.n_layer == 1 and header.tensors[0].n_bytes == 4096


HOSTILE = {
    "not a GGUF": (b"PK\x03\x04 this is a zip file, honest" * 4, "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
    "magic only": (b"GGUF", "truncated"),
    "version 1": (_gguf(GOOD_KVS, version=1), "version 1 is not supported"),
    "version 99": (_gguf(GOOD_KVS, version=99), "version 99 is not supported"),
    "truncated header": (_gguf(GOOD_KVS)[:-9], "truncated"),
    "absurd tensor count": (_gguf(GOOD_KVS, n_tensors=2**60), "tensor table claims"),
    "absurd kv count": (_gguf(GOOD_KVS, n_kv=2**62), "metadata claims"),
    "string longer than file": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40) + b"key" + b"\0" * 32,
        "claims 1,099,511,627,776 entries",
    ),
    "array longer than file": (
        _gguf(
            [
                _s("general.architecture")
                + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT32, 2**50)
            ]
        ),
        "array 'general.architecture' claims",
    ),
    "string array longer than file": (
        _gguf(
            [
                _s("tokenizer.ggml.tokens")
                + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, 10**12)
            ]
        ),
        "claims 1,000,000,000,000 entries",
    ),
    "unknown value type": (
        _gguf([_s("k") + struct.pack("<I", 77) + b"\0" * 16]),
        "unknown value type 77",
    ),
    "duplicate key": (_gguf(GOOD_KVS + [GOOD_KVS[1]]), "appears twice"),
    "dimension overflow": (
        _gguf(GOOD_KVS, [_tensor("blk.0.x", (2**31, 2**31, 2**31))]),
        "overflows",
    ),
    "zero dimension": (_gguf(GOOD_KVS, [_tensor("blk.0.x", (256, 0))]), "impossible dimension"),
    "too many dims": (_gguf(GOOD_KVS, [_tensor("blk.0.x", (1,) * 7)]), "7 dimensions"),
    "unknown tensor type": (
        _gguf(GOOD_KVS, [_tensor("blk.0.x", (256,), qtype=999)]),
        "unknown ggml type 999",
    ),
    "row not whole blocks": (
        _gguf(GOOD_KVS, [_tensor("blk.0.x", (100, 2), qtype=int(GGMLQuantizationType.Q4_K))]),
        "not a multiple",
    ),
    "misaligned data": (_gguf(GOOD_KVS, [_tensor("blk.0.x", (256,), offset=3)]), "not aligned"),
    "no architecture": (_gguf(GOOD_KVS[1:]), "no general.architecture"),
    "unknown architecture": (
        _gguf([_kv_str("general.architecture", "skynet")] + GOOD_KVS[1:]),
        "architecture 'skynet' is unknown",
    ),
    "missing block count": (_gguf([GOOD_KVS[0]] + GOOD_KVS[2:]), "'llama.block_count' is missing"),
    "block count of wrong type": (
        _gguf([GOOD_KVS[0], _kv_str("llama.block_count", "many")] + GOOD_KVS[2:]),
        "should be an integer",
    ),
    "invalid utf-8": (
        _gguf([_kv_str("general.architecture", "x")[:-1] + b"\xff"]),
        "not valid UTF-8",
    ),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_file_raises_clear_error(tmp_path: Path, case: str) -> None:
    data, expected = HOSTILE[case]
    path = _write(tmp_path, data)
    with pytest.raises(GGUFError) as info:
        read_header(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # names the file
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file"):
        read_header(tmp_path / "nope.gguf")
