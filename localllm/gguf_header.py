"""Read a GGUF file's header (metadata and tensor infos) into an immutable `ModelHeader`.

Only the header is read, never tensor data: a 40 GB file costs a few megabytes of reads, and a
header-only file (tensor data missing or sparse) reads the same. The parser pulls bytes through a
`ByteSource`, so the same code reads a local file or, with HTTP range requests, a file on a hub.

Every count and length in the file is checked against the bytes that could hold it before anything
is allocated, so a hostile file gets a `GGUFError` naming the problem, never a huge allocation or a
hang. Format facts (value types, quantization block sizes, file-type names, key names) come from
gguf-py's own tables.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
    LlamaFileType,
)

from localllm.architectures import ARCHITECTURES, swa_period
from localllm.errors import GGUFError, ModelNotFoundError

SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
# Arrays longer than this keep only their length (a vocabulary has 10^5 strings; nobody needs them).
MAX_KEPT_ARRAY = 4096
# When a source cannot say its size, no single string may claim more than this.
MAX_STRING_BYTES = 256 * 1024 * 1024

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_KNOWN_ARCHITECTURES = frozenset(MODEL_ARCH_NAMES.values())


# llama.cpp's hard-coded sliding-window periods, now kept in localllm/architectures.py (kept here
# under the old name for code that imports it).
SWA_PERIODS: Mapping[str, int] = {
    arch: row.swa_period for arch, row in ARCHITECTURES.items() if row.swa_period
}

Scalar = int | float | bool | str
MetadataValue = Scalar | tuple[Scalar, ...]


class ByteSource(Protocol):
    """Where header bytes come from: a local file or a remote one read by ranges."""

    name: str

    @property
    def size(self) -> int | None: ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`; fewer only at the end of the data."""
        ...


class FileSource:
    """A local file, read with plain seeks and reads (no mmap: the file may be sparse or huge)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        try:
            self._file = path.open("rb")
        except OSError as exc:
            raise GGUFError(path, f"cannot open: {exc.strerror}") from None
        self._size = path.stat().st_size

    @property
    def size(self) -> int | None:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(length)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class ArraySummary:
    """A metadata array too long to keep: its element type and length."""

    item_type: str
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: str  # GGMLQuantizationType name, e.g. "Q4_K"
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    offset: int  # from the start of the data section of its file
    n_elements: int
    n_bytes: int
    split_index: int = 0

    @property
    def layer(self) -> int | None:
        """The repeating block this tensor belongs to (`blk.N.*`), or None."""
        if not self.name.startswith("blk."):
            return None
        index = self.name.split(".", 2)[1]
        return int(index) if index.isdigit() else None


@dataclass(frozen=True)
class ModelHeader:
    """What a GGUF's header says about a model, plus what follows from its tensor infos."""

    paths: tuple[Path, ...]  # one, or every file of a split set in order
    file_bytes: int  # sum of the files' sizes (as stored; may be larger than data when sparse)
    version: int
    metadata: Mapping[str, MetadataValue | ArraySummary]
    tensors: tuple[TensorInfo, ...]
    data_offsets: tuple[int, ...]  # where each file's tensor data starts
    architecture: str
    name: str | None
    file_type: str | None  # "Q4_K_M", "F16", ... from general.file_type
    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]  # per layer (GGUF allows per-layer arrays)
    n_head_kv: tuple[int, ...]  # per layer; 0 marks a layer without attention (recurrent)
    n_embd_head_k: int
    n_embd_head_v: int
    n_ff: tuple[int, ...]  # per layer
    n_vocab: int
    n_ctx_train: int
    sliding_window: int  # 0 when the model has no sliding-window layers
    swa_layers: tuple[bool, ...]  # per layer: does it use the sliding window
    n_expert: int
    n_expert_used: int
    chat_template: str | None
    data_complete: bool  # every tensor's bytes lie inside its file (False for header-only files)
    warnings: tuple[str, ...] = field(default=())

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @property
    def n_embd_k_gqa(self) -> tuple[int, ...]:
        """Key width per layer in the KV cache."""
        return tuple(self.n_embd_head_k * kv for kv in self.n_head_kv)

    @property
    def n_embd_v_gqa(self) -> tuple[int, ...]:
        return tuple(self.n_embd_head_v * kv for kv in self.n_head_kv)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def layer_bytes(self) -> tuple[int, ...]:
        """Bytes of each repeating block's tensors."""
        sizes = [0] * self.n_layer
        for tensor in self.tensors:
            layer = tensor.layer
            if layer is not None and layer < self.n_layer:
                sizes[layer] += tensor.n_bytes
        return tuple(sizes)

    @property
    def expert_layer_bytes(self) -> tuple[int, ...]:
        """Bytes of each block's MoE expert tensors (`ffn_*_exps`), what --cpu-moe keeps on host."""
        sizes = [0] * self.n_layer
        for tensor in self.tensors:
            layer = tensor.layer
            if layer is not None and layer < self.n_layer and "_exps" in tensor.name:
                sizes[layer] += tensor.n_bytes
        return tuple(sizes)

    def _tensor_bytes(self, name: str) -> int:
        return sum(t.n_bytes for t in self.tensors if t.name == name)

    @property
    def token_embd_bytes(self) -> int:
        return self._tensor_bytes("token_embd.weight")

    @property
    def output_bytes(self) -> int:
        """The output projection's bytes; for tied embeddings, those of the token embedding."""
        own = self._tensor_bytes("output.weight")
        return own if own else self.token_embd_bytes

    @property
    def output_tied(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)

    @property
    def non_repeating_bytes(self) -> int:
        """Everything outside the repeating blocks: embeddings, output, final norms."""
        return sum(t.n_bytes for t in self.tensors if t.layer is None)

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.n_params if self.n_params else 0.0

    def summary(self) -> dict[str, object]:
        """A JSON-friendly digest (for `localllm inspect --json`)."""
        return {
            "files": [str(p) for p in self.paths],
            "file_bytes": self.file_bytes,
            "gguf_version": self.version,
            "architecture": self.architecture,
            "name": self.name,
            "file_type": self.file_type,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": _compact(self.n_head),
            "n_head_kv": _compact(self.n_head_kv),
            "n_embd_head_k": self.n_embd_head_k,
            "n_embd_head_v": self.n_embd_head_v,
            "n_ff": _compact(self.n_ff),
            "n_vocab": self.n_vocab,
            "n_ctx_train": self.n_ctx_train,
            "sliding_window": self.sliding_window,
            "swa_layers": [i for i, swa in enumerate(self.swa_layers) if swa],
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_tensors": len(self.tensors),
            "n_params": self.n_params,
            "total_bytes": self.total_bytes,
            "bits_per_weight": round(self.bits_per_weight, 3),
            "layer_bytes": _compact(self.layer_bytes),
            "token_embd_bytes": self.token_embd_bytes,
            "output_bytes": self.output_bytes,
            "output_tied": self.output_tied,
            "non_repeating_bytes": self.non_repeating_bytes,
            "has_chat_template": self.has_chat_template,
            "data_complete": self.data_complete,
            "warnings": list(self.warnings),
        }


def _compact(values: tuple[int, ...]) -> int | list[int]:
    """One number when every layer agrees, else the per-layer list."""
    return values[0] if values and all(v == values[0] for v in values) else list(values)


# --------------------------------------------------------------------------------------------
# Low-level parsing


class _Cursor:
    """Sequential reads over a ByteSource, fetched in growing blocks, every length checked."""

    def __init__(self, source: ByteSource, first_block: int = 1 << 20) -> None:
        self.source = source
        self.size = source.size
        self.pos = 0
        self._buf = b""
        self._buf_start = 0
        self._block = first_block

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(self.source.name, problem)

    def remaining(self) -> int | None:
        return None if self.size is None else self.size - self.pos

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        buf_end = self._buf_start + len(self._buf)
        if self.pos < self._buf_start or end > buf_end:
            self._fill(n)
        start = self.pos - self._buf_start
        self.pos = end
        return memoryview(self._buf)[start : start + n]

    def _fill(self, n: int) -> None:
        # Keep the unread tail and fetch only what follows it: every byte is read once, in
        # order, which a remote source (and its header cache) relies on.
        buf_end = self._buf_start + len(self._buf)
        tail = (
            self._buf[self.pos - self._buf_start :]
            if self._buf_start <= self.pos < buf_end
            else b""
        )
        start = self.pos + len(tail)
        want = max(n - len(tail), self._block)
        self._block = min(self._block * 2, 64 << 20)  # remote sources: fewer, larger ranges
        data = tail + self.source.read_at(start, want)
        if len(data) < n:
            size = self.size if self.size is not None else self.pos + len(data)
            raise self.fail(
                f"header is truncated: needs {n} bytes at offset {self.pos}, file is {size} bytes"
            )
        self._buf = data
        self._buf_start = self.pos

    def unpack(self, fmt: str) -> Scalar:
        size = struct.calcsize(fmt)
        value: Scalar = struct.unpack_from(fmt, self.take(size))[0]
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def check_room(self, what: str, count: int, min_bytes_each: int) -> None:
        """Refuse a count that the rest of the file could not possibly hold."""
        remaining = self.remaining()
        limit = remaining if remaining is not None else MAX_STRING_BYTES
        if count * min_bytes_each > limit:
            raise self.fail(
                f"{what} claims {count:,} entries ({count * min_bytes_each:,}+ bytes) but only "
                f"{limit:,} bytes follow; the file is corrupt or truncated"
            )

    def string(self, what: str) -> str:
        length = self.u64()
        self.check_room(what, length, 1)
        raw = self.take(length)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8 at offset {self.pos - length}") from None

    def skip_string(self, what: str) -> None:
        length = self.u64()
        self.check_room(what, length, 1)
        self.take(length)

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` strings; the hot loop of a 10^5-token vocabulary, so it walks the buffer."""
        unpack_from = struct.unpack_from
        while count:
            buf, i = self._buf, self.pos - self._buf_start
            end = len(buf)
            while count and i + 8 <= end:
                length = unpack_from("<Q", buf, i)[0]
                if i + 8 + length > end:
                    break
                i += 8 + length
                count -= 1
            self.pos = self._buf_start + i
            if count:  # the next string straddles the buffer: the checked slow path refills
                self.skip_string(what)
                count -= 1


def _value_type(cursor: _Cursor, raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cursor.fail(f"metadata key {key!r} has unknown value type {raw}") from None


def _read_value(cursor: _Cursor, vtype: GGUFValueType, key: str) -> MetadataValue | ArraySummary:
    if vtype == GGUFValueType.STRING:
        return cursor.string(f"metadata {key!r}")
    if vtype != GGUFValueType.ARRAY:
        return cursor.unpack(_SCALAR_FORMATS[vtype])
    item_type = _value_type(cursor, cursor.u32(), key)
    length = cursor.u64()
    if item_type == GGUFValueType.ARRAY:
        raise cursor.fail(f"metadata {key!r} is a nested array, which localllm does not read")
    if item_type == GGUFValueType.STRING:
        cursor.check_room(f"array {key!r}", length, 8)
        if length > MAX_KEPT_ARRAY:
            cursor.skip_strings(length, f"array {key!r}")
            return ArraySummary(item_type.name, length)
        return tuple(cursor.string(f"array {key!r}") for _ in range(length))
    fmt = _SCALAR_FORMATS[item_type]
    item_size = struct.calcsize(fmt)
    cursor.check_room(f"array {key!r}", length, item_size)
    raw = cursor.take(length * item_size)
    if length > MAX_KEPT_ARRAY:
        return ArraySummary(item_type.name, length)
    values: tuple[Scalar, ...] = tuple(v[0] for v in struct.iter_unpack(fmt, raw))
    return values


@dataclass(frozen=True)
class _RawFile:
    name: str
    size: int | None
    version: int
    metadata: dict[str, MetadataValue | ArraySummary]
    tensors: list[TensorInfo]
    data_offset: int


def _tensor_type(cursor: _Cursor, raw: int, name: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        raise cursor.fail(f"tensor {name!r} has unknown ggml type {raw}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise cursor.fail(f"tensor {name!r} has ggml type {qtype.name} with no known size")
    return qtype


def parse_source(source: ByteSource, split_index: int = 0) -> _RawFile:
    """Parse one GGUF file's header from a source. Raises GGUFError on anything malformed."""
    cursor = _Cursor(source)
    if source.size is not None and source.size < 4:
        raise cursor.fail(f"not a GGUF file: only {source.size} bytes")
    magic = cursor.take(4)
    if struct.unpack("<I", magic)[0] != GGUF_MAGIC:
        raise cursor.fail(f"not a GGUF file (starts with {bytes(magic)!r}, expected b'GGUF')")
    version = cursor.u32()
    if version not in SUPPORTED_VERSIONS:
        raise cursor.fail(
            f"GGUF version {version} is not supported (localllm reads versions 2 and 3; "
            "re-convert the model with a current llama.cpp)"
        )
    n_tensors = cursor.u64()
    n_kv = cursor.u64()
    # Smallest possible entries: a key/value is 8+0+4+1 bytes, a tensor info 8+0+4+8+4+8 bytes.
    cursor.check_room("metadata", n_kv, 13)
    cursor.check_room("tensor table", n_tensors, 32)

    metadata: dict[str, MetadataValue | ArraySummary] = {}
    for _ in range(n_kv):
        key = cursor.string("metadata key")
        vtype = _value_type(cursor, cursor.u32(), key)
        if key in metadata:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        metadata[key] = _read_value(cursor, vtype, key)

    infos = []
    for _ in range(n_tensors):
        name = cursor.string("tensor name")
        n_dims = cursor.u32()
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        shape = tuple(cursor.u64() for _ in range(n_dims))
        qtype = _tensor_type(cursor, cursor.u32(), name)
        offset = cursor.u64()
        infos.append((name, shape, qtype, offset))

    alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cursor.pos // alignment) * alignment

    tensors = []
    seen: set[str] = set()
    for name, shape, qtype, offset in infos:
        if name in seen:
            raise cursor.fail(f"tensor {name!r} appears twice")
        seen.add(name)
        tensors.append(_tensor_info(cursor, name, shape, qtype, offset, alignment, split_index))
    return _RawFile(source.name, source.size, version, metadata, tensors, data_offset)


def _tensor_info(
    cursor: _Cursor,
    name: str,
    shape: tuple[int, ...],
    qtype: GGMLQuantizationType,
    offset: int,
    alignment: int,
    split_index: int,
) -> TensorInfo:
    n_elements = 1
    for dim in shape:
        if dim == 0 or dim >= 1 << 62:
            raise cursor.fail(f"tensor {name!r} has an impossible dimension {dim} in {shape}")
        n_elements *= dim
        if n_elements >= 1 << 62:
            raise cursor.fail(f"tensor {name!r} shape {shape} overflows (too many elements)")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block_size:
        raise cursor.fail(
            f"tensor {name!r} row of {shape[0]} is not a multiple of "
            f"{qtype.name}'s block {block_size}"
        )
    if offset % alignment:
        raise cursor.fail(f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
    n_bytes = n_elements // block_size * type_size
    return TensorInfo(name, qtype.name, shape, offset, n_elements, n_bytes, split_index)


# --------------------------------------------------------------------------------------------
# From raw files to a ModelHeader


def _int_key(raw: _RawFile, meta: Mapping[str, object], key: str, required: bool = True) -> int:
    value = meta.get(key)
    if value is None:
        if required:
            raise GGUFError(raw.name, f"required key {key!r} is missing; is this a model file?")
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(raw.name, f"key {key!r} should be an integer, found {value!r}")
    return value


def _per_layer(
    raw: _RawFile, meta: Mapping[str, object], key: str, n_layer: int, default: int | None = None
) -> tuple[int, ...]:
    """A hyperparameter stored either as one integer or as one per layer."""
    value = meta.get(key)
    if value is None:
        if default is None:
            raise GGUFError(raw.name, f"required key {key!r} is missing; is this a model file?")
        return (default,) * n_layer
    if isinstance(value, tuple):
        if len(value) != n_layer or not all(isinstance(v, int) for v in value):
            raise GGUFError(raw.name, f"key {key!r} should hold {n_layer} integers, one per layer")
        return tuple(int(v) for v in value)
    return (_int_key(raw, meta, key),) * n_layer


def _swa_layers(
    raw: _RawFile, meta: Mapping[str, object], arch: str, n_layer: int
) -> tuple[bool, ...]:
    if not _int_key(raw, meta, Keys.Attention.SLIDING_WINDOW.format(arch=arch), required=False):
        return (False,) * n_layer
    pattern = meta.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch))
    if isinstance(pattern, tuple):  # one flag per layer, tiled when shorter
        flags = [bool(v) for v in pattern] or [True]
        return tuple(flags[il % len(flags)] for il in range(n_layer))
    period = pattern if isinstance(pattern, int) and not isinstance(pattern, bool) else None
    if period is None:
        period = swa_period(arch) or 0  # llama.cpp's hard-coded period (architectures.py)
    # llama.cpp: period 0 makes every layer slide; otherwise the last of each period is global.
    return tuple(period == 0 or il % period < period - 1 for il in range(n_layer))


def _file_type_name(value: object) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"type {value}"


def build_header(raws: Sequence[_RawFile], paths: Sequence[Path]) -> ModelHeader:
    """Combine the parsed file(s) of one model into a ModelHeader, validating the model keys."""
    first = raws[0]
    meta = first.metadata
    arch = meta.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise GGUFError(first.name, "no general.architecture key: this is not a model GGUF")
    warnings: list[str] = []
    if arch not in _KNOWN_ARCHITECTURES:
        raise GGUFError(
            first.name,
            f"architecture {arch!r} is unknown to this gguf/llama.cpp version; "
            "upgrade localllm's llama.cpp or use a model of a supported architecture",
        )

    def key(template: str) -> str:
        return template.format(arch=arch)

    n_layer = _int_key(first, meta, key(Keys.LLM.BLOCK_COUNT))
    if not 0 < n_layer <= 4096:
        raise GGUFError(first.name, f"{key(Keys.LLM.BLOCK_COUNT)} = {n_layer} is not plausible")
    n_embd = _int_key(first, meta, key(Keys.LLM.EMBEDDING_LENGTH))
    n_head = _per_layer(first, meta, key(Keys.Attention.HEAD_COUNT), n_layer)
    n_head_kv = _per_layer(first, meta, key(Keys.Attention.HEAD_COUNT_KV), n_layer, max(n_head))
    max_head = max(n_head) or 1
    n_embd_head_k = _int_key(first, meta, key(Keys.Attention.KEY_LENGTH), required=False)
    n_embd_head_v = _int_key(first, meta, key(Keys.Attention.VALUE_LENGTH), required=False)
    n_embd_head_k = n_embd_head_k or n_embd // max_head
    n_embd_head_v = n_embd_head_v or n_embd // max_head
    n_ff = _per_layer(first, meta, key(Keys.LLM.FEED_FORWARD_LENGTH), n_layer, 0)

    tensors = tuple(t for raw in raws for t in raw.tensors)
    n_vocab = _int_key(first, meta, key(Keys.LLM.VOCAB_SIZE), required=False)
    if not n_vocab:
        tokens = meta.get(Keys.Tokenizer.LIST)
        if isinstance(tokens, ArraySummary):
            n_vocab = tokens.length
        elif isinstance(tokens, tuple):
            n_vocab = len(tokens)
    if not n_vocab:
        embd = [t for t in tensors if t.name == "token_embd.weight"]
        n_vocab = embd[0].shape[1] if embd and len(embd[0].shape) > 1 else 0

    split_count = _int_key(first, meta, Keys.Split.LLM_KV_SPLIT_COUNT, required=False) or 1
    if split_count != len(raws):
        raise GGUFError(first.name, f"split set has {len(raws)} files but declares {split_count}")
    declared = _int_key(first, meta, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, required=False)
    if declared and declared != len(tensors):
        raise GGUFError(
            first.name, f"split set declares {declared} tensors, files hold {len(tensors)}"
        )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise GGUFError(first.name, "a tensor name appears in more than one split file")

    data_complete = True
    for raw in raws:
        end = max((raw.data_offset + t.offset + t.n_bytes for t in raw.tensors), default=0)
        if raw.size is not None and end > raw.size:
            data_complete = False
            warnings.append(
                f"{raw.name}: tensor data ends at byte {end:,} but the file has {raw.size:,} bytes "
                "(header-only or incomplete download; it cannot be loaded)"
            )

    template = meta.get(Keys.Tokenizer.CHAT_TEMPLATE)
    name = meta.get(Keys.General.NAME)
    file_bytes = sum(raw.size or 0 for raw in raws)
    return ModelHeader(
        paths=tuple(paths),
        file_bytes=file_bytes,
        version=first.version,
        metadata=meta,
        tensors=tensors,
        data_offsets=tuple(raw.data_offset for raw in raws),
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=_file_type_name(meta.get(Keys.General.FILE_TYPE)),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_embd_head_k=n_embd_head_k,
        n_embd_head_v=n_embd_head_v,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=_int_key(first, meta, key(Keys.LLM.CONTEXT_LENGTH), required=False),
        sliding_window=_int_key(first, meta, key(Keys.Attention.SLIDING_WINDOW), required=False),
        swa_layers=_swa_layers(first, meta, arch, n_layer),
        n_expert=_int_key(first, meta, key(Keys.LLM.EXPERT_COUNT), required=False),
        n_expert_used=_int_key(first, meta, key(Keys.LLM.EXPERT_USED_COUNT), required=False),
        chat_template=template if isinstance(template, str) else None,
        data_complete=data_complete,
        warnings=tuple(warnings),
    )


# llama.cpp's split files (llama.h llama_split_path): NAME-00001-of-00003.gguf
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


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


def read_sources(sources: Iterable[ByteSource], paths: Sequence[Path]) -> ModelHeader:
    """A ModelHeader from already-open sources (one per split file, in order)."""
    raws = [parse_source(source, index) for index, source in enumerate(sources)]
    return build_header(raws, paths)


def read_header(path: Path | str, opener: Callable[[Path], FileSource] = FileSource) -> ModelHeader:
    """Read a local GGUF's header; given any file of a split set, read the whole set."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(path, "no such file")
    parts = split_set(path)
    opened = [opener(part) for part in parts]
    try:
        return read_sources(opened, parts)
    finally:
        for source in opened:
            source.close()
