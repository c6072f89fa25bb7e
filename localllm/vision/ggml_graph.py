"""A compute graph's buffer size, found the way ggml's graph allocator finds it.

llama.cpp sizes an image encoder's compute buffer by building the encoder's graph for one warm-up
image and running ggml's graph allocator over it (`ggml_gallocr_reserve`, `ggml/src/ggml-alloc.c`):
tensors are placed in graph order into one growing buffer, best fit among the free blocks, a
tensor reuses its parent's memory when the op may run in place, and memory is freed when a
tensor's last consumer has run. The buffer's size is the highest offset reached, fragmentation
included, which no closed formula reproduces for every shape.

This module mirrors that: `Graph` records the ops an encoder's graph builder makes (only their
shapes, types and sources: no data), in the order ggml's `ggml_build_forward_expand` visits
them, and `Graph.buffer_bytes` replays the allocator over it. Pure and quick: a 32-layer encoder
is a few thousand nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

F32, F16, I32 = "f32", "f16", "i32"
TYPE_BYTES = {F32: 4, F16: 2, I32: 4}
# ggml_op_can_inplace: the ops that may write into their first fitting parent's memory
_INPLACE = frozenset(
    {"add", "sub", "mul", "scale", "unary", "rope", "rms_norm", "soft_max", "clamp"}
)


@dataclass(eq=False)
class Tensor:
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    dtype: str
    op: str  # "none" for leafs (weights, inputs)
    src: list[Tensor] = field(default_factory=list)
    view_src: Tensor | None = None
    external: bool = False  # weights: in their own buffer, never counted
    name: str = ""

    @property
    def n_bytes(self) -> int:
        size = TYPE_BYTES[self.dtype]
        return size + sum((n - 1) * b for n, b in zip(self.ne, self.nb, strict=True))

    def same_layout(self, other: Tensor) -> bool:
        return self.dtype == other.dtype and self.ne == other.ne and self.nb == other.nb


def _contiguous(ne: tuple[int, ...], dtype: str) -> tuple[tuple[int, int, int, int],
                                                          tuple[int, int, int, int]]:
    full = (tuple(ne) + (1, 1, 1, 1))[:4]
    nb = [TYPE_BYTES[dtype]]
    for n in full[:3]:
        nb.append(nb[-1] * n)
    return (full[0], full[1], full[2], full[3]), (nb[0], nb[1], nb[2], nb[3])


class Graph:
    """The ops of one graph, built as llama.cpp's graph builder builds them."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []

    # ------------------------------------------------------------------ tensors
    def new(self, ne: tuple[int, ...], dtype: str = F32, op: str = "none",
            src: list[Tensor] | None = None, name: str = "") -> Tensor:
        full, nb = _contiguous(ne, dtype)
        return Tensor(full, nb, dtype, op, list(src or []), name=name)

    def weight(self, *ne: int, dtype: str = F16) -> Tensor:
        tensor = self.new(ne, dtype)
        tensor.external = True
        return tensor

    def input(self, *ne: int, dtype: str = F32, name: str = "") -> Tensor:
        tensor = self.new(ne, dtype, name=name)
        self.inputs.append(tensor)
        return tensor

    def _view(self, a: Tensor, ne: tuple[int, ...], nb: tuple[int, ...], op: str) -> Tensor:
        full = (tuple(ne) + (1, 1, 1, 1))[:4]
        nbs = tuple(nb)
        while len(nbs) < 4:
            nbs = nbs + (nbs[-1] * full[len(nbs) - 1],)
        root = a.view_src or a
        return Tensor((full[0], full[1], full[2], full[3]), (nbs[0], nbs[1], nbs[2], nbs[3]),
                      a.dtype, op, [a], view_src=root)

    # ------------------------------------------------------------------ ops (ggml.c)
    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        full, nb = _contiguous(ne, a.dtype)
        return self._view(a, full, nb, "reshape")

    def view(self, a: Tensor, ne: tuple[int, ...], nb: tuple[int, ...]) -> Tensor:
        return self._view(a, ne, (TYPE_BYTES[a.dtype], *nb), "view")

    def permute(self, a: Tensor, *axes: int) -> Tensor:
        ne, nb = [0] * 4, [0] * 4
        for i, axis in enumerate(axes):
            ne[axis], nb[axis] = a.ne[i], a.nb[i]
        return self._view(a, tuple(ne), tuple(nb), "permute")

    def transpose(self, a: Tensor) -> Tensor:
        ne, nb = list(a.ne), list(a.nb)
        ne[0], ne[1], nb[0], nb[1] = ne[1], ne[0], nb[1], nb[0]
        return self._view(a, tuple(ne), tuple(nb), "transpose")

    def pool_2d(self, a: Tensor, kernel: int) -> Tensor:
        """ggml_pool_2d with stride = kernel, no padding."""
        ne = (a.ne[0] // kernel, a.ne[1] // kernel, a.ne[2], a.ne[3])
        return self.new(ne, F32, "pool_2d", [a])

    def cont(self, a: Tensor, *ne: int) -> Tensor:
        return self.new(ne or a.ne, a.dtype, "cont", [a])

    def cast(self, a: Tensor, dtype: str) -> Tensor:
        result = self.new(a.ne, dtype, "cpy", [a])
        result.src.append(result)  # ggml_cast's self-reference
        return result

    def unary(self, a: Tensor, op: str) -> Tensor:
        return self.new(a.ne, a.dtype, op, [a])

    def binary(self, a: Tensor, b: Tensor, op: str) -> Tensor:
        return self.new(a.ne, a.dtype, op, [a, b])

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self.binary(a, b, "add")

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self.binary(a, b, "mul")

    def mul_mat(self, a: Tensor, b: Tensor) -> Tensor:
        return self.new((a.ne[1], b.ne[1], b.ne[2], b.ne[3]), F32, "mul_mat", [a, b])

    def im2col(self, kernel: Tensor, image: Tensor, stride: int, dtype: str = "") -> Tensor:
        ow, oh = image.ne[0] // stride, image.ne[1] // stride
        ne = (kernel.ne[0] * kernel.ne[1] * kernel.ne[2], ow, oh, image.ne[3])
        dtype = dtype or (F32 if kernel.dtype == "bf16" else F16)  # ggml_conv_2d's choice
        return self.new(ne, dtype, "im2col", [kernel, image])

    def conv_2d(self, kernel: Tensor, image: Tensor, stride: int) -> Tensor:
        """ggml_conv_2d: im2col, one matrix product, a permuted copy."""
        cols = self.im2col(kernel, image, stride)
        flat = self.reshape(cols, cols.ne[0], cols.ne[3] * cols.ne[2] * cols.ne[1])
        k = self.reshape(kernel, kernel.ne[0] * kernel.ne[1] * kernel.ne[2], kernel.ne[3])
        out = self.mul_mat(flat, k)
        out = self.reshape(out, cols.ne[1], cols.ne[2], cols.ne[3], kernel.ne[3])
        return self.cont(self.permute(out, 0, 1, 3, 2))

    def repeat(self, a: Tensor, *ne: int) -> Tensor:
        return self.new(ne, a.dtype, "repeat", [a])

    def get_rows(self, a: Tensor, rows: Tensor) -> Tensor:
        dtype = I32 if a.dtype == I32 else F32
        return self.new((a.ne[0], rows.ne[0], rows.ne[1], rows.ne[2]), dtype, "get_rows",
                        [a, rows])

    def concat(self, a: Tensor, b: Tensor, dim: int = 0) -> Tensor:
        ne = list(a.ne)
        ne[dim] += b.ne[dim]
        return self.new(tuple(ne), a.dtype, "concat", [a, b])

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        src = [q, k, v] + ([mask] if mask is not None else [])
        return self.new((v.ne[0], q.ne[2], q.ne[1], q.ne[3]), F32, "flash_attn_ext", src)

    def soft_max(self, a: Tensor, mask: Tensor | None) -> Tensor:
        return self.new(a.ne, a.dtype, "soft_max", [a] + ([mask] if mask is not None else []))

    def glu_split(self, a: Tensor, b: Tensor) -> Tensor:
        return self.new(a.ne, a.dtype, "glu", [a, b])

    # ------------------------------------------------------------------ order and allocation
    def order(self, outputs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(nodes, leafs) in ggml_visit_parents' depth-first, sources-left-to-right order; each
        of `outputs` is expanded in turn (ggml_build_forward_order/expand)."""
        seen: set[int] = set()
        nodes: list[Tensor] = []
        leafs: list[Tensor] = []
        for out in outputs:
            stack: list[tuple[Tensor, int]] = [(out, 0)]
            seen.add(id(out))
            while stack:
                tensor, i = stack.pop()
                if i < len(tensor.src):
                    stack.append((tensor, i + 1))
                    child = tensor.src[i]
                    if id(child) not in seen:
                        seen.add(id(child))
                        stack.append((child, 0))
                    continue
                (leafs if tensor.op == "none" else nodes).append(tensor)
        return nodes, leafs

    def buffer_bytes(self, outputs: list[Tensor], alignment: int) -> int:
        """The compute buffer `ggml_gallocr_reserve` sizes for this graph (one buffer)."""
        nodes, leafs = self.order(outputs)
        return _Allocator(alignment).run(nodes, leafs, {id(t) for t in self.inputs})


class _Allocator:
    """ggml_dyn_tallocr with one chunk, driven as ggml_gallocr_alloc_graph_impl drives it."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.free: list[list[int]] = [[0, 1 << 62]]  # [offset, size], sorted; the last is open
        self.max_size = 0
        self.offset: dict[int, int] = {}
        self.allocated: set[int] = set()
        self.children: dict[int, int] = {}
        self.views: dict[int, int] = {}

    def _aligned(self, size: int) -> int:
        return -(-size // self.alignment) * self.alignment

    def _alloc(self, size: int) -> int:
        size = self._aligned(size)
        best, best_size = -1, None
        for i, (_, block_size) in enumerate(self.free[:-1]):
            if block_size >= size and (best_size is None or block_size <= best_size):
                best, best_size = i, block_size
        if best == -1:
            best = len(self.free) - 1
        block = self.free[best]
        offset = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.free[best]
        self.max_size = max(self.max_size, offset + size)
        return offset

    def _free_bytes(self, offset: int, size: int) -> None:
        size = self._aligned(size)
        for i, block in enumerate(self.free):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(self.free) and block[0] + block[1] == self.free[i + 1][0]:
                    block[1] += self.free[i + 1][1]
                    del self.free[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == block[0]:
                    self.free[i - 1][1] += block[1]
                    del self.free[i]
                return
        pos = 0
        while pos < len(self.free) and self.free[pos][0] < offset:
            pos += 1
        self.free.insert(pos, [offset, size])

    def _allocate(self, node: Tensor) -> None:
        key = id(node)
        if node.external or key in self.allocated or node.view_src is not None:
            return
        self.allocated.add(key)
        if node.op in _INPLACE:
            for parent in node.src:
                # a view is never "own" (never allocated itself), so only whole tensors qualify
                pk = id(parent)
                if pk not in self.allocated or not node.same_layout(parent):
                    continue
                if self.children.get(pk, 0) == 1 and self.views.get(pk, 0) == 0:
                    self.offset[key] = self.offset[pk]
                    self.allocated.discard(pk)  # the node owns that memory now
                    self._free_extra(node, parent)
                    return
        self.offset[key] = self._alloc(node.n_bytes)

    def _free_extra(self, node: Tensor, parent: Tensor) -> None:
        parent_size, node_size = self._aligned(parent.n_bytes), self._aligned(node.n_bytes)
        if parent_size > node_size:
            self._free_bytes(self.offset[id(node)] + node_size, parent_size - node_size)

    def _release(self, t: Tensor) -> None:
        self._free_bytes(self.offset[id(t)], t.n_bytes)
        self.allocated.discard(id(t))

    def run(self, nodes: list[Tensor], leafs: list[Tensor], inputs: set[int]) -> int:
        for leaf in leafs:
            self._allocate(leaf)
        for node in nodes:
            if node.view_src is not None:
                rk = id(node.view_src)
                self.views[rk] = self.views.get(rk, 0) + 1
            for src in node.src:
                self.children[id(src)] = self.children.get(id(src), 0) + 1
                if id(src) in inputs:
                    self._allocate(src)
        for node in nodes:
            for parent in node.src:
                self._allocate(parent)
            self._allocate(node)
            for parent in node.src:
                pk = id(parent)
                self.children[pk] -= 1
                if self.children[pk] == 0 and self.views.get(pk, 0) == 0:
                    if parent.view_src is not None:
                        root = parent.view_src
                        rk = id(root)
                        self.views[rk] -= 1
                        if self.views[rk] == 0 and self.children.get(rk, 0) == 0 and \
                                rk in self.allocated:
                            self._release(root)
                    elif pk in self.allocated:
                        self._release(parent)
        return self.max_size
