"""The latent projection of a generation step, written straight into the latent KV cache.

MLA's absorbed form projects x once into [q' (nh r) | c^k (g r) | c^v (g rv)]. Done as a
GEMM followed by `LatentKVCache.update`, the latents make a round trip: stored by the
GEMM, read back and stored again by a copy (or index_put) kernel, one more launch per
layer and token. Here one kernel computes the projection tile by tile and stores each
output column where it belongs: query columns into q', latent columns into their slot of
the group-major cache (max_batch, g, max_seq, dim) at position input_pos + t.

There is no backward: caches are written under no_grad (generation). The GEMM is
tiled for the few rows (batch x new tokens) of a decode step; prefill's long chunks
go to cuBLAS and `LatentKVCache.update`, where one copy is amortized over the chunk.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from mla_kernels._tiles import KERNEL_DTYPES, interpreting
from mla_kernels.reference import project_append_ref

MAX_ROW_BUCKET = 64  # tiles are tuned per power-of-two row count up to this, then shared
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}  # small whole tiles for the CPU


@triton.jit
def _project_append_kernel(
    X, W, BIAS, Q, KC, VC, POS,
    pos_value, M, T, C, QUERY_DIM, KEY_COLS, VALUE_COLS, R, RV,
    stride_xm, stride_wn, stride_qm,
    stride_kb, stride_kg, stride_kl,
    stride_vb, stride_vg, stride_vl,
    ROW_BUCKET,
    HAS_BIAS: tl.constexpr, POS_FROM_TENSOR: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M rows, BLOCK_N columns) tile of x W^T + b, stored to q' or the caches.

    X (M, C) with M = B T (row m is token t = m % T of sequence b = m // T); W (N, C),
    N = QUERY_DIM + KEY_COLS + VALUE_COLS; Q (M, QUERY_DIM); KC (max_batch, g, L, R);
    VC (max_batch, g, L, RV), unused when VALUE_COLS = 0 (joint latent).
    ROW_BUCKET only keys the autotuner.
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

    pos = tl.load(POS).to(tl.int32) if POS_FROM_TENSOR else pos_value
    b = offs_m // T
    slot = pos + offs_m % T  # cache position of each row's token

    is_q = offs_n < QUERY_DIM
    tl.store(Q + offs_m[:, None] * stride_qm + offs_n[None, :], out, mask=m_ok[:, None] & is_q[None, :])

    key_col = offs_n - QUERY_DIM
    is_k = (key_col >= 0) & (key_col < KEY_COLS)
    key_col = tl.where(is_k, key_col, 0)
    k_ptrs = (KC + b[:, None] * stride_kb + slot[:, None] * stride_kl
              + (key_col // R)[None, :] * stride_kg + (key_col % R)[None, :])
    tl.store(k_ptrs, out, mask=m_ok[:, None] & is_k[None, :])

    value_col = offs_n - QUERY_DIM - KEY_COLS
    is_v = (value_col >= 0) & (value_col < VALUE_COLS)
    value_col = tl.where(is_v, value_col, 0)
    v_ptrs = (VC + b[:, None] * stride_vb + slot[:, None] * stride_vl
              + (value_col // RV)[None, :] * stride_vg + (value_col % RV)[None, :])
    tl.store(v_ptrs, out, mask=m_ok[:, None] & is_v[None, :])


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(16, 32, 128, 4, 3), (16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3),
                             (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3)]
]
_project_append_tuned = triton.autotune(configs=_CONFIGS, key=["ROW_BUCKET", "C", "QUERY_DIM", "KEY_COLS",
                                                                "VALUE_COLS"])(_project_append_kernel)


def _check_inputs(x, weight, bias, query_dim, k_cache, v_cache, input_pos):
    tensors = {"x": x, "weight": weight, "k_cache": k_cache, "v_cache": v_cache}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all must share a device")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x dtype {x.dtype} not supported; allowed {KERNEL_DTYPES}")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, C), got shape {tuple(x.shape)}")
    B, T, C = x.shape
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"k_cache and v_cache must be (max_batch, g, max_seq, dim), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    max_batch, g, max_seq, r = k_cache.shape
    if tuple(v_cache.shape[:3]) != (max_batch, g, max_seq):
        raise ValueError(f"v_cache must be ({max_batch}, {g}, {max_seq}, rv), got {tuple(v_cache.shape)}")
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
    if isinstance(input_pos, torch.Tensor):
        if input_pos.dim() != 0 or input_pos.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_pos as a tensor must be a 0-dim int32/int64, got {input_pos.dtype} "
                             f"shape {tuple(input_pos.shape)}")
    elif not isinstance(input_pos, int) or isinstance(input_pos, bool):
        raise TypeError(f"input_pos must be an int or a 0-dim integer tensor, got {type(input_pos).__name__}")
    elif input_pos < 0 or input_pos + T > max_seq:
        raise ValueError(f"cache overflow: positions [{input_pos}, {input_pos + T}) do not fit max_seq={max_seq}")


def _project_append_triton(x, weight, bias, query_dim, k_cache, v_cache, input_pos):
    B, T, C = x.shape
    M, N = B * T, weight.shape[0]
    r, rv = k_cache.shape[3], v_cache.shape[3]
    key_cols, value_cols = k_cache.shape[1] * r, v_cache.shape[1] * rv
    x2 = x.reshape(M, C)
    x2, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, weight))
    q = torch.empty(M, query_dim, device=x.device, dtype=x.dtype)  # (B T, query_dim)
    from_tensor = isinstance(input_pos, torch.Tensor)
    pos_tensor = input_pos if from_tensor else q  # unread placeholder when the position is an int
    value_buf = v_cache if value_cols else k_cache  # a joint latent's empty v_cache may have no storage
    args = (x2, weight, weight if bias is None else bias, q, k_cache, value_buf, pos_tensor,
            0 if from_tensor else input_pos, M, T, C, query_dim, key_cols, value_cols, r, max(rv, 1),
            x2.stride(0), weight.stride(0), max(query_dim, 1),
            *k_cache.stride()[:3], *v_cache.stride()[:3],
            min(triton.next_power_of_2(M), MAX_ROW_BUCKET))
    meta = dict(HAS_BIAS=bias is not None, POS_FROM_TENSOR=from_tensor, IEEE_DOT=x.dtype == torch.float32)
    if interpreting():
        blocks = INTERPRETER_BLOCKS
        grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]))
        _project_append_kernel[grid](*args, **meta, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _project_append_tuned[grid](*args, **meta)
    return q.view(B, T, query_dim)


def _project_append_impl(x, weight, bias, query_dim, k_cache, v_cache, input_pos):
    if x.device.type == "cpu" and not interpreting():
        return project_append_ref(x, weight, bias, query_dim, k_cache, v_cache, input_pos)
    return _project_append_triton(x, weight, bias, query_dim, k_cache, v_cache, input_pos)


@torch.library.custom_op("mla_kernels::project_append", mutates_args=("k_cache", "v_cache"))
def _project_append_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], query_dim: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor,
) -> torch.Tensor:
    return _project_append_impl(x, weight, bias, query_dim, k_cache, v_cache, input_pos)


@_project_append_op.register_fake
def _(x, weight, bias, query_dim, k_cache, v_cache, input_pos):
    return x.new_empty(x.shape[0], x.shape[1], query_dim)  # (B, T, query_dim)


def project_append(x, weight, bias, query_dim, k_cache, v_cache, input_pos):
    """y = x weight^T + bias; y's query columns are returned, its latent columns are cached.

    x: (B, T, C) float16 / bfloat16 / float32, the new tokens of each row.
    weight: (query_dim + g r + g rv, C), bias: (same,) or None; the output columns are
      [q' (query_dim) | c^k (g r, group-major) | c^v (g rv)], rv = 0 for a joint latent.
    k_cache: (max_batch, g, max_seq, r), v_cache: (max_batch, g, max_seq, rv), the storage
      of a `LatentKVCache` (rv = 0 when joint); all in x's dtype, on x's device.
    input_pos: position of the first new token, the same for every row: an int (checked
      against max_seq), or a 0-dim integer tensor on the device (not checked: that would
      synchronize; static-shape decode steps and CUDA graphs pass it this way).
    Writes c^k[b, :, input_pos + t] and c^v[b, :, input_pos + t] for b < B, t < T, nothing
    else. Returns q' (B, T, query_dim). On CPU tensors without TRITON_INTERPRET=1 it runs
    `mla_kernels.reference.project_append_ref` instead.
    """
    _check_inputs(x, weight, bias, query_dim, k_cache, v_cache, input_pos)
    if torch.compiler.is_compiling():
        pos = input_pos if isinstance(input_pos, torch.Tensor) else torch.tensor(input_pos, device=x.device)
        return torch.ops.mla_kernels.project_append(x, weight, bias, query_dim, k_cache, v_cache, pos)
    return _project_append_impl(x, weight, bias, query_dim, k_cache, v_cache, input_pos)
