"""Elementwise ops of the prompt pass as hand-written Triton kernels (CUDA), and one
matrix product with an elementwise epilogue.

A kernel profile of a 128-frame batch on an H100 (docs/BENCHMARKS.md) showed the
torch.compile'd versions of these ops running at 1.2-1.6 TB/s: compiled with dynamic
shapes, their kernels cannot assume sizes divisible by 16 and do not vectorise their
loads. Together they took ~58 ms of a ~250 ms prompt pass. Triton specialises on the
launch sizes, so these simple kernels vectorise:
- QuickGELU, the Qwen2-VL vision MLP's activation;
- the vision tower's rotary embedding, applied to q and k in one pass, read straight
  from the strided q/k views of the qkv projection;
- SiLU(gate) * up of the language model's MLP, reading gate and up as the two halves of
  the fused gate/up projection;
- the residual add and the following LayerNorm (`add_layer_norm`; the vision blocks and
  the VLA's expert), one pass that writes both the new residual and the normed rows: as
  separate kernels the add and torch's LayerNorm (at about half the bandwidth) took ~18 ms
  of a 64-frame VLA feature pass on an H100; fused, the tower took 146.6 ms against 157.1;
- the language model's rotary embedding (`rope`, engine option `rope`, Triton by default on
  CUDA), read from the strided q/k views of the q/k/v projection: the compiled version
  took ~190 us a layer for ~67 MB of a 48-prompt group on an H100, a tenth of the
  bandwidth;
- the Qwen2-VL vision MLP's first product with QuickGELU in its epilogue
  (`linear_quick_gelu`, Hopper, half precision): 1.22 against 1.29 ms for cuBLAS and the
  QuickGELU kernel at a 64-frame batch's 50,176 rows on an H100;
- the language model's gate/up product with SwiGLU in its epilogue (`linear_swiglu`,
  engine option `prefill_swiglu`, the prompt pass): the SwiGLU kernel rereads the
  (rows, 2 x 8960) product of a 48-prompt group, ~4.5 ms of a ~54 ms text pass;
- a decode step's attention inputs and attention (engine option `decode_attention`; 332.5
  against 320.2 req/s for SDPA in served chat on an H100):
  `decode_rope_write` rotates q and k straight from the q/k/v projection and writes k and
  v into each row's cache column (the rope kernels, two expanded cos/sin copies and two
  indexed writes before, ~6 kernels a layer), and `decode_attention` attends each row's
  one query per head over its cache columns, one program per (row, KV head).
Each one computes in float32 and rounds once to the input dtype, like the compiled
functions it replaces (transformers' eager ops round after every step). Where Triton is
missing (the CPU machines), `available()` is False and callers keep their other path.
tests/test_models_gpu.py checks each kernel against the reference ops.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Tuple

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 1024


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _quick_gelu(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
        y = x * tl.sigmoid(1.702 * x)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul(g_ptr, u_ptr, y_ptr, n, g_row, u_row, F: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        r = offs // F
        c = offs % F
        g = tl.load(g_ptr + r * g_row + c, mask=m).to(tl.float32)
        u = tl.load(u_ptr + r * u_row + c, mask=m).to(tl.float32)
        tl.store(y_ptr + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rotate_half(d, D: tl.constexpr):
        # rotate_half(x)[d] = sign[d] * x[partner[d]]: the rotary embedding's pairing of the
        # two halves of a head
        half: tl.constexpr = D // 2
        first = d < half
        return tl.where(first, d + half, d - half), tl.where(first, -1.0, 1.0)

    @triton.jit
    def _rotary_qk(
        q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, n,
        q_row, q_head, k_row, k_head,
        H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        s = offs // (H * D)
        h = (offs // D) % H
        d = offs % D
        partner, sign = _rotate_half(d, D)
        cos = tl.load(cos_ptr + s * D + d, mask=m)
        sin = tl.load(sin_ptr + s * D + d, mask=m) * sign
        q = tl.load(q_ptr + s * q_row + h * q_head + d, mask=m).to(tl.float32)
        qp = tl.load(q_ptr + s * q_row + h * q_head + partner, mask=m).to(tl.float32)
        tl.store(qo_ptr + offs, (q * cos + qp * sin).to(qo_ptr.dtype.element_ty), mask=m)
        k = tl.load(k_ptr + s * k_row + h * k_head + d, mask=m).to(tl.float32)
        kp = tl.load(k_ptr + s * k_row + h * k_head + partner, mask=m).to(tl.float32)
        tl.store(ko_ptr + offs, (k * cos + kp * sin).to(ko_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rotary_heads(
        x_ptr, cos_ptr, sin_ptr, o_ptr, n, x_b, x_h, x_t, T,
        H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        d = offs % D
        t = (offs // D) % T
        h = (offs // (D * T)) % H
        b = offs // (D * T * H)
        partner, sign = _rotate_half(d, D)
        cs = (b * T + t) * D + d
        cos = tl.load(cos_ptr + cs, mask=m).to(tl.float32)
        sin = tl.load(sin_ptr + cs, mask=m).to(tl.float32) * sign
        row = b * x_b + h * x_h + t * x_t
        x = tl.load(x_ptr + row + d, mask=m).to(tl.float32)
        xp = tl.load(x_ptr + row + partner, mask=m).to(tl.float32)
        tl.store(o_ptr + offs, (x * cos + xp * sin).to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _decode_rope_write(
        qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, col_ptr,
        qkv_b, q_b, q_h, c_b, c_h, c_s,
        H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        # program (row, head): heads [0, H) are queries, rotated into q; [H, H + KV) keys,
        # rotated into the row's cache column; [H + KV, H + 2 KV) values, copied there
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        d = tl.arange(0, D)
        partner, sign = _rotate_half(d, D)
        src = qkv_ptr + b * qkv_b + j * D
        x = tl.load(src + d).to(tl.float32)
        col = tl.load(col_ptr + b)
        if j < H + KV:
            cos = tl.load(cos_ptr + b * D + d).to(tl.float32)
            sin = tl.load(sin_ptr + b * D + d).to(tl.float32) * sign
            y = x * cos + tl.load(src + partner).to(tl.float32) * sin
            if j < H:
                tl.store(q_ptr + b * q_b + j * q_h + d, y.to(q_ptr.dtype.element_ty))
            else:
                tl.store(k_ptr + b * c_b + (j - H) * c_h + col * c_s + d, y.to(k_ptr.dtype.element_ty))
        else:
            tl.store(v_ptr + b * c_b + (j - H - KV) * c_h + col * c_s + d, x.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _decode_attention(
        q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, acc_ptr, stat_ptr, span, scale,
        q_b, q_h, c_b, c_h, c_s, m_b, o_b, o_h,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        # program (row, KV head, split): its G query heads (padded to GP rows for the dot)
        # against the split's CHUNK of the row's first `span` cache columns that its mask
        # allows, online softmax. Unsplit, it writes the result; split, its running max,
        # sum and unnormalised output go to acc/stat for _decode_combine
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        part = tl.program_id(2)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        heads = kv * G + g
        q = tl.load(q_ptr + b * q_b + heads[:, None] * q_h + d[None, :], mask=(g < G)[:, None], other=0.0)
        base = b * c_b + kv * c_h
        best = tl.full((GP,), float("-inf"), tl.float32)
        total = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        first = part * CHUNK
        end = tl.minimum(span, first + CHUNK)
        for start in range(first, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = n < end
            allowed = (tl.load(m_ptr + b * m_b + n, mask=inside, other=0) != 0) & inside
            k = tl.load(k_ptr + base + n[:, None] * c_s + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(allowed[None, :], s, float("-inf"))
            new = tl.maximum(best, tl.max(s, axis=1))
            shift = tl.where(new == float("-inf"), 0.0, new)  # a block with nothing allowed yet
            p = tl.exp(s - shift[:, None])
            keep = tl.exp(best - shift)
            total = total * keep + tl.sum(p, axis=1)
            v = tl.load(v_ptr + base + n[:, None] * c_s + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            best = new
        if SPLIT:
            at = ((b * tl.num_programs(1) + kv) * tl.num_programs(2) + part) * GP
            tl.store(acc_ptr + (at + g[:, None]) * D + d[None, :], acc)
            tl.store(stat_ptr + 2 * (at + g), best)
            tl.store(stat_ptr + 2 * (at + g) + 1, total)
        else:
            out = acc / total[:, None]
            tl.store(
                o_ptr + b * o_b + heads[:, None] * o_h + d[None, :],
                out.to(o_ptr.dtype.element_ty),
                mask=(g < G)[:, None],
            )

    @triton.jit
    def _decode_combine(
        acc_ptr, stat_ptr, o_ptr, parts, o_b, o_h,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        # program (row, KV head): the splits' partial softmaxes rescaled to their common max
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        first = (b * tl.num_programs(1) + kv) * parts * GP
        best = tl.full((GP,), float("-inf"), tl.float32)
        for i in range(parts):
            best = tl.maximum(best, tl.load(stat_ptr + 2 * (first + i * GP + g)))
        shift = tl.where(best == float("-inf"), 0.0, best)
        total = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for i in range(parts):
            at = first + i * GP
            w = tl.exp(tl.load(stat_ptr + 2 * (at + g)) - shift)
            total += w * tl.load(stat_ptr + 2 * (at + g) + 1)
            acc += w[:, None] * tl.load(acc_ptr + (at + g[:, None]) * D + d[None, :])
        heads = kv * G + g
        tl.store(
            o_ptr + b * o_b + heads[:, None] * o_h + d[None, :],
            (acc / total[:, None]).to(o_ptr.dtype.element_ty),
            mask=(g < G)[:, None],
        )

    @triton.jit
    def _add_layer_norm(
        h_ptr, d_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, eps, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        cols = tl.arange(0, BLOCK_N)
        m = cols < N
        offs = tl.program_id(0).to(tl.int64) * N + cols
        h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
        # the residual is rounded to its dtype before the norm reads it, as in h + d; norm(h)
        s = (h + d).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, s, mask=m)
        x = s.to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _tile_of(tile, tiles_m, tiles_n, GROUP: tl.constexpr):
        # tiles in groups of GROUP row blocks, so neighbouring programs share weight columns in L2
        per = GROUP * tiles_n
        first = (tile // per) * GROUP
        rows = min(tiles_m - first, GROUP)
        return first + (tile % per) % rows, (tile % per) // rows

    @triton.jit
    def _linear_quick_gelu(
        x_desc, w_desc, y_desc, bias_ptr, M, N, K,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PROGRAMS: tl.constexpr,
        OUT: tl.constexpr,
    ):  # fmt: skip
        tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True):
            pm, pn = _tile_of(tile, tiles_m, tiles_n, GROUP)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(tl.cdiv(K, BK)):
                a = x_desc.load([pm * BM, kk * BK])
                b = w_desc.load([pn * BN, kk * BK])
                acc = tl.dot(a, b.T, acc)
            cols = pn * BN + tl.arange(0, BN)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            acc = acc * tl.sigmoid(1.702 * acc)
            y_desc.store([pm * BM, pn * BN], acc.to(OUT))

    @triton.jit
    def _linear_swiglu(
        x_desc, w_desc, y_desc, M, F, K,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PROGRAMS: tl.constexpr,
        OUT: tl.constexpr,
    ):  # fmt: skip
        # w is the fused gate/up weight (2F, K): tile pn's gate rows are [pn BN, (pn + 1) BN),
        # its up rows the same F rows further on; both products accumulate side by side
        tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(F, BN)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True):
            pm, pn = _tile_of(tile, tiles_m, tiles_n, GROUP)
            gate = tl.zeros((BM, BN), dtype=tl.float32)
            up = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(tl.cdiv(K, BK)):
                a = x_desc.load([pm * BM, kk * BK])
                gate = tl.dot(a, w_desc.load([pn * BN, kk * BK]).T, gate)
                up = tl.dot(a, w_desc.load([F + pn * BN, kk * BK]).T, up)
            y_desc.store([pm * BM, pn * BN], (gate * tl.sigmoid(gate) * up).to(OUT))


def _grid(n: int) -> Tuple[int]:
    return ((n + BLOCK - 1) // BLOCK,)


def quick_gelu(x: Any) -> Any:
    """x * sigmoid(1.702 x) (transformers' QuickGELUActivation)."""
    x = x.contiguous()
    y = x.new_empty(x.shape)
    _quick_gelu[_grid(x.numel())](x, y, x.numel(), BLOCK=BLOCK)
    return y


def silu_mul(gate: Any, up: Any) -> Any:
    """silu(gate) * up for (..., F) views whose rows may be strided (halves of one tensor)."""
    f = gate.shape[-1]
    g, u = gate.reshape(-1, f), up.reshape(-1, f)  # views: the leading dims merge
    if g.stride(-1) != 1 or u.stride(-1) != 1:
        g, u = g.contiguous(), u.contiguous()
    y = gate.new_empty(gate.shape)
    n = y.numel()
    _silu_mul[_grid(n)](g, u, y, n, g.stride(0), u.stride(0), F=f, BLOCK=BLOCK)
    return y


def rotary_vision(q: Any, k: Any, cos: Any, sin: Any) -> Tuple[Any, Any]:
    """transformers' apply_rotary_pos_emb_vision: q, k (seq, heads, dim), cos/sin (seq, dim)."""
    heads, dim = q.shape[1:]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    qo, ko = q.new_empty(q.shape), k.new_empty(k.shape)
    n = qo.numel()
    _rotary_qk[_grid(n)](
        q,
        k,
        cos,
        sin,
        qo,
        ko,
        n,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        H=heads,
        D=dim,
        BLOCK=BLOCK,
    )
    return qo, ko


def add_layer_norm(h: Any, delta: Any, weight: Any, bias: Any, eps: float) -> Tuple[Any, Any]:
    """(h + delta, layer_norm(h + delta)) over the last dim, as fused.add_layer_norm."""
    n = h.shape[-1]
    h, delta = h.contiguous(), delta.contiguous()
    s, y = h.new_empty(h.shape), h.new_empty(h.shape)
    rows = h.numel() // n
    if rows:
        block = triton.next_power_of_2(n)
        _add_layer_norm[(rows,)](
            h, delta, weight, bias, s, y, n, eps, BLOCK_N=block, num_warps=min(max(block // 256, 1), 8)
        )
    return s, y


def rope(q: Any, k: Any, cos: Any, sin: Any) -> Tuple[Any, Any]:
    """fused.rope (transformers' apply_rotary_pos_emb) for the language model: q (B, H, T, D)
    and k (B, KV, T, D), views whose last dim is contiguous (the transposed q/k of a q/k/v
    projection), cos/sin (B, T, D); returns contiguous (B, heads, T, D) outputs."""
    b, _, t, dim = q.shape
    cos, sin = cos.expand(b, t, dim).contiguous(), sin.expand(b, t, dim).contiguous()
    out = []
    for x in (q, k):
        if x.stride(-1) != 1:
            x = x.contiguous()
        o = x.new_empty(x.shape)
        n = o.numel()
        _rotary_heads[_grid(n)](
            x, cos, sin, o, n, x.stride(0), x.stride(1), x.stride(2), t, H=x.shape[1], D=dim, BLOCK=BLOCK
        )
        out.append(o)
    return out[0], out[1]


def decode_rope_write(qkv: Any, cos: Any, sin: Any, keys: Any, values: Any, cols: Any, heads: int) -> Any:
    """A decode step's attention inputs in one kernel: `qkv` (B, 1, (H + 2 KV) D), one q/k/v
    projection per row; cos/sin (B, D) contiguous. The rotated key and the value of row b go
    to column cols[b] of its row of `keys`/`values` (B, KV, capacity, D) (a layer's cache);
    returns the rotated queries (B, H, D). As fused.rope, then the cache writes."""
    b = qkv.shape[0]
    kv, dim = keys.shape[1], keys.shape[3]
    qkv = qkv.reshape(b, -1)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = qkv.new_empty((b, heads, dim))
    if b:
        _decode_rope_write[(b, heads + 2 * kv)](
            qkv, cos, sin, q, keys, values, cols,
            qkv.stride(0), q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            H=heads, KV=kv, D=dim, num_warps=1,
        )  # fmt: skip
    return q


def decode_attention(
    q: Any, keys: Any, values: Any, mask: Any, span: int, scale: float, chunk: int = 0
) -> Any:
    """Attention of one new query per row, q (B, H, D), over the first `span` columns of a
    layer's cache keys/values (B, KV, capacity, D) where `mask` (B, capacity) allows;
    grouped_attention's result as (B, H, D). One program per (row, KV head) reads each
    cached key and value once for the KV head's H / KV query heads; SDPA under an additive
    mask took ~23 us a layer at 128 rows of 256 columns on an H100. With `chunk` > 0 (a
    multiple of 64) each program takes `chunk` columns only, and a second kernel merges the
    pieces (split-K, as flash-decoding): B x KV programs alone fill few of the GPU's SMs."""
    import torch

    b, h, dim = q.shape
    kv = keys.shape[1]
    groups = h // kv
    gp = max(16, triton.next_power_of_2(groups))
    o = q.new_empty((b, h, dim))
    if not b:
        return o
    parts = triton.cdiv(span, chunk) if chunk > 0 else 1
    split = parts > 1
    acc = q.new_empty((b, kv, parts, gp, dim), dtype=torch.float32) if split else o
    stat = q.new_empty((b, kv, parts, gp, 2), dtype=torch.float32) if split else o
    _decode_attention[(b, kv, parts)](
        q, keys, values, mask.view(torch.uint8), o, acc, stat, span, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), mask.stride(0),
        o.stride(0), o.stride(1),
        G=groups, GP=gp, D=dim, BLOCK_N=64, CHUNK=chunk if split else 1 << 30, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32, not TF32
        num_warps=4, num_stages=3,
    )  # fmt: skip
    if split:
        _decode_combine[(b, kv)](
            acc, stat, o, parts, o.stride(0), o.stride(1), G=groups, GP=gp, D=dim, num_warps=4
        )
    return o


# (BM, BN, BK, stages, warps) of the fused fc1: measured on an H100 against cuBLAS + quick_gelu
GEMM_TILE = (128, 256, 64, 3, 8)


def linear_quick_gelu(x: Any, weight: Any, bias: Any) -> Any:
    """quick_gelu(x @ weight.T + bias), the Qwen2-VL vision MLP's fc1 and activation, with
    the activation in the product's epilogue: a persistent Triton kernel reading through
    Hopper's tensor-memory descriptors. The activation as its own kernel rereads and rewrites
    the (rows, 5120) product: ~0.34 ms a block at 64 frames. Elsewhere (fp32, pre-Hopper,
    small or unaligned shapes) it is cuBLAS and the elementwise kernel."""
    import torch.nn.functional as F

    shape = x.shape
    x = x.reshape(-1, shape[-1])
    n = weight.shape[0]
    if _tma_fits(x, weight, GEMM_TILE) and bias is not None and n >= GEMM_TILE[1] and n % 8 == 0:
        y = _persistent_product(_linear_quick_gelu, x, weight, n, GEMM_TILE, bias)
    else:
        y = quick_gelu(F.linear(x, weight, bias))
    return y.view(*shape[:-1], n)


# (BM, BN, BK, stages, warps) of the fused gate/up product: BN columns of gate and of up
SWIGLU_TILE = (128, 128, 64, 3, 8)


def linear_swiglu(x: Any, weight: Any) -> Any:
    """silu(gate) * up of `x @ weight.T` for the fused gate/up weight (2F, K) of a SwiGLU
    MLP (fused_linear.py), with the SiLU and the product in the GEMM's epilogue: the
    (rows, 2F) product is never written. As linear_quick_gelu: a persistent Triton kernel
    through tensor-memory descriptors on Hopper in half precision, for prompt-pass row
    counts; elsewhere cuBLAS and silu_mul (CUDA)."""
    import torch.nn.functional as F

    shape = x.shape
    x = x.reshape(-1, shape[-1])
    n = weight.shape[0] // 2
    if _tma_fits(x, weight, SWIGLU_TILE) and n % SWIGLU_TILE[1] == 0:
        y = _persistent_product(_linear_swiglu, x, weight, n, SWIGLU_TILE)
    else:
        y = silu_mul(*F.linear(x, weight).chunk(2, dim=-1))
    return y.view(*shape[:-1], n)


def _tma_fits(x: Any, weight: Any, tile: Tuple[int, ...]) -> bool:
    """The persistent products can take x (M, K) against `weight`'s rows: Triton with tensor
    descriptors, Hopper, half precision, at least a tile of rows and of K, 16-byte rows."""
    import torch

    bm, _, bk = tile[:3]
    (m, k) = x.shape
    return (
        _descriptors() is not None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and _properties(x.device.index or 0).major >= 9
        and m >= bm and k >= bk and k % 8 == 0
        and x.stride(1) == 1 and x.stride(0) % 8 == 0 and weight.is_contiguous()
    )  # fmt: skip


def _persistent_product(kernel: Any, x: Any, weight: Any, n: int, tile: Tuple[int, ...], *args: Any) -> Any:
    """A (M, n) output from `kernel` (_linear_quick_gelu, _linear_swiglu): one program per SM
    walking the output's tiles (under Triton's CPU interpreter, 3 programs); `args` go
    between the descriptors and the sizes."""
    import torch

    bm, bn, bk, stages, warps = tile
    desc = _descriptors()
    (m, k) = x.shape
    y = x.new_empty((m, n))
    sms = _properties(x.device.index or 0).multi_processor_count if x.is_cuda else 3
    programs = min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn))
    kernel[(programs,)](
        desc.from_tensor(x, [bm, bk]),
        desc.from_tensor(weight, [bn, bk]),
        desc.from_tensor(y, [bm, bn]),
        *args,
        m,
        n,
        k,
        BM=bm,
        BN=bn,
        BK=bk,
        GROUP=8,
        PROGRAMS=programs,
        OUT={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(x.dtype, tl.float32),
        num_stages=stages,
        num_warps=warps,
    )
    return y


@lru_cache(maxsize=1)
def _descriptors() -> Any:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton before 3.4
        return None
    return TensorDescriptor


@lru_cache(maxsize=8)
def _properties(device: int) -> Any:
    """The CUDA device's properties (compute capability, SM count), asked once."""
    import torch

    return torch.cuda.get_device_properties(device)
