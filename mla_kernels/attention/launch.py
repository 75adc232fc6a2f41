"""Launchers of the attention kernels: grids, strides, outputs and the dK/dV head split.

`attention_forward` and `attention_backward` take and return tensors in flash-attention's layout
(B, T, heads, dim); `op.py` registers them as ops and gives them autograd.
"""
import torch
import triton
from torch.library import wrap_triton

from mla_kernels._tiles import LOG2E, num_sms, tile_dim
from mla_kernels.attention.kernels import (
    DKDV_BLOCK_N,
    DKDV_MIN_SPLIT_QUERY_BLOCKS,
    DKDV_PROGRAMS_PER_SM,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_preprocess,
    _fwd_kernel,
)


def _length_buckets(Tq, Tk):
    """Autotune keys: lengths rounded up to a power of two (the kernels never read them).

    Keyed on exact lengths, generation (one more key each step) would re-tune at every length.
    """
    return 1 << (Tq - 1).bit_length(), 1 << (Tk - 1).bit_length()


def dkdv_head_splits(programs, rep, sms, query_blocks):
    """Programs per (batch, KV head, key block) in the dK/dV backward.

    One program per key block sums all rep query heads of its group. With one latent group (MLA's
    absorbed core) that leaves a few hundred programs of very unequal length (causal: the first key
    block sees every query, the last one block), all resident at once, and the step waits for the
    longest. S programs per key block each take rep / S heads and write float32 partial sums, added
    after the kernel: S is the smallest divisor of rep with programs * S >= DKDV_PROGRAMS_PER_SM *
    sms (else rep). Short sequences (query_blocks < DKDV_MIN_SPLIT_QUERY_BLOCKS) are not split: the
    partials' extra writes and sum cost more than the balance gains (measured on the H200, d 32,
    12 heads per group: 2 splits were 1.23x slower at T 256 and 1.23-1.5x faster at T 1024-8192).
    programs: B * g * cdiv(Tk, DKDV_BLOCK_N); sms: the device's multiprocessors;
    query_blocks: cdiv(Tq, DKDV_BLOCK_N), the longest program's query blocks.
    """
    if query_blocks < DKDV_MIN_SPLIT_QUERY_BLOCKS:
        return 1
    wanted = DKDV_PROGRAMS_PER_SM * sms
    return next((s for s in range(1, rep + 1) if rep % s == 0 and programs * s >= wanted), rep)


def _prec(dtype):
    """Matrix-unit mode: exact float32 products for float32 inputs, native for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_forward(q, k, v, softmax_scale, q_offset, w_uk=None, w_uv=None):
    """Launch the forward kernel.

    Core: q (B, Tq, nh, Dq), k (B, Tk, g, Dq), v (B, Tk, g, Dv).
    Expanded (w_uk, w_uv given): k / v are the latents c_k (B, Tk, g, r), c_v (B, Tk, g, rv),
      w_uk (nh, r, Dq), w_uv (nh, rv, Dv).
    Returns out (B, Tq, nh, Dv) in q's dtype and lse (B, nh, Tq) float32 (natural log).
    """
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    B, Tq, nh, dq = q.shape
    Tk, g, dk_in = k.shape[1], k.shape[2], k.shape[3]
    dv_in = v.shape[3]
    expand = w_uk is not None
    if expand:
        w_uk, w_uv = w_uk.contiguous(), w_uv.contiguous()
        d_out = w_uv.shape[2]
        wk_args = (w_uk, w_uv, w_uk.stride(0), w_uk.stride(1), w_uv.stride(0), w_uv.stride(1))
    else:
        d_out = dv_in
        wk_args = (q, q, 0, 0, 0, 0)
    out = torch.empty(B, Tq, nh, d_out, device=q.device, dtype=q.dtype)  # (B, Tq, nh, Dv)
    lse = torch.empty(B, nh, Tq, device=q.device, dtype=torch.float32)  # (B, nh, Tq)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * nh,)  # noqa: E731
    wrap_triton(_fwd_kernel)[grid](
        q, k, v, wk_args[0], wk_args[1], out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *wk_args[2:],
        out.stride(0), out.stride(1), out.stride(2),
        Tq, Tk, nh, nh // g, q_offset, softmax_scale * LOG2E, *_length_buckets(Tq, Tk),
        DQ=dq, DO=d_out, DK_IN=dk_in, DV_IN=dv_in,
        DQ_P=tile_dim(dq), DO_P=tile_dim(d_out), DK_P=tile_dim(dk_in), DV_P=tile_dim(dv_in),
        EXPAND=expand, PREC=_prec(q.dtype),
    )
    return out, lse


def attention_backward(do, q, k, v, out, lse, softmax_scale, q_offset, dlse=None):
    """Launch the three backward kernels of the core.

    do, out: (B, Tq, nh, Dv); q (B, Tq, nh, Dq); k (B, Tk, g, Dq); v (B, Tk, g, Dv);
    lse (B, nh, Tq) float32; dlse: optional gradient of lse (B, nh, Tq).
    Returns dq, dk, dv in the dtypes of q, k, v (dk / dv summed over each group's heads, by
    dkdv_head_splits programs per key block: more than one adds float32 partials after the kernel).
    """
    q, k, v, out, do = (_last_contig(t) for t in (q, k, v, out, do))
    B, Tq, nh, dq_dim = q.shape
    Tk, g, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    rep = nh // g
    delta = torch.empty(B, nh, Tq, device=q.device, dtype=torch.float32)  # (B, nh, Tq)
    pre_block = 64
    has_dlse = dlse is not None
    dlse_arg = dlse.float().contiguous() if has_dlse else delta
    wrap_triton(_bwd_preprocess)[(triton.cdiv(Tq, pre_block) * B * nh,)](
        out, do, dlse_arg, delta, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), Tq, nh,
        DV=dv_dim, DV_P=tile_dim(dv_dim), HAS_DLSE=has_dlse, BLOCK_M=pre_block,
    )
    dq = torch.empty_like(q)  # (B, Tq, nh, Dq)
    splits = dkdv_head_splits(B * g * triton.cdiv(Tk, DKDV_BLOCK_N), rep, num_sms(q.device),
                              triton.cdiv(Tq, DKDV_BLOCK_N))
    if rep % splits:
        raise ValueError(f"{splits} dK/dV programs per key block cannot share {rep} query heads per group evenly")
    if splits == 1:  # the programs write the gradients themselves
        dk_sums, dv_sums = torch.empty_like(k), torch.empty_like(v)  # (B, Tk, g, Dq), (B, Tk, g, Dv)
        sums_strides = (0, *dk_sums.stride()[:3], 0, *dv_sums.stride()[:3])
    else:
        dk_sums = torch.empty(splits, B, Tk, g, dq_dim, device=q.device, dtype=torch.float32)  # (S, B, Tk, g, Dq)
        dv_sums = torch.empty(splits, B, Tk, g, dv_dim, device=q.device, dtype=torch.float32)  # (S, B, Tk, g, Dv)
        sums_strides = (*dk_sums.stride()[:4], *dv_sums.stride()[:4])
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    common = dict(DQ=dq_dim, DV=dv_dim, DQ_P=tile_dim(dq_dim), DV_P=tile_dim(dv_dim), PREC=_prec(q.dtype))
    qk_scale = softmax_scale * LOG2E
    wrap_triton(_bwd_dkdv_kernel)[lambda meta: (B * g * splits, triton.cdiv(Tk, meta["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk_sums, dv_sums, *strides, *sums_strides,
        Tq, Tk, nh, g, rep, splits, q_offset, qk_scale, softmax_scale, *_length_buckets(Tq, Tk), **common,
    )
    wrap_triton(_bwd_dq_kernel)[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * nh,)](
        q, k, v, do, lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        Tq, Tk, nh, rep, q_offset, qk_scale, softmax_scale, *_length_buckets(Tq, Tk), **common,
    )
    if splits == 1:
        return dq, dk_sums, dv_sums
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # in k's and v's layouts, as the op's fake promises
    return dq, dk.copy_(dk_sums.sum(0)), dv.copy_(dv_sums.sum(0))
