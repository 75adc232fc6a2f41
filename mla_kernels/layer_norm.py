"""A residual add and the layer norm after it, in one kernel, for generation.

A transformer block adds each sublayer's output to the residual stream and normalizes the sum
for the next sublayer: `x = x + y; h = layer_norm(x)`. At the few rows of a decode step both
are latency-bound launches of a few microseconds, 2 per sublayer (48 of a 12-layer model's
~150 kernels a step). Here one program per row reads x and y once, stores the sum and its
normalization. Forward only: generation runs without autograd; training keeps PyTorch's ops,
which torch.compile fuses itself.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mla_kernels._dispatch import (
    KERNEL_DTYPES,
    check_dtypes,
    check_tensors,
    interpreting,
    on_kernel_device,
    traced_or_eager,
)
from mla_kernels._register import register_op
from mla_kernels.reference import add_layer_norm_dtypes, add_layer_norm_ref

MAX_WIDTH = 16384  # widest row one program holds in registers (C of the largest GPT-style models)
ALLOWED_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 (a model in double) runs the reference
INTERPRETER_BLOCK_M = 64  # the CPU interpreter runs programs one by one: many rows each


@triton.jit
def _add_layer_norm_kernel(
    X, Y, WEIGHT, BIAS, SUM, OUT, M, C, eps,
    stride_xm, stride_ym, stride_sm, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows m of one block: SUM[m] = X[m] + Y[m] (rounded to SUM's dtype), OUT[m] = its layer
    norm, in float32 from the rounded sum, so OUT is exactly the norm of what SUM holds.
    X, Y, SUM, OUT (M, C) through their row strides, contiguous rows; WEIGHT, BIAS (C,)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: long prefills pass 2^31
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < M)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + rows[:, None] * stride_ym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    total = (x + y).to(SUM.dtype.element_ty)  # (BLOCK_M, BLOCK_C)
    tl.store(SUM + rows[:, None] * stride_sm + cols[None, :], total, mask=ok)
    s = total.to(tl.float32)
    mean = tl.sum(s, axis=1) / C  # (BLOCK_M,)
    centered = tl.where(ok, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)
    out = centered * rstd[:, None] * tl.load(WEIGHT + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :], out.to(OUT.dtype.element_ty), mask=ok)


def _warps(block_c):
    """Warps per row program: block_c // 256 (32 threads x 8 values each) between 4 and 16, so 8
    values per thread from 1024 to 4096 columns and up to 32 at MAX_WIDTH."""
    return max(4, min(16, block_c // 256))


def _add_layer_norm_triton(x, y, weight, bias, eps, norm_dtype):
    C = x.shape[-1]
    x2, y2 = (t.reshape(-1, C) for t in (x, y))
    x2, y2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, y2))
    M = x2.shape[0]
    total = torch.empty(x2.shape, device=x.device, dtype=torch.result_type(x, y))  # (M, C)
    out = torch.empty(x2.shape, device=x.device, dtype=norm_dtype)  # (M, C)
    block_m = INTERPRETER_BLOCK_M if interpreting() else 1  # on a GPU one row a program: a decode step has few
    block_c = triton.next_power_of_2(C)
    _add_layer_norm_kernel[(triton.cdiv(M, block_m),)](
        x2, y2, weight, weight if bias is None else bias, total, out, M, C, eps,
        x2.stride(0), y2.stride(0), total.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_warps(block_c))
    return total.view(x.shape), out.view(x.shape)


def _add_layer_norm_impl(x, y, weight, bias, eps, norm_dtype):
    if not on_kernel_device(x) or torch.float64 in (x.dtype, y.dtype):
        return add_layer_norm_ref(x, y, weight, bias, eps, norm_dtype)
    return _add_layer_norm_triton(x, y, weight, bias, eps, norm_dtype)


def _add_layer_norm_launch(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
    norm_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _add_layer_norm_impl(x, y, weight, bias, eps, norm_dtype)


def _add_layer_norm_fake(x, y, weight, bias, eps, norm_dtype):
    return x.new_empty(x.shape, dtype=torch.result_type(x, y)), x.new_empty(x.shape, dtype=norm_dtype)


# opaque to Inductor, as the other generation ops (a decode step is replayed from a CUDA graph)
_add_layer_norm_op = register_op("add_layer_norm", _add_layer_norm_launch, _add_layer_norm_fake, traceable=False)


def add_layer_norm(x, y, weight, bias=None, eps=1e-5):
    """(x + y, layer_norm(x + y)) over the last dim, in one kernel.

    x, y: (..., C) of one shape, float16 / bfloat16 / float32 (they may differ: the sum promotes
      them, as `x + y` does), C <= MAX_WIDTH; weight: (C,), bias: (C,) or None, in any of those
      dtypes; eps: the variance's epsilon. float64 inputs (a model in double) run the reference.
    Returns sum (..., C) in the promoted dtype, and its layer norm (..., C), computed in float32
    from the sum as stored, in the dtype `F.layer_norm` would return (`add_layer_norm_dtypes`:
    float32 under CUDA autocast, else the sum's). No autograd (generation runs without it): inputs
    that require grad while grad is enabled are refused. On CPU tensors without TRITON_INTERPRET=1
    it runs `mla_kernels.reference.add_layer_norm_ref`.
    """
    check_tensors(x=x, y=y, weight=weight, **({} if bias is None else {"bias": bias}))
    for name, t in (("x", x), ("y", y), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_dtypes(ALLOWED_DTYPES, **{name: t})
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 0 or not 1 <= x.shape[-1] <= MAX_WIDTH:
        raise ValueError(f"x must be (..., C) with 1 <= C <= {MAX_WIDTH}, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{name} must be ({C},), got {tuple(t.shape)}")
    if not isinstance(eps, float) or eps <= 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, weight, bias)):
        raise RuntimeError("add_layer_norm has no backward: call it under torch.no_grad() or "
                           "torch.inference_mode(), or use x + y and F.layer_norm where gradients are needed")
    norm_dtype = add_layer_norm_dtypes(x, y)[1]  # decided here, outside any trace, from autocast's state
    op = traced_or_eager(_add_layer_norm_op, _add_layer_norm_impl)
    return op(x, y, weight, bias, eps, norm_dtype)
