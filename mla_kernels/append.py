"""The latent projection of a generation step, written straight into the latent KV cache.

MLA's absorbed form projects x once into [q' (nh r) | c^k (g r) | c^v (g rv)]. Done as a
GEMM followed by `LatentKVCache.update`, the latents make a round trip: stored by the
GEMM, read back and stored again by a copy (or index_put) kernel, one more launch per
layer and token. Here one kernel computes the projection tile by tile and stores each
output column where it belongs: query columns into q', latent columns into their slot of
the cache at position cache_seqlens + t. The cache is passed as `latent_decode` reads it,
(max_batch, max_seq, g, dim) views with any strides (`LatentKVCache.k` / `.v`).

There is no backward: caches are written under no_grad (generation). The GEMM is
tiled for the few rows (batch x new tokens) of a decode step; prefill's long chunks
go to cuBLAS and `LatentKVCache.update`, where one copy is amortized over the chunk.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from mla_kernels._dispatch import (
    autocast_inputs,
    check_dtypes,
    check_fp8_scales,
    check_ndim,
    check_tensors,
    interpreting,
    on_kernel_device,
    tuned_candidates,
)
from mla_kernels._register import register_op
from mla_kernels.reference import FP8_DTYPE, FP8_MAX, project_append_ref

FP8_MAX_C = tl.constexpr(FP8_MAX)
MAX_FP8_GROUP = 512  # widest latent whose group one fp8 tile holds (DeepSeek-V2's 512)
DECODE_TILE_MAX_ROWS = 64  # up to this many rows (B x new tokens) the decode tile runs; more are autotuned
# The decode tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): of 72 candidates with cold weights
# (bench/append.py --tiles, B 1 / 32 / 64, r 32 and a joint r 256, bf16 and fp8 caches), the one
# whose worst time over those shapes is nearest each shape's fastest (within 15%; fp8 within 6%)
DECODE_TILE = (16, 32, 256, 4, 3)
DECODE_WEIGHT_TILE = DECODE_TILE[1] * DECODE_TILE[2]  # weight elements per K step, kept for wider fp8 tiles
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}  # small whole tiles for the CPU


@triton.jit
def _fp8_grid(v):
    """v (|v| <= 448) rounded to the nearest float8_e4m3fn value, in float32 (3 mantissa bits;
    below 2^-6 the subnormals' fixed step 2^-9). The cast to fp8 that follows is then exact:
    Triton's CPU interpreter drops the carry when its own cast rounds up across a power of two
    (127.5 -> 64), and this keeps its tests meaningful. Ties round away from zero (torch: to even)."""
    magnitude = tl.abs(v)
    exponent = tl.maximum(tl.floor(tl.log2(tl.maximum(magnitude, 1e-30))), -6.0)
    step = tl.exp2(exponent - 3.0)
    rounded = tl.floor(magnitude / step + 0.5) * step
    return tl.where(v < 0, -rounded, rounded)


@triton.jit
def _project_append_kernel(
    X, W, BIAS, Q, KC, VC, KS, VS, POS,
    pos_value, stride_pos, M, T, C, QUERY_DIM, KEY_COLS, VALUE_COLS, R, RV,
    stride_xm, stride_wn, stride_qm,
    stride_kb, stride_kg, stride_kl,
    stride_vb, stride_vg, stride_vl,
    stride_ksb, stride_ksg, stride_ksl,
    stride_vsb, stride_vsg, stride_vsl,
    HAS_BIAS: tl.constexpr, POS_FROM_TENSOR: tl.constexpr, IEEE_DOT: tl.constexpr, FP8_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M rows, BLOCK_N columns) tile of x W^T + b, stored to q' or the caches.

    X (M, C) with M = B T (row m is token t = m % T of sequence b = m // T); W (N, C),
    N = QUERY_DIM + KEY_COLS + VALUE_COLS; Q (M, QUERY_DIM); KC (max_batch, L, g, R) and
    VC (max_batch, L, g, RV) through their (batch, group, position) strides; VC unused when
    VALUE_COLS = 0 (joint latent).
    FP8_GROUP = R (0: no quantization): the caches are fp8, each (token, group) of R latent
    values quantized by its own amax, its float32 scale stored to KS / VS (max_batch, L, g)
    through their (batch, group, position) strides. The launcher makes every R columns of a
    tile one group (BLOCK_N a multiple of R, QUERY_DIM too, RV = R).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < QUERY_DIM + KEY_COLS + VALUE_COLS

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_ok = (k0 + offs_k) < C
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(W + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        if IEEE_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(Q.dtype.element_ty)

    b = (offs_m // T).to(tl.int64)  # a cache's batch offsets pass 2^31 elements at long lengths
    if POS_FROM_TENSOR:  # per sequence (stride_pos 1), or one for all (stride_pos 0)
        pos = tl.load(POS + b * stride_pos, mask=m_ok, other=0).to(tl.int32)  # (BLOCK_M,)
    else:
        pos = pos_value
    slot = pos + offs_m % T  # cache position of each row's token

    is_q = offs_n < QUERY_DIM
    tl.store(Q + offs_m[:, None] * stride_qm + offs_n[None, :], out, mask=m_ok[:, None] & is_q[None, :])

    latent = out
    if FP8_GROUP:  # one scale per R columns (a group's latent) of each row
        grouped = tl.reshape(acc, (BLOCK_M, BLOCK_N // FP8_GROUP, FP8_GROUP))
        amax = tl.max(tl.abs(grouped), axis=2)  # (BLOCK_M, BLOCK_N // R)
        scale = tl.where(amax > 0, amax / FP8_MAX_C, 1.0)
        latent = _fp8_grid(tl.reshape(grouped / scale[:, :, None], (BLOCK_M, BLOCK_N)))
        chunk_col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // FP8_GROUP) * FP8_GROUP - QUERY_DIM
        is_kg = (chunk_col >= 0) & (chunk_col < KEY_COLS)
        k_group = tl.where(is_kg, chunk_col // R, 0)
        tl.store(KS + b[:, None] * stride_ksb + slot[:, None] * stride_ksl + k_group[None, :] * stride_ksg, scale,
                 mask=m_ok[:, None] & is_kg[None, :])
        value_chunk = chunk_col - KEY_COLS
        is_vg = (value_chunk >= 0) & (value_chunk < VALUE_COLS)
        v_group = tl.where(is_vg, value_chunk // RV, 0)
        tl.store(VS + b[:, None] * stride_vsb + slot[:, None] * stride_vsl + v_group[None, :] * stride_vsg, scale,
                 mask=m_ok[:, None] & is_vg[None, :])

    key_col = offs_n - QUERY_DIM
    is_k = (key_col >= 0) & (key_col < KEY_COLS)
    key_col = tl.where(is_k, key_col, 0)
    k_ptrs = (KC + b[:, None] * stride_kb + slot[:, None] * stride_kl
              + (key_col // R)[None, :] * stride_kg + (key_col % R)[None, :])
    tl.store(k_ptrs, latent.to(KC.dtype.element_ty), mask=m_ok[:, None] & is_k[None, :])

    value_col = offs_n - QUERY_DIM - KEY_COLS
    is_v = (value_col >= 0) & (value_col < VALUE_COLS)
    value_col = tl.where(is_v, value_col, 0)
    v_ptrs = (VC + b[:, None] * stride_vb + slot[:, None] * stride_vl
              + (value_col // RV)[None, :] * stride_vg + (value_col % RV)[None, :])
    tl.store(v_ptrs, latent.to(VC.dtype.element_ty), mask=m_ok[:, None] & is_v[None, :])


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(16, 32, 128, 4, 3), (16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3),
                             (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3)]
]
_project_append_tuned = triton.autotune(
    configs=_CONFIGS, key=["C", "QUERY_DIM", "KEY_COLS", "VALUE_COLS"],
    prune_configs_by={"early_config_prune": lambda configs, named_args, **meta: tuned_candidates(configs)},
    cache_results=True,  # on disk: a later process on this GPU skips the search
)(_project_append_kernel)


def fp8_append_supported(query_dim, r, rv):
    """Whether the kernel can write an fp8 cache for these widths: every group's r latent values in
    one tile (r a power of two up to MAX_FP8_GROUP, query_dim a multiple of it), values as wide as
    keys or a joint latent (rv 0)."""
    return r & (r - 1) == 0 and r <= MAX_FP8_GROUP and query_dim % r == 0 and rv in (0, r)


def _check_inputs(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale):
    tensors = {"x": x, "weight": weight, "k_cache": k_cache, "v_cache": v_cache}
    if bias is not None:
        tensors["bias"] = bias
    check_tensors(**tensors)
    fp8 = k_cache.dtype == FP8_DTYPE
    if fp8:  # the caches' own dtypes are checked with their scales
        check_dtypes(**{name: t for name, t in tensors.items() if name not in ("k_cache", "v_cache")})
    else:
        check_dtypes(**tensors)
    check_ndim("x", x, "(B, T, C)")
    B, T, C = x.shape
    check_ndim("k_cache", k_cache, "(max_batch, max_seq, g, r)")
    check_ndim("v_cache", v_cache, "(max_batch, max_seq, g, rv)")
    max_batch, max_seq, g, r = k_cache.shape
    if tuple(v_cache.shape[:3]) != (max_batch, max_seq, g):
        raise ValueError(f"v_cache must be ({max_batch}, {max_seq}, {g}, rv), got {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dim")
    if not isinstance(query_dim, int) or query_dim < 0:
        raise ValueError(f"query_dim must be an int >= 0, got {query_dim!r}")
    n_out = query_dim + g * r + g * v_cache.shape[3]
    if weight.dim() != 2 or tuple(weight.shape) != (n_out, C):
        raise ValueError(f"weight must be (query_dim + g r + g rv, C) = ({n_out}, {C}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must be ({n_out},) or None, got {tuple(bias.shape)}")
    if B > max_batch:
        raise ValueError(f"x has batch {B}, the cache holds max_batch={max_batch}")
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.shape not in ((), (B,)) or cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cache_seqlens as a tensor must be int32/int64 of shape () or ({B},), got "
                             f"{cache_seqlens.dtype} shape {tuple(cache_seqlens.shape)}")
        if not cache_seqlens.is_contiguous():  # the kernel reads row b's start at b
            raise ValueError("cache_seqlens of shape (B,) must be contiguous")
    elif not isinstance(cache_seqlens, int) or isinstance(cache_seqlens, bool):
        raise TypeError(f"cache_seqlens must be an int or a 0-dim integer tensor, got {type(cache_seqlens).__name__}")
    elif cache_seqlens < 0 or cache_seqlens + T > max_seq:
        raise ValueError(f"cache overflow: positions [{cache_seqlens}, {cache_seqlens + T}) do not fit "
                         f"max_seq={max_seq}")
    check_fp8_scales(k_cache, v_cache, k_scale, v_scale)
    if fp8 and not fp8_append_supported(query_dim, r, v_cache.shape[3]):
        raise ValueError(f"an fp8 cache is written for r a power of two <= {MAX_FP8_GROUP} dividing query_dim and "
                         f"rv in (0, r); got r={r}, rv={v_cache.shape[3]}, query_dim={query_dim}")


def kernel_inputs(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale):
    """(q', args, meta, (M, N)): the output q' (B, T, query_dim) and what `_project_append_kernel`
    takes besides its tile sizes, for arguments as `project_append` takes them, already checked there
    (this function checks nothing). The launcher below and bench/append.py's tile sweep both launch
    from these."""
    B, T, C = x.shape
    M, N = B * T, weight.shape[0]
    r, rv = k_cache.shape[3], v_cache.shape[3]
    key_cols, value_cols = k_cache.shape[2] * r, v_cache.shape[2] * rv
    x2 = x.reshape(M, C)
    x2, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, weight))
    q = torch.empty(M, query_dim, device=x.device, dtype=x.dtype)  # (B T, query_dim)
    from_tensor = isinstance(cache_seqlens, torch.Tensor)
    pos_tensor = cache_seqlens if from_tensor else q  # unread placeholder when the position is an int
    pos_stride = 1 if from_tensor and cache_seqlens.dim() == 1 else 0  # one start per row, or one for all
    value_buf = v_cache if value_cols else k_cache  # a joint latent's empty v_cache may have no storage
    fp8 = k_scale is not None
    ks = k_scale if fp8 else q  # unread placeholders without scales
    vs = (v_scale if value_cols else k_scale) if fp8 else q
    scale_strides = (ks.stride(0), ks.stride(2), ks.stride(1), vs.stride(0), vs.stride(2), vs.stride(1)) if fp8 \
        else (0,) * 6
    args = (x2, weight, weight if bias is None else bias, q, k_cache, value_buf, ks, vs, pos_tensor,
            0 if from_tensor else cache_seqlens, pos_stride, M, T, C, query_dim, key_cols, value_cols, r, max(rv, 1),
            x2.stride(0), weight.stride(0), max(query_dim, 1),
            k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),  # (batch, group, position)
            v_cache.stride(0), v_cache.stride(2), v_cache.stride(1),
            *scale_strides)
    meta = dict(HAS_BIAS=bias is not None, POS_FROM_TENSOR=from_tensor, IEEE_DOT=x.dtype == torch.float32,
                FP8_GROUP=r if fp8 else 0)
    return q.view(B, T, query_dim), args, meta, (M, N)


def decode_tile(r, fp8):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for a decode step's few rows (M <= DECODE_TILE_MAX_ROWS).

    Fixed, not autotuned: the kernel takes 4-6 us there, near the timer's noise, and the autotuner's
    picks inside a generation ran up to 3x slower than this tile (docs/decisions.md). An fp8 cache
    needs whole groups of r columns in a tile (BLOCK_N >= r); BLOCK_K shrinks to keep the weight tile
    at DECODE_WEIGHT_TILE elements."""
    block_n = max(DECODE_TILE[1], r) if fp8 else DECODE_TILE[1]
    block_k = max(16, min(DECODE_TILE[2], DECODE_WEIGHT_TILE // block_n))
    return DECODE_TILE[0], block_n, block_k, *DECODE_TILE[3:]


def _project_append_triton(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale):
    q, args, meta, (M, N) = kernel_inputs(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale,
                                          v_scale)
    fp8 = bool(meta["FP8_GROUP"])
    if interpreting():
        tile = dict(INTERPRETER_BLOCKS)
        if fp8:
            tile["BLOCK_N"] = max(tile["BLOCK_N"], k_cache.shape[3])
    elif fp8 or M <= DECODE_TILE_MAX_ROWS:
        block_m, block_n, block_k, warps, stages = decode_tile(k_cache.shape[3], fp8)
        tile = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    else:  # a chunk of many new tokens: long enough for the autotuner's timings to mean something
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _project_append_tuned[grid](*args, **meta)
        return q
    grid = (triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(N, tile["BLOCK_N"]))
    _project_append_kernel[grid](*args, **meta, **tile)
    return q


def _project_append_impl(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale=None, v_scale=None):
    if not on_kernel_device(x):
        return project_append_ref(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale)
    return _project_append_triton(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale)


def _project_append_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], query_dim: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _project_append_impl(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale)


def _project_append_fake(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale=None, v_scale=None):
    return x.new_empty(x.shape[0], x.shape[1], query_dim)  # (B, T, query_dim)


# opaque to Inductor, writing into the cache in place (a decode step is replayed from a CUDA graph)
_project_append_op = register_op("project_append", _project_append_launch, _project_append_fake,
                                 mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"), traceable=False)


def project_append(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale=None, v_scale=None):
    """y = x weight^T + bias; y's query columns are returned, its latent columns are cached.

    x: (B, T, C) float16 / bfloat16 / float32, the new tokens of each row.
    weight: (query_dim + g r + g rv, C), bias: (same,) or None; the output columns are
      [q' (query_dim) | c^k (g r, group-major) | c^v (g rv)], rv = 0 for a joint latent.
    k_cache: (max_batch, max_seq, g, r), v_cache: (max_batch, max_seq, g, rv), rv = 0 when
      joint: the layout `latent_decode` reads, any strides but a contiguous last dim (a
      `LatentKVCache`'s `.k` / `.v`); in x's dtype, or float8_e4m3fn with
    k_scale, v_scale: (max_batch, max_seq, g) float32 (`.k_scales` / `.v_scales`): each new
      (token, group) latent is quantized by its own amax (`mla_kernels.reference.quantize_fp8`)
      in the kernel, and its scale stored beside it (v_scale None when joint). Needs
      `fp8_append_supported(query_dim, r, rv)`.
    cache_seqlens: tokens already in each row's cache, so row b's new tokens go to positions
      cache_seqlens[b], cache_seqlens[b] + 1, ...: an int (the same for every row, checked
      against max_seq), or an integer tensor on the device of shape () (the same for every
      row) or (B,) (one per row: batches of prompts of different lengths); tensors are not
      checked (that would synchronize; static-shape decode steps and CUDA graphs pass them).
    Writes k_cache[b, cache_seqlens[b] + t] and v_cache[b, cache_seqlens[b] + t] for b < B,
    t < T (and their scales), nothing else. Returns q' (B, T, query_dim). On CPU tensors without
    TRITON_INTERPRET=1 it runs `mla_kernels.reference.project_append_ref` instead.
    Under `torch.autocast` x, weight and bias are first cast to its dtype, as `F.linear` casts
    them (the caches are not: they hold what they were made with).
    """
    check_tensors(x=x, weight=weight)
    x, weight = autocast_inputs(x, weight)
    if isinstance(bias, torch.Tensor):
        (bias,) = autocast_inputs(bias)
    _check_inputs(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale)
    if torch.compiler.is_compiling():
        pos = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else torch.tensor(cache_seqlens, device=x.device)
        return torch.ops.mla_kernels.project_append(x, weight, bias, query_dim, k_cache, v_cache, pos, k_scale,
                                                    v_scale)
    return _project_append_impl(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale, v_scale)
