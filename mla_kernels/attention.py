"""Causal flash attention for MLA training: latent-space core and fused-expansion path.

Two entry points, both differentiable and registered as `torch.library.triton_op`s
(namespace `mla_kernels`) with autograd, so `torch.compile` traces through them without a
graph break and Inductor launches the Triton kernels from its own generated code, as it
launches its own (no per-call Python launcher, dispatcher or autotuner lookup inside a
compiled step). Eager calls go straight to the launchers through `autograd.Function`s.

- `flash_attention(q, k, v)`: causal grouped-query attention with separate qk / v head
  dims (the absorbed MLA core runs it with head dim r over the latents themselves).
- `mla_attention_expanded(q, c_k, c_v, w_uk, w_uv)`: attention whose K / V tiles are built
  on-chip from latent tiles (k = c^k W_uk^h, v = c^v W_uv^h); the cheaper path when the
  latent width r exceeds the head size.

Kernels follow flash attention v2: softmax in base 2 (scale folded with log2 e), causal
work split into blocks below the diagonal (no mask) and blocks on it (masked), logsumexp
stored for the backward, which runs in three launches: delta = rowsum(o * do), dK/dV
over query blocks (GQA: summed over the heads of a group inside the program, no atomics; with
few KV heads, as MLA's one latent group, the heads are split over several programs whose float32
partials are added after), and dQ over key blocks. Head dims that are not powers of two are padded to the next one
inside the kernels and masked.

Where the kernels run: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (the Triton
interpreter, used by the tests). Everywhere else (CPU without the interpreter, float64)
both entry points fall back to `mla_kernels.reference`, which autograd differentiates.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton

from mla_kernels import reference
from mla_kernels._dispatch import (
    KERNEL_DTYPES,
    autocast_inputs,
    check_dtypes,
    check_ndim,
    check_tensors,
    interpreting,
    on_kernel_device,
    traced_or_eager,
    tuned_candidates,
)
from mla_kernels._tiles import LOG2E, num_sms, tile_dim

LN2 = 0.6931471805599453  # ln(2): converts the base-2 logsumexp back to natural log
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256  # 256 bounds registers
# The fused expansion keeps each head's W_uk / W_uv tiles in shared memory for the whole program.
# Compiled for sm_90 (bench/tiles_sm90.py), 128 KB of them fit beside the smallest tiles (bf16 hs
# 256 with r 128: 208 KB of 227; float32 hs 128 with r 128: 224 KB); 256 KB (bf16 hs 256, r 256)
# needs 352 KB. Wider expansions build K / V in device memory and run the core kernel instead.
MAX_RESIDENT_WEIGHT_BYTES = 128 * 1024
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs the reference
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


# ----------------------------------------------------------------------------- tiles

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tile candidates on the GPU, per kernel, in order of
# preference. On an H200 (bench/tiles.py, bf16) the first won every measured shape at head dims 32
# and 64 (the GPT's MLA core at r 32 and GPT-2's heads, T 256-8192; the other candidates took
# 1.02-1.57x its time): below SEARCH_HEAD_DIM it is compiled alone, with no search. At head dim 128
# the second won the dK/dV and dQ kernels (1.24x and 1.21x faster), so from there the autotuner
# times every candidate that fits. The last of each fits head dim 256 with the fused expansion.
GPU_CONFIGS = {
    "fwd": [(64, 64, 4, 3), (64, 32, 4, 2)],
    "dkdv": [(64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2)],
    "dq": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)],
}
SEARCH_HEAD_DIM = 128
# The dK/dV backward splits a group's query heads over more programs until each multiprocessor has
# this many (dkdv_head_splits), where the longest program covers at least DKDV_MIN_SPLIT_QUERY_BLOCKS
# query blocks; DKDV_BLOCK_N is the key tile it counts programs with (the first candidate's). Both
# constants come from the whole backward timed at every split count on the H200 (bench/tiles.py).
DKDV_PROGRAMS_PER_SM = 2
DKDV_MIN_SPLIT_QUERY_BLOCKS = 16
DKDV_BLOCK_N = GPU_CONFIGS["dkdv"][0][1]
# The interpreter runs one small config, BLOCK_M != BLOCK_N on purpose so the tests cover
# unequal tiles (the dK/dV kernel tiles the other way round).
INTERPRETER_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}


def _as_configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in tiles]


def gpu_configs(kind):
    """A kernel's GPU tile candidates as triton.Config, on any machine ('fwd', 'dkdv' or 'dq')."""
    return _as_configs(GPU_CONFIGS[kind])


def _configs(kind):
    return _as_configs([INTERPRETER_CONFIGS[kind]]) if interpreting() else gpu_configs(kind)


def _max_tile_area(widest, forward, expand):
    """Largest BLOCK_M * BLOCK_N whose program fits the H200's 227 KB of shared memory, by the widest
    padded head dim (each candidate compiled for sm_90: at 256 the backward's three-stage pipeline
    of q / do tiles needs 257 KB at 64 x 64, the fused expansion's resident W_uk / W_uv 280 KB)."""
    if widest < 128:
        return 128 * 128
    if widest < 256:
        return 64 * 128
    return 64 * 64 if forward and not expand else 64 * 32


def _prune(configs, named_args, **kwargs):
    """The candidates the autotuner times (its hook): those that fit shared memory at this head dim,
    only the first of them below SEARCH_HEAD_DIM."""
    args = {**named_args, **kwargs}
    widest = max(args[n] for n in ("DQ_P", "DO_P", "DK_P", "DV_P") if n in args)
    if "Q" in args:  # tiles are sized for 16-bit inputs: a float32 dim d takes the bytes of a 16-bit 2d
        widest *= max(1, args["Q"].element_size() // 2)
    limit = _max_tile_area(widest, forward="EXPAND" in args, expand=bool(args.get("EXPAND")))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit] or configs[-1:]
    return tuned_candidates(kept if widest >= SEARCH_HEAD_DIM else kept[:1])


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_tile(base, rows, cols, stride_row, n_rows, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """(len(rows), len(cols)) tile of a row-major matrix whose last dim is contiguous."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, wk, wv, k_base, v_base, stride_kt, stride_vt,
               lo, hi, q_pos, offs_n, offs_dk, offs_dv, Tk, qk_scale,
               DK_IN: tl.constexpr, DV_IN: tl.constexpr,
               EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EXPAND: tl.constexpr,
               PREC: tl.constexpr):
    """Online-softmax accumulation over key blocks [lo, hi); MASKED applies causality and Tk."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        k = _load_tile(k_base, cols, offs_dk, stride_kt, Tk, DK_IN, MASKED, not EVEN_DK)
        v = _load_tile(v_base, cols, offs_dv, stride_vt, Tk, DV_IN, MASKED, not EVEN_DV)
        if EXPAND:  # build the head's K / V tiles on-chip from the latent tiles
            k = tl.dot(k, wk, input_precision=PREC).to(q.dtype)  # (BLOCK_N, DQ_P)
            v = tl.dot(v, wv, input_precision=PREC).to(q.dtype)  # (BLOCK_N, DO_P)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            keep = (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < Tk)
            s = tl.where(keep, s, float("-inf"))
        # the scale goes into the exp2's argument, one FFMA per score (measured 1-3% faster than
        # scaling the scores first); a conditional rescale (FA4's) was 8-10% slower (docs/decisions.md)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # (BLOCK_M,) log2 units
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(_configs("fwd"), key=["TQ_BUCKET", "TK_BUCKET", "DQ_P", "DO_P", "DK_P", "DV_P", "EXPAND"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def _fwd_kernel(Q, K, V, WK, WV, O, LSE,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                swkh, swkr, swvh, swvr, sob, sot, soh,
                Tq, Tk, NH, REP, q_offset, qk_scale, TQ_BUCKET, TK_BUCKET,
                DQ: tl.constexpr, DO: tl.constexpr, DK_IN: tl.constexpr, DV_IN: tl.constexpr,
                DQ_P: tl.constexpr, DO_P: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr,
                EXPAND: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). Grid (cdiv(Tq, BLOCK_M), B * NH)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    kvh = h // REP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, DQ_P)
    offs_do = tl.arange(0, DO_P)
    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_dq, sqt, Tq, DQ, True, DQ != DQ_P)
    if EXPAND:
        wk = _load_tile(WK + h * swkh, offs_dk, offs_dq, swkr, DK_IN, DQ, DK_IN != DK_P, DQ != DQ_P)
        wv = _load_tile(WV + h * swvh, offs_dv, offs_do, swvr, DV_IN, DO, DV_IN != DV_P, DO != DO_P)
    else:
        wk = q
        wv = q
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    q_pos = q_offset + offs_m  # (BLOCK_M,) absolute position of each query among the keys
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DO_P], tl.float32)
    # keys every row of the block sees: [0, q_offset + start_m], cut to whole blocks inside Tk
    full_end = (tl.minimum(q_offset + start_m + 1, Tk) // BLOCK_N) * BLOCK_N
    end = tl.minimum(q_offset + tl.minimum(start_m + BLOCK_M, Tq), Tk)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, wk, wv, k_base, v_base, skt, svt,
                               0, full_end, q_pos, offs_n, offs_dk, offs_dv, Tk, qk_scale,
                               DK_IN, DV_IN, DK_IN == DK_P, DV_IN == DV_P,
                               BLOCK_N, False, EXPAND, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, wk, wv, k_base, v_base, skt, svt,
                               full_end, end, q_pos, offs_n, offs_dk, offs_dv, Tk, qk_scale,
                               DK_IN, DV_IN, DK_IN == DK_P, DV_IN == DV_P,
                               BLOCK_N, True, EXPAND, PREC)
    acc = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sot + offs_do[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_do[None, :] < DO))
    tl.store(LSE + bh * Tq + offs_m, (m_i + tl.math.log2(l_i)) * LN2_C, mask=offs_m < Tq)


@triton.jit
def _bwd_preprocess(O, DO_, DLSE, DELTA, sob, sot, soh, sdb, sdt, sdh, Tq, NH,
                    DV: tl.constexpr, DV_P: tl.constexpr, HAS_DLSE: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """delta = rowsum(o * do) - dlse, (B, NH, Tq) float32. Grid (cdiv(Tq, BLOCK_M), B * NH)."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_P)
    o = _load_tile(O + b * sob + h * soh, offs_m, offs_d, sot, Tq, DV, True, DV != DV_P)
    do = _load_tile(DO_ + b * sdb + h * sdh, offs_m, offs_d, sdt, Tq, DV, True, DV != DV_P)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:  # d lse / d s = p, so a logsumexp gradient shifts delta
        delta -= tl.load(DLSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    tl.store(DELTA + bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    lo, hi, cols, offs_m, offs_dq, offs_dv, Tq, q_offset, qk_scale,
                    DQ: tl.constexpr, DV: tl.constexpr, EVEN_DQ: tl.constexpr, EVEN_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one head."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m  # (BLOCK_M,)
        q = _load_tile(q_base, rows, offs_dq, stride_qt, Tq, DQ, MASKED, not EVEN_DQ)
        do = _load_tile(do_base, rows, offs_dv, stride_dot, Tq, DV, MASKED, not EVEN_DV)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < Tq, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < Tq, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASKED:
            keep = (cols[:, None] <= q_offset + rows[None, :]) & (rows[None, :] < Tq)
            s_t = tl.where(keep, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E_C)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.autotune(_configs("dkdv"), key=["TQ_BUCKET", "TK_BUCKET", "DQ_P", "DV_P", "REP"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO_, LSE, DELTA, DK, DV_,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                     sdks, sdkb, sdkt, sdkh, sdvs, sdvb, sdvt, sdvh,
                     Tq, Tk, NH, G, REP, SPLITS, q_offset, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
                     DQ: tl.constexpr, DV: tl.constexpr, DQ_P: tl.constexpr, DV_P: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, KV head), summed over REP / SPLITS of its query
    heads; split s writes its sums at DK + s * sdks (SPLITS > 1: float32 partials, summed after).

    Grid (B * G * SPLITS, cdiv(Tk, BLOCK_N)): the key block varies slowest, so the programs of the
    first key blocks, which see the most queries, start first and the short ones fill in after.
    """
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from Inductor
    start_n = tl.program_id(1) * BLOCK_N
    bgs = tl.program_id(0)
    split = bgs % SPLITS
    b = bgs // SPLITS // G
    kvh = bgs // SPLITS % G
    heads_per_split = REP // SPLITS
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, DQ_P)
    offs_dv = tl.arange(0, DV_P)
    k = _load_tile(K + b * skb + kvh * skh, cols, offs_dq, skt, Tk, DQ, True, DQ != DQ_P)
    v = _load_tile(V + b * svb + kvh * svh, cols, offs_dv, svt, Tk, DV, True, DV != DV_P)
    dk = tl.zeros([BLOCK_N, DQ_P], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_P], tl.float32)
    # queries that see key start_n start at row start_n - q_offset; rows from
    # start_n + BLOCK_N - 1 - q_offset on see the whole key block (no causal mask)
    lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
    diag_end = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M, lo)
    q_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    diag_end = tl.minimum(diag_end, q_end)
    full_end = tl.maximum((Tq // BLOCK_M) * BLOCK_M, diag_end)  # the last, partial query block is masked
    for hh in range(split * heads_per_split, (split + 1) * heads_per_split):
        h = kvh * REP + hh
        q_base = Q + b * sqb + h * sqh
        do_base = DO_ + b * sdb + h * sdh
        lse_base = LSE + (b * NH + h) * Tq
        delta_base = DELTA + (b * NH + h) * Tq
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt,
                                 lo, diag_end, cols, offs_m, offs_dq, offs_dv, Tq, q_offset, qk_scale,
                                 DQ, DV, DQ == DQ_P, DV == DV_P, BLOCK_M, True, PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt,
                                 diag_end, full_end, cols, offs_m, offs_dq, offs_dv, Tq, q_offset,
                                 qk_scale, DQ, DV, DQ == DQ_P, DV == DV_P, BLOCK_M, False, PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt,
                                 full_end, q_end, cols, offs_m, offs_dq, offs_dv, Tq, q_offset,
                                 qk_scale, DQ, DV, DQ == DQ_P, DV == DV_P, BLOCK_M, True, PREC)
    dk *= sm_scale
    row_ok = cols[:, None] < Tk
    tl.store(DK + split * sdks + b * sdkb + kvh * sdkh + cols[:, None] * sdkt + offs_dq[None, :],
             dk.to(DK.dtype.element_ty), mask=row_ok & (offs_dq[None, :] < DQ))
    tl.store(DV_ + split * sdvs + b * sdvb + kvh * sdvh + cols[:, None] * sdvt + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=row_ok & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                  lo, hi, q_pos, offs_n, offs_dq, offs_dv, Tk, qk_scale,
                  DQ: tl.constexpr, DV: tl.constexpr, EVEN_DQ: tl.constexpr, EVEN_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, offs_dq, stride_kt, Tk, DQ, MASKED, not EVEN_DQ)
        v = _load_tile(v_base, cols, offs_dv, stride_vt, Tk, DV, MASKED, not EVEN_DV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            keep = (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < Tk)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.autotune(_configs("dq"), key=["TQ_BUCKET", "TK_BUCKET", "DQ_P", "DV_P"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO_, LSE, DELTA, DQ_,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sdqb, sdqt, sdqh,
                   Tq, Tk, NH, REP, q_offset, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
                   DQ: tl.constexpr, DV: tl.constexpr, DQ_P: tl.constexpr, DV_P: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch, head). Grid (cdiv(Tq, BLOCK_M), B * NH)."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from Inductor
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    kvh = h // REP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, DQ_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_dq, sqt, Tq, DQ, True, DQ != DQ_P)
    do = _load_tile(DO_ + b * sdb + h * sdh, offs_m, offs_dv, sdt, Tq, DV, True, DV != DV_P)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    q_pos = q_offset + offs_m
    dq = tl.zeros([BLOCK_M, DQ_P], tl.float32)
    full_end = (tl.minimum(q_offset + start_m + 1, Tk) // BLOCK_N) * BLOCK_N
    end = tl.minimum(q_offset + tl.minimum(start_m + BLOCK_M, Tq), Tk)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, 0, full_end, q_pos,
                       offs_n, offs_dq, offs_dv, Tk, qk_scale, DQ, DV, DQ == DQ_P, DV == DV_P,
                       BLOCK_N, False, PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, full_end, end, q_pos,
                       offs_n, offs_dq, offs_dv, Tk, qk_scale, DQ, DV, DQ == DQ_P, DV == DV_P,
                       BLOCK_N, True, PREC)
    dq *= sm_scale
    tl.store(DQ_ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_dq[None, :],
             dq.to(DQ_.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_dq[None, :] < DQ))


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


# ----------------------------------------------------------------------------- launchers


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
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * nh)  # noqa: E731
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
    wrap_triton(_bwd_preprocess)[(triton.cdiv(Tq, pre_block), B * nh)](
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
    wrap_triton(_bwd_dq_kernel)[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * nh)](
        q, k, v, do, lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        Tq, Tk, nh, rep, q_offset, qk_scale, softmax_scale, *_length_buckets(Tq, Tk), **common,
    )
    if splits == 1:
        return dq, dk_sums, dv_sums
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # in k's and v's layouts, as the op's fake promises
    return dq, dk.copy_(dk_sums.sum(0)), dv.copy_(dv_sums.sum(0))


# ----------------------------------------------------------------------------- custom ops


# How the attention ops are registered on GPUs: 'triton_op' (Inductor traces into the launchers
# and launches the kernels itself) or 'custom_op' (opaque to Inductor, which calls the op). Under a
# CUDA graph both launch the same kernels; they differ in compile time (docs/decisions.md).
OP_KIND = os.environ.get("MLA_KERNELS_OP", "triton_op")
if OP_KIND not in ("triton_op", "custom_op"):
    raise ValueError(f"MLA_KERNELS_OP must be 'triton_op' or 'custom_op', got {OP_KIND!r}")


def _op(name, fake):
    """Register a launcher as the op `mla_kernels::<name>`.

    On GPUs with OP_KIND 'triton_op': Inductor traces into it and launches the kernels itself (its
    fake implementation is the launcher run on fake tensors), analysing every kernel at every call
    site while it compiles. Otherwise an opaque `custom_op` with `fake`, whose body launches the
    kernels directly: the interpreter's kernels cannot run on fake tensors, so under
    TRITON_INTERPRET=1 it is always this.
    """
    def register(fn):
        if OP_KIND == "triton_op" and not interpreting():
            return triton_op(f"mla_kernels::{name}", fn, mutates_args=())

        @functools.wraps(fn)
        def launch(*args):
            with set_wrap_triton_enabled(False):  # real tensors here: no tracing wrapper around launches
                return fn(*args)

        op = torch.library.custom_op(f"mla_kernels::{name}", launch, mutates_args=())
        op.register_fake(fake)
        return op
    return register


def _flash_fwd_fake(q, k, v, softmax_scale, q_offset):
    B, Tq, nh, _ = q.shape
    return q.new_empty(B, Tq, nh, v.shape[-1]), q.new_empty(B, nh, Tq, dtype=torch.float32)


@_op("flash_attention_fwd", _flash_fwd_fake)
def _flash_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                  q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, softmax_scale, q_offset)


def _flash_bwd_fake(do, dlse, q, k, v, out, lse, softmax_scale, q_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_op("flash_attention_bwd", _flash_bwd_fake)
def _flash_bwd_op(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
                  q_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, out, lse, softmax_scale, q_offset, dlse)


def _flash_setup_context(ctx, inputs, output, eager=False):
    q, k, v, softmax_scale, q_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.q_offset, ctx.eager = softmax_scale, q_offset, eager
    # an unused output's gradient arrives as None, not as a tensor of zeros to allocate and fill
    # (that fill was ~0.7 ms of host time per call on the H200, for the usually unused lse)
    ctx.set_materialize_grads(False)


def _core_backward(ctx, dout, dlse, q, k, v, out, lse):
    """dq, dk, dv: the launchers when called eagerly, the custom op when traced by torch.compile."""
    if dout is None:
        dout = torch.zeros_like(out)
    if ctx.eager:
        with set_wrap_triton_enabled(False):  # launch directly, not through the tracing wrapper
            return attention_backward(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.q_offset, dlse)
    return _flash_bwd_op(dout, dlse, q, k, v, out, lse, ctx.softmax_scale, ctx.q_offset)


def _flash_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _core_backward(ctx, dout, dlse, q, k, v, out, lse)
    return dq, dk, dv, None, None


_flash_fwd_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def _mla_expanded_fwd_fake(q, c_k, c_v, w_uk, w_uv, softmax_scale, q_offset):
    B, Tq, nh, _ = q.shape
    return q.new_empty(B, Tq, nh, w_uv.shape[-1]), q.new_empty(B, nh, Tq, dtype=torch.float32)


@_op("mla_attention_expanded_fwd", _mla_expanded_fwd_fake)
def _mla_expanded_fwd_op(q: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor, w_uk: torch.Tensor,
                         w_uv: torch.Tensor, softmax_scale: float,
                         q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, c_k, c_v, softmax_scale, q_offset, w_uk, w_uv)


def _mla_expanded_setup_context(ctx, inputs, output, eager=False):
    q, c_k, c_v, w_uk, w_uv, softmax_scale, q_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, c_k, c_v, w_uk, w_uv, out, lse)
    ctx.softmax_scale, ctx.q_offset, ctx.eager = softmax_scale, q_offset, eager
    ctx.set_materialize_grads(False)


def _mla_expanded_backward(ctx, dout, dlse):
    """First-version backward: expands K / V per head in device memory (B, Tk, nh, hs) with
    torch, runs the core backward kernels on them, then maps dK / dV back through the
    expansion (dc = dk W^T summed over the group's heads, dW = c^T dk). The forward never
    materializes K / V; this backward does, once, for the duration of the call."""
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


class _EagerFlashAttention(torch.autograd.Function):
    """The custom op's eager twin: the same launchers and backward, without the dispatcher's
    cost (~0.15 ms per op call, measured on the H200). torch.compile traces the custom op."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, q_offset):
        with set_wrap_triton_enabled(False):  # launch directly, not through the tracing wrapper
            out, lse = attention_forward(q, k, v, softmax_scale, q_offset)
        _flash_setup_context(ctx, (q, k, v, softmax_scale, q_offset), (out, lse), eager=True)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _flash_backward(ctx, dout, dlse)


class _EagerMLAExpanded(torch.autograd.Function):
    """Eager twin of the fused-expansion custom op (see _EagerFlashAttention)."""

    @staticmethod
    def forward(ctx, q, c_k, c_v, w_uk, w_uv, softmax_scale, q_offset):
        with set_wrap_triton_enabled(False):
            out, lse = attention_forward(q, c_k, c_v, softmax_scale, q_offset, w_uk, w_uv)
        inputs = (q, c_k, c_v, w_uk, w_uv, softmax_scale, q_offset)
        _mla_expanded_setup_context(ctx, inputs, (out, lse), eager=True)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _mla_expanded_backward(ctx, dout, dlse)


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
        out, lse = traced_or_eager(_flash_fwd_op, _EagerFlashAttention.apply)(q, k, v, float(softmax_scale), q_offset)
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
    all five tensors; the backward (first version) expands K / V in device memory. When W_uk and
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
        op = traced_or_eager(_mla_expanded_fwd_op, _EagerMLAExpanded.apply)
        out, lse = op(q, c_k, c_v, w_uk, w_uv, float(softmax_scale), q_offset)
    else:  # too wide to keep on chip: expand K / V in memory
        k, v = reference.expand_latent(c_k, w_uk), reference.expand_latent(c_v, w_uv)  # (B, Tk, nh, hs) each
        out, lse = flash_attention(q, k, v, softmax_scale, q_offset, return_lse=True)
    return (out, lse) if return_lse else out
