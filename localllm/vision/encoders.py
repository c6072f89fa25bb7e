"""Image-encoder graphs as llama.cpp builds them (`tools/mtmd/models/*.cpp`), for sizing their
compute buffer with `ggml_graph`: the same ops, shapes and order, no data.

    qwen2vl_buffer_bytes(shape, width, height, flash_attn, alignment)
        clip_graph_qwen2vl: Qwen2-VL and Qwen2.5-VL (window attention, gated FFN, M-RoPE)
    qwen3vl_buffer_bytes(shape, width, height, flash_attn, alignment)
        clip_graph_qwen3vl: Qwen3-VL (fused QKV, learned positions resized, deepstack mergers)
    gemma3_buffer_bytes(shape, width, height, flash_attn, alignment)
        clip_graph_siglip for Gemma 3: build_vit, average pooling, the projection
    idefics3_buffer_bytes(shape, width, height, flash_attn, alignment)
        clip_graph_siglip for Idefics3 / SmolVLM: build_vit, pixel unshuffle, the projection
    pixtral_buffer_bytes(shape, width, height, flash_attn, alignment)
        clip_graph_pixtral: Pixtral, Mistral Small 3.x (2D RoPE, patch merger, [IMG_BREAK])
    gemma4_buffer_bytes(shape, width, height, flash_attn, alignment)
        clip_graph_gemma4v: Gemma 4 (clamped linears, per-head norms, 2D RoPE, pooling)
    internvl_buffer_bytes(shape, width, height, flash_attn, alignment, n_batch)
        clip_graph_internvl: InternVL (a CLS token, layer scales, pixel shuffle)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from localllm.vision.ggml_graph import F16, F32, I32, Graph, Tensor


@dataclass(frozen=True)
class EncoderShape:
    """What the graph builder reads from a projector's header."""

    patch_size: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int
    projection_dim: int
    n_merge: int = 2
    n_wa_pattern: int = 0  # every n-th layer full attention, the others within windows; 0: none
    rms_norm: bool = False  # RMS norms, no bias (Qwen2.5-VL, Pixtral) or layer norms with bias
    ffn_gate: bool = False  # a gated FFN (SwiGLU) or a plain one
    pre_norm: bool = False
    post_norm: bool = True
    kernel_dtype: str = F16
    # Qwen3-VL: learned positions on a side x side grid (resized to the image), deepstack
    # mergers after these blocks
    pos_embd_side: int = 0
    deepstack_layers: tuple[int, ...] = ()
    patch_bias: bool = False  # v.patch_embd.bias
    linear_bias: bool = True  # the encoder's matrices have biases (Pixtral's do not)
    img_break: bool = False  # Pixtral: an [IMG_BREAK] embedding after each row of tokens
    projector_bias: bool = True  # the projector's (mm.*) matrices have biases
    std_scale: bool = False  # Gemma 4: v.std_bias / v.std_scale after pooling
    layer_scale: bool = False  # InternVL: ls1 / ls2 after attention and FFN


def _norm(g: Graph, cur: Tensor, shape: EncoderShape) -> Tensor:
    e = shape.n_embd
    if shape.rms_norm:
        return g.mul(g.unary(cur, "rms_norm"), g.weight(e, dtype=F32))
    cur = g.mul(g.unary(cur, "norm"), g.weight(e, dtype=F32))
    return g.add(cur, g.weight(e, dtype=F32))


def _linear(g: Graph, cur: Tensor, n_in: int, n_out: int, bias: bool = True) -> Tensor:
    out = g.mul_mat(g.weight(n_in, n_out), cur)
    return g.add(out, g.weight(n_out, dtype=F32)) if bias else out


def _ffn(
    g: Graph, cur: Tensor, n_in: int, n_ff: int, n_out: int, gated: bool, bias: bool = True
) -> Tensor:
    """clip_graph::build_ffn: up (+ gate), the activation, down."""
    up = _linear(g, cur, n_in, n_ff, bias)
    if gated:
        act = g.glu_split(_linear(g, cur, n_in, n_ff, bias), up)
    else:
        act = g.unary(up, "unary")
    return _linear(g, act, n_ff, n_out, bias)


def _attention(
    g: Graph, roots: list[Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
    shape: EncoderShape, flash_attn: bool,
) -> Tensor:
    """clip_graph::build_attn; q, k, v are [d_head, n_head, n_pos]."""
    roots += [q, k, v]  # ggml_build_forward_order: these three join the graph first
    d_head, n_head, n_pos = q.ne[0], q.ne[1], q.ne[2]
    qp = g.permute(q, 0, 2, 1, 3)
    kp = g.permute(k, 0, 2, 1, 3)
    if flash_attn:
        vp = g.cast(g.permute(v, 0, 2, 1, 3), F16)
        kp = g.cast(kp, F16)
        if mask is not None:
            mask = g.cast(mask, F16)
        out = g.flash_attn(qp, kp, vp, mask)
        cur = g.reshape(out, out.ne[0] * out.ne[1], out.ne[2] * out.ne[3])
    else:
        vp = g.cont(g.permute(v, 1, 2, 0, 3))
        kq = g.soft_max(g.mul_mat(kp, qp), mask)
        kqv = g.mul_mat(vp, kq)
        cur = g.cont(g.permute(kqv, 0, 2, 1, 3), d_head * n_head, n_pos)
    return _linear(g, cur, shape.n_embd, shape.n_embd, shape.linear_bias)


def _patches(g: Graph, shape: EncoderShape, width: int, height: int) -> Tensor:
    """build_inp_with_temporal_merge for a still image: two patch convolutions, added."""
    p, e = shape.patch_size, shape.n_embd
    image = g.input(width, height, 3, 1, name="inp_raw")
    return g.add(g.conv_2d(g.weight(p, p, 3, e, dtype=shape.kernel_dtype), image, p),
                 g.conv_2d(g.weight(p, p, 3, e, dtype=shape.kernel_dtype), image, p))


def _merge_order(g: Graph, inp: Tensor, e: int, px: int, py: int) -> Tensor:
    """[px, py, e] patches into [e, px * py] with each 2x2 block of patches adjacent."""
    inp = g.cont(inp, e * 2, px // 2, py, 1)
    inp = g.reshape(inp, e * 2, px // 2, 2, py // 2)
    inp = g.permute(inp, 0, 2, 1, 3)
    return g.cont(inp, e, px * py, 1)


def qwen2vl_buffer_bytes(
    shape: EncoderShape, width: int, height: int, flash_attn: bool, alignment: int
) -> int:
    """The compute buffer of `clip_graph_qwen2vl::build` for one image of width x height px."""
    g = Graph()
    roots: list[Tensor] = []
    p, e = shape.patch_size, shape.n_embd
    px, py = width // p, height // p
    n_pos = px * py
    d_head = e // shape.n_head

    inpl = _merge_order(g, g.permute(_patches(g, shape, width, height), 1, 2, 0, 3), e, px, py)
    positions = g.input(n_pos * 4, dtype=I32, name="positions")
    if shape.pre_norm:
        inpl = _norm(g, inpl, shape)
    window_mask: Tensor | None = None
    if shape.n_wa_pattern > 0:
        inv_window_idx = g.input(n_pos // 4, dtype=I32, name="inv_window_idx")
        window_mask = g.input(n_pos, n_pos, name="window_mask")
        if flash_attn:
            window_mask = g.cast(window_mask, F16)
        inpl = g.get_rows(g.reshape(inpl, e * 4, n_pos // 4), inv_window_idx)
        inpl = g.reshape(inpl, e, n_pos, 1)

    for il in range(shape.n_layer):
        full = (il + 1) % shape.n_wa_pattern == 0 if shape.n_wa_pattern > 0 else True
        cur = _norm(g, inpl, shape)
        q = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos)
        k = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos)
        v = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos)
        q = g.binary(q, positions, "rope")
        k = g.binary(k, positions, "rope")
        cur = _attention(g, roots, q, k, v, None if full else window_mask, shape, flash_attn)
        inpl = g.add(cur, inpl)
        cur = _ffn(g, _norm(g, inpl, shape), e, shape.n_ff, e, shape.ffn_gate)
        inpl = g.add(inpl, cur)

    if shape.post_norm:
        inpl = _norm(g, inpl, shape)
    emb = g.reshape(inpl, e * 4, n_pos // 4, 1)
    emb = _ffn(g, emb, e * 4, e * 4, shape.projection_dim, gated=False)
    if shape.n_wa_pattern > 0:
        window_idx = g.input(n_pos // 4, dtype=I32, name="window_idx")
        emb = g.reshape(emb, shape.projection_dim, n_pos // 4)
        emb = g.reshape(g.get_rows(emb, window_idx), shape.projection_dim, n_pos // 4, 1)
    return g.buffer_bytes([*roots, emb], alignment)


def qwen3vl_buffer_bytes(
    shape: EncoderShape, width: int, height: int, flash_attn: bool, alignment: int
) -> int:
    """The compute buffer of `clip_graph_qwen3vl::build` for one image of width x height px."""
    g = Graph()
    roots: list[Tensor] = []
    p, e = shape.patch_size, shape.n_embd
    px, py = width // p, height // p
    n_pos = px * py
    d_head = e // shape.n_head
    merged = 4 * e

    inp = _merge_order(g, g.permute(_patches(g, shape, width, height), 1, 2, 0, 3), e, px, py)
    inp = g.add(inp, g.weight(e, dtype=F32))  # the patch bias
    # resize_position_embeddings: the learned grid, interpolated when the image's differs
    side = shape.pos_embd_side
    pos = g.weight(e, side * side, dtype=F32)
    if (px, py) != (side, side):
        grid = g.permute(g.reshape(pos, e, side, side), 2, 0, 1, 3)
        scaled = g.new((px, py, e, 1), F32, "upscale", [grid])
        pos = g.cont(g.permute(scaled, 1, 2, 0, 3), e, px * py)
    inp = g.add(inp, _merge_order(g, pos, e, px, py))
    inpl = inp
    positions = g.input(n_pos * 4, dtype=I32, name="positions")
    if shape.pre_norm:
        inpl = _norm(g, inpl, shape)

    deepstack: Tensor | None = None
    for il in range(shape.n_layer):
        cur = _norm(g, inpl, shape)
        qkv = _linear(g, cur, e, 3 * e)
        row = qkv.nb[1]
        q = g.view(qkv, (d_head, shape.n_head, n_pos), (4 * d_head, row))
        k = g.view(qkv, (d_head, shape.n_head, n_pos), (4 * d_head, row))
        v = g.view(qkv, (d_head, shape.n_head, n_pos), (4 * d_head, row))
        q = g.binary(q, positions, "rope")
        k = g.binary(k, positions, "rope")
        cur = _attention(g, roots, q, k, v, None, shape, flash_attn)
        inpl = g.add(cur, inpl)
        cur = _ffn(g, _norm(g, inpl, shape), e, shape.n_ff, e, shape.ffn_gate)
        cur = g.add(inpl, cur)
        if il in shape.deepstack_layers:
            feat = g.reshape(cur, merged, n_pos // 4, 1)
            feat = _norm(g, feat, replace(shape, n_embd=merged))
            feat = _ffn(g, feat, merged, merged, shape.projection_dim, gated=False)
            deepstack = feat if deepstack is None else g.concat(deepstack, feat)
        inpl = cur

    if shape.post_norm:
        inpl = _norm(g, inpl, shape)
    emb = g.reshape(inpl, merged, n_pos // 4, 1)
    emb = _ffn(g, emb, merged, merged, shape.projection_dim, gated=False)
    if deepstack is not None:
        emb = g.concat(emb, deepstack)
    return g.buffer_bytes([*roots, emb], alignment)


def _siglip_vit(
    g: Graph, roots: list[Tensor], shape: EncoderShape, width: int, height: int,
    flash_attn: bool,
) -> Tensor:
    """build_inp and build_vit as clip_graph_siglip calls them: learned positions (no resize),
    layer norms, separate Q/K/V; [n_embd, n_patches]."""
    p, e = shape.patch_size, shape.n_embd
    n_pos = (width // p) * (height // p)
    d_head = e // shape.n_head
    image = g.input(width, height, 3, 1, name="inp_raw")
    inp = g.conv_2d(g.weight(p, p, 3, e, dtype=shape.kernel_dtype), image, p)
    inp = g.cont(g.transpose(g.reshape(inp, n_pos, e, 1)))
    if shape.patch_bias:
        inp = g.add(inp, g.weight(e, dtype=F32))
    if shape.pos_embd_side:
        inp = g.add(inp, g.weight(e, n_pos, dtype=F32))
    inpl = g.reshape(inp, e, n_pos)
    if shape.pre_norm:
        inpl = _norm(g, inpl, shape)
    for _ in range(shape.n_layer):
        cur = _norm(g, inpl, shape)
        q = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos, 1)
        k = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos, 1)
        v = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos, 1)
        cur = _attention(g, roots, q, k, v, None, shape, flash_attn)
        inpl = g.add(cur, inpl)
        cur = _ffn(g, _norm(g, inpl, shape), e, shape.n_ff, e, shape.ffn_gate)
        inpl = g.add(inpl, cur)
    if shape.post_norm:
        inpl = _norm(g, inpl, shape)
    return g.reshape(inpl, e, n_pos, 1)


def gemma3_buffer_bytes(
    shape: EncoderShape, width: int, height: int, flash_attn: bool, alignment: int
) -> int:
    """The compute buffer of `clip_graph_siglip::build` for Gemma 3 (build_inp, build_vit with
    learned positions, average pooling by n_merge, RMS norm, the input projection)."""
    g = Graph()
    roots: list[Tensor] = []
    e, px, py = shape.n_embd, width // shape.patch_size, height // shape.patch_size
    cur = _siglip_vit(g, roots, shape, width, height, flash_attn)
    cur = g.cont(g.transpose(cur), px, py, e, 1)
    cur = g.pool_2d(cur, shape.n_merge)
    cur = g.reshape(cur, cur.ne[0] * cur.ne[0], e, 1)
    cur = g.cont(g.transpose(cur))
    cur = g.mul(g.unary(cur, "rms_norm"), g.weight(e, dtype=F32))
    projection = g.cont(g.transpose(g.weight(shape.projection_dim, e)))
    out = g.mul_mat(projection, cur)
    return g.buffer_bytes([*roots, out], alignment)


def idefics3_buffer_bytes(
    shape: EncoderShape, width: int, height: int, flash_attn: bool, alignment: int
) -> int:
    """The compute buffer of `clip_graph_siglip::build` for Idefics3 / SmolVLM: the SigLIP ViT,
    pixel unshuffle by n_merge (build_patch_merge_permute), one projection."""
    g = Graph()
    roots: list[Tensor] = []
    e, s = shape.n_embd, shape.n_merge
    px, py = width // shape.patch_size, height // shape.patch_size
    cur = _siglip_vit(g, roots, shape, width, height, flash_attn)
    cur = g.reshape(cur, e, px, py)  # tiles are whole multiples of the factor: no padding
    cur = g.permute(g.reshape(cur, e * s, px // s, py), 0, 2, 1, 3)
    cur = g.permute(g.cont(cur, e * s * s, py // s, px // s), 0, 2, 1, 3)
    cur = g.cont(cur, cur.ne[0], cur.ne[1] * cur.ne[2])
    out = g.mul_mat(g.weight(e * s * s, shape.projection_dim), cur)
    return g.buffer_bytes([*roots, out], alignment)


def pixtral_buffer_bytes(
    shape: EncoderShape, width: int, height: int, flash_attn: bool, alignment: int
) -> int:
    """The compute buffer of `clip_graph_pixtral::build` (build_inp, build_vit with RMS norms
    and 2D RoPE, Mistral Small 3.1's patch merger, the GELU projector, the [IMG_BREAK] rows)."""
    g = Graph()
    roots: list[Tensor] = []
    p, e, m, bias = shape.patch_size, shape.n_embd, shape.n_merge, shape.linear_bias
    px, py = width // p, height // p
    n_pos = px * py
    d_head = e // shape.n_head

    image = g.input(width, height, 3, 1, name="inp_raw")
    inp = g.conv_2d(g.weight(p, p, 3, e, dtype=shape.kernel_dtype), image, p)
    inp = g.cont(g.transpose(g.reshape(inp, n_pos, e, 1)))
    if shape.patch_bias:
        inp = g.add(inp, g.weight(e, dtype=F32))
    pos_h = g.input(n_pos, dtype=I32, name="pos_h")
    pos_w = g.input(n_pos, dtype=I32, name="pos_w")
    inpl = g.reshape(inp, e, n_pos)
    if shape.pre_norm:
        inpl = _norm(g, inpl, shape)
    for _ in range(shape.n_layer):
        cur = _norm(g, inpl, shape)
        q = g.reshape(_linear(g, cur, e, e, bias), d_head, shape.n_head, n_pos, 1)
        k = g.reshape(_linear(g, cur, e, e, bias), d_head, shape.n_head, n_pos, 1)
        v = g.reshape(_linear(g, cur, e, e, bias), d_head, shape.n_head, n_pos, 1)
        # build_rope_2d: one rope per half of each head
        q = g.binary(g.binary(q, pos_h, "rope"), pos_w, "rope")
        k = g.binary(g.binary(k, pos_h, "rope"), pos_w, "rope")
        cur = _attention(g, roots, q, k, v, None, shape, flash_attn)
        inpl = g.add(cur, inpl)
        cur = _ffn(g, _norm(g, inpl, shape), e, shape.n_ff, e, shape.ffn_gate, bias)
        inpl = g.add(inpl, cur)
    if shape.post_norm:
        inpl = _norm(g, inpl, shape)
    cur = g.reshape(inpl, e, n_pos, 1)

    if m > 1:  # Mistral Small 3.1's patch merger: an unfold (im2col) then one projection
        cur = g.mul(g.unary(cur, "rms_norm"), g.weight(e, dtype=F32))
        cur = g.cont(g.permute(g.reshape(cur, e, px, py), 2, 0, 1, 3))
        kernel = g.view(cur, (m, m, cur.ne[2]), (0, 0))  # only its shape is read
        cur = g.im2col(kernel, cur, m, dtype=F32)
        cur = g.reshape(cur, cur.ne[0], cur.ne[1] * cur.ne[2])
        cur = g.mul_mat(g.weight(m * m * e, e), cur)
    out_dim = shape.projection_dim
    cur = _ffn(g, cur, e, out_dim, out_dim, gated=False, bias=shape.projector_bias)
    if shape.img_break:
        cols, rows = px // m, py // m
        tmp = g.reshape(cur, out_dim, cols, rows)
        tok = g.new((out_dim, 1, rows), F32)  # a leaf the graph allocates, then clears
        tok = g.add(g.unary(tok, "scale"), g.weight(out_dim, dtype=F32))
        tmp = g.concat(tmp, tok, 1)
        cur = g.view(tmp, (out_dim, cols * rows + rows - 1), (tmp.nb[1],))
    return g.buffer_bytes([*roots, cur], alignment)


def gemma4_buffer_bytes(
    shape: EncoderShape, width: int, height: int, flash_attn: bool, alignment: int
) -> int:
    """The compute buffer of `clip_graph_gemma4v::build`: the scaled image, learned x/y position
    tables, build_vit with RMS norms, per-head Q/K norms, a normed V, 2D RoPE, post-attention
    and post-FFN norms, every matrix product clamped (Gemma4ClippableLinear), then average
    pooling by n_merge, a scale, RMS norm and the projection."""
    g = Graph()
    roots: list[Tensor] = []
    p, e = shape.patch_size, shape.n_embd
    px, py = width // p, height // p
    n_pos = px * py
    d_head = e // shape.n_head

    def mm(n_in: int, n_out: int, x: Tensor) -> Tensor:  # clip_graph_gemma4v::build_mm
        return g.unary(g.mul_mat(g.weight(n_in, n_out), g.unary(x, "clamp")), "clamp")

    def rms(x: Tensor, n: int) -> Tensor:
        return g.mul(g.unary(x, "rms_norm"), g.weight(n, dtype=F32))

    image = g.unary(g.input(width, height, 3, 1, name="inp_raw"), "scale")
    inp = g.conv_2d(g.weight(p, p, 3, e, dtype=shape.kernel_dtype), image, p)
    inp = g.cont(g.transpose(g.reshape(inp, n_pos, e, 1)))
    pos_x = g.input(n_pos, dtype=I32, name="pos_x")
    pos_y = g.input(n_pos, dtype=I32, name="pos_y")
    table = g.weight(e, shape.pos_embd_side, 2, dtype=F32)
    tbl_x = g.view(table, (e, shape.pos_embd_side), (4 * e,))
    tbl_y = g.view(table, (e, shape.pos_embd_side), (4 * e,))
    inp = g.add(g.add(inp, g.get_rows(tbl_x, pos_x)), g.get_rows(tbl_y, pos_y))
    inpl = g.reshape(inp, e, n_pos)
    for _ in range(shape.n_layer):
        cur = rms(inpl, e)
        q = rms(g.reshape(mm(e, e, cur), d_head, shape.n_head, n_pos, 1), d_head)
        k = rms(g.reshape(mm(e, e, cur), d_head, shape.n_head, n_pos, 1), d_head)
        v = g.reshape(mm(e, e, cur), d_head, shape.n_head, n_pos, 1)
        q = g.binary(g.binary(q, pos_x, "rope"), pos_y, "rope")
        k = g.binary(g.binary(k, pos_x, "rope"), pos_y, "rope")
        v = g.unary(v, "rms_norm")
        roots += [q, k, v]
        qp, kp = g.permute(q, 0, 2, 1, 3), g.permute(k, 0, 2, 1, 3)
        if flash_attn:
            vp = g.cast(g.permute(v, 0, 2, 1, 3), F16)
            out = g.flash_attn(qp, g.cast(kp, F16), vp, None)
            cur = g.reshape(out, out.ne[0] * out.ne[1], out.ne[2] * out.ne[3])
        else:
            vp = g.cont(g.permute(v, 1, 2, 0, 3))
            kqv = g.mul_mat(vp, g.soft_max(g.mul_mat(kp, qp), None))
            cur = g.cont(g.permute(kqv, 0, 2, 1, 3), e, n_pos)
        cur = rms(mm(e, e, cur), e)  # attn_out, attn_post_norm
        inpl = g.add(cur, inpl)
        cur = rms(inpl, e)
        up = mm(e, shape.n_ff, cur)
        act = g.glu_split(mm(e, shape.n_ff, cur), up) if shape.ffn_gate else g.unary(up, "unary")
        cur = rms(mm(shape.n_ff, e, act), e)  # ffn_down, ffn_post_norm
        inpl = g.add(inpl, cur)
    cur = g.reshape(inpl, e, n_pos, 1)

    m = shape.n_merge
    cur = g.pool_2d(g.cont(g.transpose(cur), px, py, e, 1), m)
    cur = g.reshape(cur, (px // m) * (py // m), e, 1)
    cur = g.unary(g.cont(g.transpose(cur)), "scale")
    if shape.std_scale:
        cur = g.mul(g.binary(cur, g.weight(e, dtype=F32), "sub"), g.weight(e, dtype=F32))
    cur = mm(e, shape.projection_dim, g.unary(cur, "rms_norm"))
    return g.buffer_bytes([*roots, cur], alignment)


def internvl_buffer_bytes(
    shape: EncoderShape, width: int, height: int, flash_attn: bool, alignment: int,
    n_batch: int = 1,
) -> int:
    """The compute buffer of `clip_graph_internvl::build` for n_batch tiles of width x height
    (the graph takes a batch; mtmd encodes an image's tiles one chunk each): build_inp, a CLS token,
    build_vit with learned positions and layer scales, the CLS dropped, pixel shuffle by n_merge,
    the normed two-layer GELU projector."""
    g = Graph()
    roots: list[Tensor] = []
    p, e, b = shape.patch_size, shape.n_embd, n_batch
    px, py = width // p, height // p
    n_patches = px * py
    n_pos = n_patches + 1
    d_head = e // shape.n_head

    image = g.input(width, height, 3, b, name="inp_raw")
    inp = g.conv_2d(g.weight(p, p, 3, e, dtype=shape.kernel_dtype), image, p)
    inp = g.cont(g.transpose(g.reshape(inp, n_patches, e, b)))
    if shape.patch_bias:
        inp = g.add(inp, g.weight(e, dtype=F32))
    cls = g.repeat(g.weight(e, dtype=F32), e, 1, b, 1)
    inp = g.add(g.concat(inp, cls, 1), g.weight(e, n_pos, dtype=F32))  # learned positions
    inpl = g.reshape(inp, e, n_pos * b)
    if shape.pre_norm:
        inpl = _norm(g, inpl, shape)
    for _ in range(shape.n_layer):
        cur = _norm(g, inpl, shape)
        q = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos, b)
        k = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos, b)
        v = g.reshape(_linear(g, cur, e, e), d_head, shape.n_head, n_pos, b)
        cur = _attention(g, roots, q, k, v, None, shape, flash_attn)
        if shape.layer_scale:
            cur = g.mul(cur, g.weight(e, dtype=F32))
        inpl = g.add(cur, inpl)
        cur = _ffn(g, _norm(g, inpl, shape), e, shape.n_ff, e, shape.ffn_gate)
        if shape.layer_scale:
            cur = g.mul(cur, g.weight(e, dtype=F32))
        inpl = g.add(inpl, cur)
    if shape.post_norm:
        inpl = _norm(g, inpl, shape)
    cur = g.reshape(inpl, e, n_pos, b)

    cur = g.cont(g.view(cur, (e, n_patches, b), (cur.nb[1], cur.nb[2])))  # the CLS dropped
    s = shape.n_merge
    cur = g.permute(g.reshape(cur, e * s, py // s, px, b), 0, 2, 1, 3)
    cur = g.permute(g.cont(cur, e * s * s, py // s, px // s, b), 0, 2, 1, 3)
    cur = g.cont(cur, e * s * s, cur.ne[1] * cur.ne[2], cur.ne[3])
    merged = e * s * s
    cur = g.add(g.mul(g.unary(cur, "norm"), g.weight(merged, dtype=F32)),
                g.weight(merged, dtype=F32))
    cur = _ffn(g, cur, merged, shape.projection_dim, shape.projection_dim, gated=False)
    return g.buffer_bytes([*roots, cur], alignment)
