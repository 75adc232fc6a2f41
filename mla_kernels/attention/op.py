"""The attention ops: their registration with torch.library, autograd, input checks and the public
functions `flash_attention` and `mla_attention_expanded` (the package's docstring says what they do).
"""
import math

import torch

from mla_kernels import reference
from mla_kernels._dispatch import (
    KERNEL_DTYPES,
    autocast_inputs,
    check_dtypes,
    check_ndim,
    check_tensors,
    on_kernel_device,
    traced_or_eager,
)
from mla_kernels._register import direct, eager_twin, register_op
from mla_kernels._tiles import tile_dim
from mla_kernels.attention.launch import attention_backward, attention_forward

MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256  # 256 bounds registers
# The fused expansion keeps each head's W_uk / W_uv tiles in shared memory for the whole program.
# Compiled for sm_90 (bench/tiles_sm90.py), 128 KB of them fit beside the smallest tiles (bf16 hs
# 256 with r 128: 208 KB of 227; float32 hs 128 with r 128: 224 KB); 256 KB (bf16 hs 256, r 256)
# needs 352 KB. Wider expansions build K / V in device memory and run the core kernel instead.
MAX_RESIDENT_WEIGHT_BYTES = 128 * 1024
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs the reference


# ----------------------------------------------------------------------------- ops


def _flash_fwd_fake(q, k, v, softmax_scale, q_offset):
    B, Tq, nh, _ = q.shape
    return q.new_empty(B, Tq, nh, v.shape[-1]), q.new_empty(B, nh, Tq, dtype=torch.float32)


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
               q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, softmax_scale, q_offset)


_flash_fwd_op = register_op("flash_attention_fwd", _flash_fwd, _flash_fwd_fake)


def _flash_bwd_fake(do, dlse, q, k, v, out, lse, softmax_scale, q_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_bwd(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
               q_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, out, lse, softmax_scale, q_offset, dlse)


_flash_bwd_op = register_op("flash_attention_bwd", _flash_bwd, _flash_bwd_fake)


def _flash_setup_context(ctx, inputs, output, eager=False):
    q, k, v, softmax_scale, q_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.q_offset, ctx.eager = softmax_scale, q_offset, eager
    # an unused output's gradient arrives as None, not as a tensor of zeros to allocate and fill
    # (~0.7 ms of host time per call on the H200, for the usually unused lse)
    ctx.set_materialize_grads(False)


def _core_backward(ctx, dout, dlse, q, k, v, out, lse):
    """dq, dk, dv: the launchers when called eagerly, the custom op when traced by torch.compile."""
    if dout is None:
        dout = torch.zeros_like(out)
    if ctx.eager:
        return direct(_flash_bwd)(dout, dlse, q, k, v, out, lse, ctx.softmax_scale, ctx.q_offset)
    return _flash_bwd_op(dout, dlse, q, k, v, out, lse, ctx.softmax_scale, ctx.q_offset)


def _flash_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _core_backward(ctx, dout, dlse, q, k, v, out, lse)
    return dq, dk, dv, None, None


_flash_fwd_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)
_flash_eager = eager_twin("flash_attention", _flash_fwd, _flash_setup_context, _flash_backward)


def _mla_expanded_fwd_fake(q, c_k, c_v, w_uk, w_uv, softmax_scale, q_offset):
    B, Tq, nh, _ = q.shape
    return q.new_empty(B, Tq, nh, w_uv.shape[-1]), q.new_empty(B, nh, Tq, dtype=torch.float32)


def _mla_expanded_fwd(q: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor, w_uk: torch.Tensor,
                      w_uv: torch.Tensor, softmax_scale: float, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, c_k, c_v, softmax_scale, q_offset, w_uk, w_uv)


_mla_expanded_fwd_op = register_op("mla_attention_expanded_fwd", _mla_expanded_fwd, _mla_expanded_fwd_fake)


def _mla_expanded_setup_context(ctx, inputs, output, eager=False):
    q, c_k, c_v, w_uk, w_uv, softmax_scale, q_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, c_k, c_v, w_uk, w_uv, out, lse)
    ctx.softmax_scale, ctx.q_offset, ctx.eager = softmax_scale, q_offset, eager
    ctx.set_materialize_grads(False)


def _mla_expanded_backward(ctx, dout, dlse):
    """Expands K / V per head in device memory (B, Tk, nh, hs) with torch, runs the core backward
    kernels on them, then maps dK / dV back through the expansion (dc = dk W^T summed over the
    group's heads, dW = c^T dk). The forward never materializes K / V; this backward does, once,
    for the duration of the call."""
    q, c_k, c_v, w_uk, w_uv, out, lse = ctx.saved_tensors
    nh, g = q.shape[2], c_k.shape[2]
    rep = nh // g
    k = reference.expand_latent(c_k, w_uk)  # (B, Tk, nh, hs)
    v = reference.expand_latent(c_v, w_uv)  # (B, Tk, nh, hs)
    dq, dk, dv = _core_backward(ctx, dout, dlse, q, k, v, out, lse)
    B, Tk = c_k.shape[:2]
    dk_g = dk.view(B, Tk, g, rep, -1)  # (B, Tk, g, rep, hs)
    dv_g = dv.view(B, Tk, g, rep, -1)  # (B, Tk, g, rep, hs)
    wk_g = w_uk.view(g, rep, *w_uk.shape[1:])  # (g, rep, r, hs)
    wv_g = w_uv.view(g, rep, *w_uv.shape[1:])  # (g, rep, rv, hs)
    dc_k = torch.einsum("btgjd,gjrd->btgr", dk_g, wk_g)  # (B, Tk, g, r)
    dc_v = torch.einsum("btgjd,gjrd->btgr", dv_g, wv_g)  # (B, Tk, g, rv)
    dw_uk = torch.einsum("btgr,btgjd->gjrd", c_k, dk_g).reshape(w_uk.shape)  # (nh, r, hs)
    dw_uv = torch.einsum("btgr,btgjd->gjrd", c_v, dv_g).reshape(w_uv.shape)  # (nh, rv, hs)
    return dq, dc_k, dc_v, dw_uk, dw_uv, None, None


_mla_expanded_fwd_op.register_autograd(_mla_expanded_backward, setup_context=_mla_expanded_setup_context)
_mla_expanded_eager = eager_twin("mla_attention_expanded", _mla_expanded_fwd, _mla_expanded_setup_context,
                                 _mla_expanded_backward)


# ----------------------------------------------------------------------------- public API


def _check_head_dim(name, d):
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")


def _resolve_offset(q_offset, Tq, Tk):
    if q_offset is None:
        q_offset = Tk - Tq
    if not isinstance(q_offset, int):
        raise TypeError(f"q_offset must be an int or None, got {type(q_offset).__name__}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0 so every query sees a key, got {q_offset} "
                         f"(Tq {Tq}, Tk {Tk}; the default is Tk - Tq)")
    return q_offset


def flash_attention(q, k, v, softmax_scale=None, q_offset=None, return_lse=False):
    """Causal flash attention with grouped KV heads and separate qk / v head dims.

    q: (B, Tq, nh, Dqk); k: (B, Tk, g, Dqk); v: (B, Tk, g, Dv); nh % g == 0, head h reads KV
      head h // (nh // g). Head dims 1..256, any (padded inside to a power of two >= 16, masked).
      float16 / bfloat16 (float32 accumulation) or float32; other dtypes use the reference.
      Under `torch.autocast` the inputs are first cast to its dtype, as PyTorch's SDPA does.
    softmax_scale: defaults to 1 / sqrt(Dqk).
    q_offset: position of query 0 among the keys, query i sees keys j <= q_offset + i;
      default Tk - Tq (bottom-right aligned, as in cached prefill); must be >= 0.
    Returns out (B, Tq, nh, Dv) in q's dtype, and with return_lse=True also the natural-log
    logsumexp (B, nh, Tq) float32 of the scaled, masked scores. Differentiable in q, k, v
    (dk, dv summed over the heads of each group) and through lse.
    """
    check_tensors(q=q, k=k, v=v)
    for name, t, layout in (("q", q, "(B, Tq, nh, Dqk)"), ("k", k, "(B, Tk, g, Dqk)"), ("v", v, "(B, Tk, g, Dv)")):
        check_ndim(name, t, layout)
    q, k, v = autocast_inputs(q, k, v)
    check_dtypes(FLOAT_DTYPES, q=q, k=k, v=v)
    B, Tq, nh, dqk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share (B, Tk, g)")
    if k.shape[3] != dqk:
        raise ValueError(f"k head dim {k.shape[3]} must equal q head dim {dqk}")
    g = k.shape[2]
    if nh % g:
        raise ValueError(f"query heads nh={nh} must be a multiple of KV heads g={g}")
    _check_head_dim("q/k", dqk)
    _check_head_dim("v", v.shape[3])
    Tk = k.shape[1]
    q_offset = _resolve_offset(q_offset, Tq, Tk)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(dqk)
    if on_kernel_device(q) and q.dtype in KERNEL_DTYPES:
        out, lse = traced_or_eager(_flash_fwd_op, _flash_eager)(q, k, v, float(softmax_scale), q_offset)
    else:
        out, lse = reference.attention_ref(q, k, v, softmax_scale, q_offset)
    return (out, lse) if return_lse else out


def mla_attention_expanded(q, c_k, c_v, w_uk, w_uv, softmax_scale=None, q_offset=None, return_lse=False):
    """MLA attention with K / V tiles expanded on-chip from the latents (never stored).

    q: (B, Tq, nh, hs); c_k: (B, Tk, g, r); c_v: (B, Tk, g, rv) (pass c_k again for a joint
    latent); w_uk: (nh, r, hs); w_uv: (nh, rv, hs); k_h = c_k[grp(h)] W_uk^h, v_h likewise.
    softmax_scale defaults to 1 / sqrt(hs); q_offset as in `flash_attention`.
    Under `torch.autocast` all five are first cast to its dtype (float32 parameters meet
    bfloat16 activations as in `F.linear`).
    Returns out (B, Tq, nh, hs) (and lse (B, nh, Tq) with return_lse=True). Differentiable in
    all five tensors; the backward expands K / V in device memory. When W_uk and
    W_uv of one head do not fit in shared memory together (MAX_RESIDENT_WEIGHT_BYTES, e.g. hs 256
    with r 256 in bf16), the forward expands K / V in device memory too and runs `flash_attention`.
    """
    check_tensors(q=q, c_k=c_k, c_v=c_v, w_uk=w_uk, w_uv=w_uv)
    for name, t, layout in (("q", q, "(B, Tq, nh, hs)"), ("c_k", c_k, "(B, Tk, g, r)"), ("c_v", c_v, "(B, Tk, g, rv)"),
                            ("w_uk", w_uk, "(nh, r, hs)"), ("w_uv", w_uv, "(nh, rv, hs)")):
        check_ndim(name, t, layout)
    q, c_k, c_v, w_uk, w_uv = autocast_inputs(q, c_k, c_v, w_uk, w_uv)
    check_dtypes(FLOAT_DTYPES, q=q, c_k=c_k, c_v=c_v, w_uk=w_uk, w_uv=w_uv)
    B, Tq, nh, hs = q.shape
    Tk, g, r = c_k.shape[1:]
    rv = c_v.shape[3]
    if c_k.shape[0] != B or c_v.shape[:3] != c_k.shape[:3]:
        raise ValueError(f"c_k {tuple(c_k.shape)} and c_v {tuple(c_v.shape)} must share (B={B}, Tk, g)")
    if nh % g:
        raise ValueError(f"query heads nh={nh} must be a multiple of latent groups g={g}")
    if tuple(w_uk.shape) != (nh, r, hs):
        raise ValueError(f"w_uk must have shape (nh, r, hs) = {(nh, r, hs)}, got {tuple(w_uk.shape)}")
    if w_uv.shape[0] != nh or w_uv.shape[1] != rv:
        raise ValueError(f"w_uv must have shape (nh, rv, hs_v) = ({nh}, {rv}, hs_v), got {tuple(w_uv.shape)}")
    for name, d in (("hs", hs), ("r", r), ("rv", rv), ("w_uv hs", w_uv.shape[2])):
        _check_head_dim(name, d)
    q_offset = _resolve_offset(q_offset, Tq, Tk)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(hs)
    resident_bytes = (tile_dim(r) * tile_dim(hs) + tile_dim(rv) * tile_dim(w_uv.shape[2])) * q.element_size()
    if not (on_kernel_device(q) and q.dtype in KERNEL_DTYPES):
        out, lse = reference.mla_attention_expanded_ref(q, c_k, c_v, w_uk, w_uv, softmax_scale, q_offset)
    elif resident_bytes <= MAX_RESIDENT_WEIGHT_BYTES:
        op = traced_or_eager(_mla_expanded_fwd_op, _mla_expanded_eager)
        out, lse = op(q, c_k, c_v, w_uk, w_uv, float(softmax_scale), q_offset)
    else:  # too wide to keep on chip: expand K / V in memory
        k, v = reference.expand_latent(c_k, w_uk), reference.expand_latent(c_v, w_uv)  # (B, Tk, nh, hs) each
        out, lse = flash_attention(q, k, v, softmax_scale, q_offset, return_lse=True)
    return (out, lse) if return_lse else out
