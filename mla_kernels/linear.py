"""A linear layer for the few rows of a decode step, with its bias and GELU in the epilogue.

At B x T <= MAX_ROWS rows a linear layer reads its whole weight to produce a few output rows:
it is bound by the weight's bytes, and on the H200 cuBLAS runs such shapes as a split-K GEMM
plus a separate reduce kernel, then GELU is a third launch. Here each program owns BLOCK_N output
columns of every row and one slice of K; when K is split, each program stores its float32 partial
sums, and the last program of a column block to arrive (counted by an atomic) adds them in split
order and applies the epilogue: one launch, deterministic sums, the activation fused.
Forward only: generation runs without autograd; training keeps nn.Linear.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from mla_kernels._dispatch import (
    KERNEL_DTYPES,
    autocast_inputs,
    check_dtypes,
    check_tensors,
    interpreting,
    on_kernel_device,
    traced_or_eager,
)
from mla_kernels._register import register_op
from mla_kernels.reference import ACTIVATIONS, linear_ref

MAX_ROWS = 64  # rows (B x new tokens) one program holds: a decode step's; more go to cuBLAS
ALLOWED_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 (a model in double) runs the reference
# GPU tile (BLOCK_N, BLOCK_K, warps, stages) and how many programs per multiprocessor the split
# of K aims for: bench/linear.py --tiles on the H200 (docs/decisions.md)
GPU_TILE = (16, 256, 4, 3)
PROGRAMS_PER_SM = 2
# The interpreter: small tiles and a pretend 8-program GPU, so the CPU tests split K and reduce
INTERPRETER_TILE = (16, 32, 4, 1)
INTERPRETER_PROGRAMS = 8
_ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2}
_ARRIVALS = {}  # device -> int32 arrival counters, all 0 between launches (each reducer resets its own)
ARRIVAL_SLOTS = 4096  # column blocks one launch may split: N up to 65536 at BLOCK_N 16


@triton.jit
def _epilogue(acc, BIAS, offs_n, n_ok, out_ty: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) float32 sums -> the output tile in out_ty: bias added in float32,
    rounded to out_ty, then the activation on the rounded value (as F.linear, then F.gelu)."""
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ty).to(tl.float32)
    if ACTIVATION == 1:  # GELU, erf form: nn.GELU()
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 2:  # GELU, tanh form: nn.GELU(approximate='tanh'); tanh u = 1 - 2 / (e^2u + 1)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)  # sqrt(2 / pi) (y + 0.044715 y^3)
        y = 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    return y.to(out_ty)


@triton.jit
def _linear_kernel(
    X, W, BIAS, OUT, PARTIALS, ARRIVALS, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SPLITS: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[:, n block] = act(X W^T + b) for every row, over K slice tl.program_id(1).

    X (M, K), M <= BLOCK_M, W (N, K), OUT (M, N), through their row strides (contiguous rows);
    W read in X's dtype (a float32 weight under autocast is rounded as autocast would).
    SPLITS > 1: PARTIALS (SPLITS, M, N) float32 take each slice's sums; ARRIVALS (>= N blocks)
    int32, all 0, counts the slices done per column block; the last one adds them in order
    0..SPLITS-1, writes OUT and sets its counter back to 0.
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + offs_k) < k_hi
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(W + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0).to(x.dtype)  # (BLOCK_K, BLOCK_N)
        if IEEE_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)

    ok = m_ok[:, None] & n_ok[None, :]
    out_ptrs = OUT + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLITS == 1:
        tl.store(out_ptrs, _epilogue(acc, BIAS, offs_n, n_ok, OUT.dtype.element_ty, HAS_BIAS, ACTIVATION), mask=ok)
    else:
        tile = offs_m[:, None] * N + offs_n[None, :]  # (BLOCK_M, BLOCK_N) offsets in one split's (M, N)
        tl.store(PARTIALS + split * M * N + tile, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is issued before the arrival is counted
        arrived = tl.atomic_add(ARRIVALS + pid_n, 1, sem="acq_rel", scope="gpu")  # the count before this one
        if arrived == SPLITS - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLITS):  # in split order: the sum does not depend on arrival order
                total += tl.load(PARTIALS + s * M * N + tile, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, _epilogue(total, BIAS, offs_n, n_ok, OUT.dtype.element_ty, HAS_BIAS, ACTIVATION),
                     mask=ok)
            tl.atomic_xchg(ARRIVALS + pid_n, 0)  # ready for the next launch


def _arrivals(device, n_blocks):
    """The device's arrival counters, made on its first split launch; None when they would have to
    be made inside a CUDA-graph capture (the launch then runs unsplit)."""
    counters = _ARRIVALS.get(device)
    if counters is None and n_blocks <= ARRIVAL_SLOTS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _ARRIVALS[device] = torch.zeros(ARRIVAL_SLOTS, dtype=torch.int32, device=device)
    return counters if n_blocks <= ARRIVAL_SLOTS else None


def _program_target(device, programs_per_sm):
    if interpreting():
        return INTERPRETER_PROGRAMS
    return programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def split_count(n_blocks, K, block_k, programs):
    """(splits, k_per_split): K cut into whole BLOCK_K slices so that n_blocks x splits reaches
    `programs` (two per multiprocessor), never more slices than K has blocks."""
    k_blocks = triton.cdiv(K, block_k)
    splits = max(1, min(k_blocks, triton.cdiv(programs, n_blocks)))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    return triton.cdiv(K, k_per_split), k_per_split


def _linear_triton(x, weight, bias, activation, tile=None, programs_per_sm=PROGRAMS_PER_SM):
    """The launch; tile (BLOCK_N, BLOCK_K, warps, stages) and programs_per_sm are the shipped
    ones unless given (bench/linear.py --tiles sweeps them)."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)  # (M, N)
    block_n, block_k, warps, stages = tile or (INTERPRETER_TILE if interpreting() else GPU_TILE)
    n_blocks = triton.cdiv(N, block_n)
    splits, k_per_split = split_count(n_blocks, K, block_k, _program_target(x.device, programs_per_sm))
    arrivals = _arrivals(x.device, n_blocks) if splits > 1 else None
    if arrivals is None:
        splits, k_per_split = 1, K
    partials = torch.empty((splits, M, N), device=x.device, dtype=torch.float32) if splits > 1 else out
    _linear_kernel[(n_blocks, splits)](
        x2, weight, weight if bias is None else bias, out, partials, out if arrivals is None else arrivals,
        M, N, K, k_per_split, x2.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATION_CODES[activation], SPLITS=splits,
        IEEE_DOT=x.dtype == torch.float32, BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], N)


def _linear_impl(x, weight, bias, activation):
    if not on_kernel_device(x) or x.dtype == torch.float64:
        return linear_ref(x, weight, bias, activation)
    return _linear_triton(x, weight, bias, activation)


def _linear_launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   activation: Optional[str]) -> torch.Tensor:
    return _linear_impl(x, weight, bias, activation)


def _linear_fake(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# opaque to Inductor, as the other generation ops (a decode step is replayed from a CUDA graph)
_linear_op = register_op("decode_linear", _linear_launch, _linear_fake, traceable=False)


def decode_linear(x, weight, bias=None, activation=None):
    """act(x weight^T + bias) for at most MAX_ROWS rows, in one kernel.

    x: (..., K) whose leading dims hold at most MAX_ROWS rows, float16 / bfloat16 / float32;
    weight: (N, K) and bias: (N,) or None, in x's dtype (under autocast: x is cast to autocast's
    dtype and a float32 weight and bias are rounded to it inside the kernel, as autocast's casts
    would); activation: None, 'gelu' (erf, nn.GELU()) or 'gelu_tanh' (nn.GELU(approximate='tanh')),
    applied to the linear's output rounded to the output dtype, as F.linear then F.gelu do.
    Returns (..., N) in x's (autocast) dtype. float64 inputs, and CPU tensors without
    TRITON_INTERPRET=1, run `mla_kernels.reference.linear_ref`. No autograd (generation runs
    without it): inputs that require grad while grad is enabled are refused.
    """
    check_tensors(x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.shape[0] == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., K) and weight (N, K) with N, K >= 1, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x holds {rows} rows (its leading dims {tuple(x.shape[:-1])}); decode_linear takes "
                         f"1 to {MAX_ROWS} (use F.linear for more)")
    if weight.numel() >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)} holds {weight.numel()} elements; decode_linear's int32 "
                         f"offsets take fewer than 2^31")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("decode_linear has no backward: call it under torch.no_grad() or "
                           "torch.inference_mode(), or use F.linear where gradients are needed")
    autocasting = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    if autocasting:
        (x,) = autocast_inputs(x)
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None:
                check_dtypes(ALLOWED_DTYPES, **{name: t})
    else:
        check_dtypes(ALLOWED_DTYPES, x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    op = traced_or_eager(_linear_op, _linear_impl)
    return op(x, weight, bias, activation)
