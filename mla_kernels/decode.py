"""Split-KV flash decoding over a latent KV cache (docs/design.md, sections 2 and 3).

The cache holds only latents: c^k (B, L, g, r) and c^v (B, L, g, rv), or one joint
latent whose first rv = r columns also serve as V. Each new token's absorbed query
q'_h (B, Tq, nh, r) attends over its row's cached latents directly, so a decode step
reads (2 or 1) g r elements per cached position instead of the 2 nh hs of an
expanded cache.

Work split: one program per (batch row, latent group, block of packed queries, KV
split). The nh / g query heads of a group and the Tq new queries are packed into
the M dimension of the dot (row m = head_in_group * Tq + query), so every latent
tile is read from memory once per group. When B x g programs cannot fill the GPU,
the cached length of each row is cut into `num_splits` chunks; each writes a partial
output normalized by its own softmax sum together with its base-2 logsumexp, and a
second kernel, one program per (batch row, head, query, block of value columns), merges
the chunks by their logsumexps.

When each group serves a single query row (g = nh and one new token, the default MLA's
decode), a dot would use 1 of its 16 rows: `_decode_row_kernel` computes the scores and the
weighted values as multiply-adds in registers instead, with the same outputs and merge.

Layouts follow flash-attention's `flash_attn_with_kvcache`: (batch, seqlen, heads, dim).
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from mla_kernels._dispatch import (
    check_dtypes,
    check_fp8_scales,
    check_ndim,
    check_tensors,
    interpreting,
    on_kernel_device,
    replayed_timing,
    traced_or_eager,
    tuned_candidates,
)
from mla_kernels._register import register_op
from mla_kernels._tiles import LOG2E, num_sms, tile_dim
from mla_kernels.reference import FP8_DTYPE, latent_decode_ref

_LN2 = tl.constexpr(0.6931471805599453)  # back to natural log for the returned logsumexp
MAX_BLOCK_M = 64  # packed (head, query) rows per program; more rows go to more programs
MIN_BLOCK_M = 16  # tl.dot needs at least 16 rows
MAX_LATENT_DIM = 576  # DeepSeek-V2's joint latent (512 + 64 rope dims), the widest supported
MIN_LATENT_DIM = 1
# A program's fixed cost (start, partial store, its share of the merge), counted as this many
# more cached positions to stream; also the shortest split worth making
SPLIT_OVERHEAD_TOKENS = 256
MAX_SPLITS = 256  # two programs per multiprocessor from splits alone (132 SMs); bounds the merge's work
MERGE_CHUNK = 16  # splits the merge kernel reads per step (a MERGE_CHUNK x MERGE_BLOCK_DV float32 tile)
MERGE_BLOCK_DV = 64  # value columns per merge program: 4 per output at rv 256, each loading whole 16 x 64 fp32 tiles
# A multiprocessor running a single program streams this much slower than with two sharing it
# (H200 split sweep, joint latent B 64 L 4k: S 2, one program per SM, 46.8 us; S 4, two, 41.8 us)
LONE_PROGRAM_SLOWDOWN = 1.15
PARTIAL_BYTES = 4  # the splits' partial outputs are float32


@triton.jit
def _split_bounds(SEQLENS, b, split, NUM_SPLITS, BLOCK_N: tl.constexpr):
    """(seqlen, lo, hi): row b's cached length and the positions [lo, hi) its split reads, whole
    KV tiles per split."""
    seqlen = tl.load(SEQLENS + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(seqlen, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    return seqlen, lo, tl.minimum(lo + chunk, seqlen)


@triton.jit
def _group_bases(K, V, KS, VS, b, grp, stride_kb, stride_kg, stride_vb, stride_vg,
                 stride_ksb, stride_ksg, stride_vsb, stride_vsg):
    """Where latent group grp of row b starts in K, V and their scales KS, VS."""
    return (K + b * stride_kb + grp * stride_kg, V + b * stride_vb + grp * stride_vg,
            KS + b * stride_ksb + grp * stride_ksg, VS + b * stride_vsb + grp * stride_vsg)


@triton.jit
def _decode_partial_kernel(
    Q, K, V, KS, VS, SEQLENS, O, LSE,
    sm_scale_log2,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kl, stride_kg,
    stride_vb, stride_vl, stride_vg,
    stride_ksb, stride_ksl, stride_ksg,
    stride_vsb, stride_vsl, stride_vsg,
    stride_ob, stride_ot, stride_oh, stride_os,
    stride_lb, stride_lh, stride_lt, stride_ls,
    NH, G, TQ, D_K, D_V, NUM_SPLITS, NUM_M_BLOCKS, LEN_BUCKET,
    HPG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    JOINT: tl.constexpr, SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr, SCALED: tl.constexpr,
):
    """One (row, group, query block, split): online softmax over its KV chunk.

    SCALED: K and V hold float8 latents with one float32 scale per (row, position, group) in
    KS / VS; each tile is widened to q's dtype in registers and the scales applied to the
    scores (K) and the probabilities (V), so the cache is read once, in fp8, and never
    dequantized in memory. A bfloat16 q: widen to float16 instead and run the
    dots in float16, q converted once. e4m3 -> f16 is one instruction per two values on sm_89+,
    e4m3 -> bf16 several, and the widening is most of this kernel's instructions per byte.
    float16 holds every e4m3 value exactly, and the probabilities times each position's scale
    over the tile's largest (at most 1); the query must stay under float16's 65504, as the
    absorbed query of a trained layer does by orders of magnitude.

    SPLIT false: O is the final output (B, Tq, nh, rv) in q's dtype, LSE (B, nh, Tq)
    natural log. SPLIT true: O is float32 (B, Tq, nh, S, rv) holding this split's
    output normalized by its own sum, LSE (B, nh, Tq, S) its base-2 logsumexp
    (-inf for a split that sees no key). LEN_BUCKET (the cache's capacity rounded up to a power
    of two) is not read: with NUM_SPLITS it keys the autotuner, a tile per length class.
    """
    pid = tl.program_id(0)  # the larger count on the first axis: the others hold at most 65535
    split = tl.program_id(1)
    m_block = pid % NUM_M_BLOCKS
    bg = pid // NUM_M_BLOCKS
    grp = bg % G
    b = (bg // G).to(tl.int64)  # a cache's batch offsets pass 2^31 elements at long lengths

    seqlen, lo, hi = _split_bounds(SEQLENS, b, split, NUM_SPLITS, BLOCK_N)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row = head_in_group * Tq + query
    head_local = offs_m // TQ
    qi = offs_m % TQ
    row_ok = head_local < HPG
    head = grp * HPG + head_local
    q_pos = seqlen - TQ + qi  # absolute position of each query; it sees keys <= q_pos

    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V
    q_ptrs = Q + b * stride_qb + qi[:, None] * stride_qt + head[:, None] * stride_qh + offs_dk[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dk_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_DK)
    if SCALED and q.dtype == tl.bfloat16:
        q = q.to(tl.float16)

    k_base, v_base, ks_base, vs_base = _group_bases(K, V, KS, VS, b, grp, stride_kb, stride_kg, stride_vb,
                                                    stride_vg, stride_ksb, stride_ksg, stride_vsb, stride_vsg)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_dk[None, :],
                    mask=n_ok[:, None] & dk_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DK)
        if SCALED:
            k = k.to(q.dtype)  # fp8 values are exact in 16- and 32-bit floats
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        else:
            s = tl.dot(q, tl.trans(k))
        if SCALED:
            k_scale = tl.load(ks_base + offs_n * stride_ksl, mask=n_ok, other=0.0)  # (BLOCK_N,)
            s = s * k_scale[None, :]
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if JOINT:
            v = k  # V is the first rv = r columns of the same latent tile: one read serves both
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_dv[None, :],
                        mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
        pv = p
        tile_scale = 1.0
        if SCALED:
            if JOINT:
                v_scale = k_scale
            else:
                v = v.to(q.dtype)
                v_scale = tl.load(vs_base + offs_n * stride_vsl, mask=n_ok, other=0.0)  # (BLOCK_N,)
            # the probabilities carry the scales relative to the tile's largest, so that small
            # latents do not turn p x scale subnormal in float16; the largest multiplies the dot
            tile_scale = tl.max(v_scale, axis=0)
            tile_scale = tl.where(tile_scale > 0.0, tile_scale, 1.0)
            pv = p * (v_scale / tile_scale)[None, :]
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v, input_precision="ieee") * tile_scale
        else:
            acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v) * tile_scale
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # base 2
    o_ptrs = O + b * stride_ob + qi[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :]
    l_ptrs = LSE + b * stride_lb + head * stride_lh + qi * stride_lt
    if SPLIT:
        tl.store(o_ptrs + split * stride_os, out, mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(l_ptrs + split * stride_ls, lse2, mask=row_ok)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(l_ptrs, lse2 * _LN2, mask=row_ok)  # ln(2): base 2 -> natural


@triton.jit
def _decode_row_kernel(
    Q, K, V, KS, VS, SEQLENS, O, LSE,
    sm_scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kl, stride_kg,
    stride_vb, stride_vl, stride_vg,
    stride_ksb, stride_ksl, stride_ksg,
    stride_vsb, stride_vsl, stride_vsg,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    NH, D_K, D_V, NUM_SPLITS, LEN_BUCKET,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    JOINT: tl.constexpr, SPLIT: tl.constexpr, SCALED: tl.constexpr,
):
    """One (row, head, split) when each latent group serves a single query row (g = nh, Tq 1).

    With one row a dot would fill 1 of its 16 rows, and widening an fp8 tile for it goes through
    shared memory; here the scores and the weighted values are multiply-adds in registers on the
    tile as loaded. Each of the BLOCK_N position slots runs its own online softmax over the
    positions start + slot of every tile, so the softmax needs no reduction across positions in
    the loop (only the score's sum over the latent dim); the slots merge by their maxima once at
    the end. SCALED, outputs, LSE and LEN_BUCKET as `_decode_partial_kernel`
    with Tq 1.
    """
    pid = tl.program_id(0)  # the larger count on the first axis: the others hold at most 65535
    split = tl.program_id(1)
    head = pid % NH  # = the latent group
    b = (pid // NH).to(tl.int64)  # a cache's batch offsets pass 2^31 elements at long lengths

    _, lo, hi = _split_bounds(SEQLENS, b, split, NUM_SPLITS, BLOCK_N)  # the one query sees all of [lo, hi)

    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < D_K
    dv_ok = offs_dv < D_V
    q = tl.load(Q + b * stride_qb + head * stride_qh + offs_dk, mask=dk_ok, other=0.0).to(tl.float32)  # (BLOCK_DK,)
    q = q * sm_scale_log2
    k_base, v_base, ks_base, vs_base = _group_bases(K, V, KS, VS, b, head, stride_kb, stride_kg, stride_vb,
                                                    stride_vg, stride_ksb, stride_ksg, stride_vsb, stride_vsg)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # per slot
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_dk[None, :],
                    mask=n_ok[:, None] & dk_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_DK)
        s = tl.sum(k * q[None, :], axis=1)  # (BLOCK_N,) base-2 scores
        if SCALED:
            k_scale = tl.load(ks_base + offs_n * stride_ksl, mask=n_ok, other=0.0)  # (BLOCK_N,)
            s = s * k_scale
        s = tl.where(n_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # slots that saw no position yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)  # (BLOCK_N,)
        l_i = l_i * alpha + p
        if JOINT:
            v = k  # V is the first rv = r columns of the same latent tile
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_dv[None, :],
                        mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_DV)
        if SCALED:
            if JOINT:
                p = p * k_scale
            else:
                p = p * tl.load(vs_base + offs_n * stride_vsl, mask=n_ok, other=0.0)
        acc = acc * alpha[:, None] + p[:, None] * v
        m_i = m_new

    m_all = tl.max(m_i, axis=0)
    m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    weight = tl.exp2(m_i - m_all_safe)  # (BLOCK_N,) each slot's share at the common maximum
    l_sum = tl.sum(l_i * weight, axis=0)
    l_safe = tl.where(l_sum == 0.0, 1.0, l_sum)
    out = tl.sum(acc * weight[:, None], axis=0) / l_safe  # (BLOCK_DV,)
    lse2 = tl.where(l_sum == 0.0, float("-inf"), m_all_safe + tl.log2(l_safe))  # base 2
    o_ptrs = O + b * stride_ob + head * stride_oh + offs_dv
    l_ptrs = LSE + b * stride_lb + head * stride_lh
    if SPLIT:
        tl.store(o_ptrs + split * stride_os, out, mask=dv_ok)
        tl.store(l_ptrs + split * stride_ls, lse2)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=dv_ok)
        tl.store(l_ptrs, lse2 * _LN2)  # ln(2): base 2 -> natural


@triton.jit
def _decode_merge_kernel(
    OP, LSEP, O, LSE,
    stride_pb, stride_pt, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_st, stride_ss,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_lt,
    NH, TQ, D_V, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):
    """Merge the splits of one (row, head, query) over one block of BLOCK_DV value columns:
    weights exp2(lse_s - max) / sum.

    Grid (B x nh x Tq, cdiv(rv, BLOCK_DV)). Every column block of an output computes the same
    weights from its S logsumexps (S floats, cheap beside the S x BLOCK_DV partials); only the
    first stores the merged logsumexp, so each LSE element has one writer.
    OP: float32 (B, Tq, nh, S, rv) (strides stride_p*); LSEP: float32 (B, nh, Tq, S)
    base 2 (strides stride_s*).
    O: (B, Tq, nh, rv) in q's dtype; LSE: float32 (B, nh, Tq) natural log.
    """
    pid = tl.program_id(0)
    col_block = tl.program_id(1)
    qi = pid % TQ
    head = (pid // TQ) % NH
    b = (pid // (TQ * NH)).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, MERGE_CHUNK)
    offs_d = col_block * BLOCK_DV + tl.arange(0, BLOCK_DV)  # value columns of this program
    d_ok = offs_d < D_V
    lse_base = LSEP + b * stride_sb + head * stride_sh + qi * stride_st
    lse_all = tl.load(lse_base + offs_s * stride_ss, mask=offs_s < NUM_SPLITS, other=float("-inf"))  # (BLOCK_S,)
    lse_max = tl.max(lse_all, axis=0)
    w_sum = tl.sum(tl.exp2(lse_all - lse_max), axis=0)  # empty splits (-inf) weigh 0
    p_base = OP + b * stride_pb + qi * stride_pt + head * stride_ph
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, MERGE_CHUNK):  # a chunk of splits at a time keeps the tile in registers
        s_idx = s0 + offs_c
        s_ok = s_idx < NUM_SPLITS
        w = tl.exp2(tl.load(lse_base + s_idx * stride_ss, mask=s_ok, other=float("-inf")) - lse_max)
        o_s = tl.load(p_base + s_idx[:, None] * stride_ps + offs_d[None, :],
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (MERGE_CHUNK, BLOCK_DV)
        acc += tl.sum(o_s * w[:, None], axis=0)
    out = acc / w_sum
    tl.store(O + b * stride_ob + qi * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    if col_block == 0:
        tl.store(LSE + b * stride_lb + head * stride_lh + qi * stride_lt, (lse_max + tl.log2(w_sum)) * _LN2)


SMEM_BUDGET = 160 * 1024  # bytes of pipelined K / V tiles per program, under Hopper's 227 KB with room for the rest
MAX_ACC_REGS = 128  # fp32 accumulator registers per thread before spills become likely
# Tiles for the GPU, chosen by timing once per key (latent dims, packed rows, split or not).
_PARTIAL_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (64, 8, 3), (128, 8, 3), (32, 2, 4),
                     (32, 8, 2), (16, 8, 2), (32, 4, 5), (32, 8, 4), (64, 8, 4)]
]
_FALLBACK_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=1)
MAX_WARPS = max(c.num_warps for c in [*_PARTIAL_CONFIGS, _FALLBACK_CONFIG])


def _fitting_configs(configs, meta, tile_elt, register_elements):
    """The configs whose pipelined K / V tiles (tile_elt bytes a value) fit SMEM_BUDGET and whose
    float32 register tiles, register_elements(BLOCK_N) values, fit MAX_ACC_REGS per thread (only
    the first of them without a search, see `tuned_candidates`)."""
    row_bytes = (meta["BLOCK_DK"] + (0 if meta["JOINT"] else meta["BLOCK_DV"])) * tile_elt
    kept = [c for c in configs
            if c.num_stages * c.kwargs["BLOCK_N"] * row_bytes <= SMEM_BUDGET
            and register_elements(c.kwargs["BLOCK_N"]) <= MAX_ACC_REGS * 32 * c.num_warps]
    return tuned_candidates(kept or [_FALLBACK_CONFIG])


def _prune_configs(configs, named_args, **meta):
    """The dot kernel's configs: its (BLOCK_M, BLOCK_DV) accumulator in registers, tiles at q's size."""
    return _fitting_configs(configs, meta, named_args["Q"].element_size(),
                            lambda block_n: meta["BLOCK_M"] * meta["BLOCK_DV"])


_decode_partial_tuned = triton.autotune(
    configs=_PARTIAL_CONFIGS,
    key=["D_K", "D_V", "HPG", "BLOCK_M", "JOINT", "SPLIT", "SCALED", "LEN_BUCKET", "NUM_SPLITS"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=replayed_timing,
    cache_results=True,  # on disk: a later process on this GPU skips the search
)(_decode_partial_kernel)
# The single-row kernel: (BLOCK_N, warps, stages); its fp32 key tile and accumulator live in registers
_ROW_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(128, 4, 3), (64, 4, 3), (128, 4, 4), (256, 8, 3), (128, 8, 3), (64, 2, 4), (256, 4, 3),
                     (32, 4, 3), (16, 4, 2)]
]


def _prune_row_configs(configs, named_args, **meta):
    """The single-row kernel's configs: its fp32 key tile and accumulator, (BLOCK_N, BLOCK_DK +
    BLOCK_DV), in registers, tiles at the cache's size."""
    return _fitting_configs(configs, meta, named_args["K"].element_size(),
                            lambda block_n: block_n * (meta["BLOCK_DK"] + meta["BLOCK_DV"]))


_decode_row_tuned = triton.autotune(
    configs=_ROW_CONFIGS,
    key=["D_K", "D_V", "JOINT", "SPLIT", "SCALED", "LEN_BUCKET", "NUM_SPLITS"],
    prune_configs_by={"early_config_prune": _prune_row_configs},
    do_bench=replayed_timing,
    cache_results=True,
)(_decode_row_kernel)
INTERPRETER_BLOCK_N = 16  # the CPU interpreter is timed in whole tiles: keep them small


def uses_row_kernel(heads_per_group, new_tokens):
    """Whether a decode runs `_decode_row_kernel`: one query row per latent group (g = nh, Tq 1)."""
    return heads_per_group * new_tokens == 1


def packed_block_m(heads_per_group, new_tokens, widest_tile):
    """BLOCK_M of a decode program: its group's (head, query) rows, padded to a power of two in
    [MIN_BLOCK_M, MAX_BLOCK_M], and few enough that a (BLOCK_M, widest_tile) float32 accumulator
    fits MAX_ACC_REGS per thread at the widest candidate (MAX_WARPS). widest_tile is the wider of
    the key and value tiles: the value tile sizes the accumulator, the key tile the query tile
    held in shared memory. At r 576 (tiled as 1024) that is 32 rows, where 64 rows needed more
    shared memory than an H200 SM holds (256 KB for the accumulator's layout changes alone)."""
    rows_that_fit = MAX_ACC_REGS * 32 * MAX_WARPS // widest_tile
    wanted = triton.next_power_of_2(heads_per_group * new_tokens)
    return max(min(wanted, MAX_BLOCK_M, rows_that_fit), MIN_BLOCK_M)


@functools.lru_cache(maxsize=None)
def num_splits_heuristic(programs, max_len, row_bytes, merge_rows, value_dim, num_sms):
    """KV splits per row that finish soonest on the busiest multiprocessor.

    programs: (row, group, query block) programs before splitting; max_len: cached positions
    per row; row_bytes: latent bytes one program reads per position; merge_rows: outputs
    (B x nh x Tq) the merge kernel combines; value_dim: their width.
    With S splits, programs x S of them, each streaming max_len / S positions plus a fixed
    cost of SPLIT_OVERHEAD_TOKENS, are dealt round-robin to num_sms multiprocessors; the
    busiest holds c = ceil(programs S / num_sms) and reads c (max_len / S +
    SPLIT_OVERHEAD_TOKENS) row_bytes, LONE_PROGRAM_SLOWDOWN slower when c = 1. The merge
    then runs one program per output and block of MERGE_BLOCK_DV value columns, each reading
    S float32 partial rows of min(MERGE_BLOCK_DV, value_dim) columns and the S logsumexps;
    its busiest multiprocessor holds ceil(merge_rows cdiv(value_dim, MERGE_BLOCK_DV) / num_sms)
    of them. Ties go to fewer splits. Only powers of two are considered (each split is rounded
    up to whole KV tiles, and on the H200 sweeps every other count, 3, 5, 17, 22, 132, ran
    slower than a power-of-two neighbour), none shorter than SPLIT_OVERHEAD_TOKENS and none
    above MAX_SPLITS.
    Uses the cache capacity (no device sync), so the choice is the same at every step of
    a generation (static shapes, CUDA graphs).
    """
    most = max(1, min(max_len // SPLIT_OVERHEAD_TOKENS, MAX_SPLITS))
    merge_per_sm = triton.cdiv(merge_rows * triton.cdiv(value_dim, MERGE_BLOCK_DV), num_sms)
    merge_floats_per_split = min(MERGE_BLOCK_DV, value_dim) + 1  # a partial row's columns and its logsumexp

    def busiest_bytes(splits):
        per_sm = triton.cdiv(programs * splits, num_sms)
        partial = per_sm * (max_len / splits + SPLIT_OVERHEAD_TOKENS) * row_bytes
        if per_sm == 1:
            partial *= LONE_PROGRAM_SLOWDOWN
        merge = 0 if splits == 1 else merge_per_sm * splits * merge_floats_per_split * PARTIAL_BYTES
        return partial + merge

    candidates = [1 << i for i in range(most.bit_length())]  # 1, 2, 4, ... <= most
    return min(candidates, key=lambda splits: (busiest_bytes(splits), splits))


def default_num_splits(q_lat, cache_k, cache_v, scaled):
    """The split count `latent_decode` takes when num_splits is None: `num_splits_heuristic` for
    q_lat (B, Tq, nh, r) over caches (B, L, g, r) and (B, L, g, rv) (None when joint), stored in
    fp8 with float32 scales when scaled."""
    B, Tq, nh, r = q_lat.shape
    L, g = cache_k.shape[1], cache_k.shape[2]
    joint = cache_v is None
    rv = r if joint else cache_v.shape[3]
    block_dk = tile_dim(r)
    block_dv = block_dk if joint else tile_dim(rv)
    m_blocks = triton.cdiv(nh // g * Tq, packed_block_m(nh // g, Tq, max(block_dk, block_dv)))
    scale_bytes = 0 if not scaled else (4 if joint else 8)  # float32 scale(s) per position and group
    row_bytes = (r if joint else r + rv) * cache_k.element_size() + scale_bytes
    return num_splits_heuristic(B * g * m_blocks, L, row_bytes, B * nh * Tq, rv, num_sms(q_lat.device))


def _check_inputs(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits, check_seqlens, k_scale,
                  v_scale):
    latents = {"q_lat": q_lat, "cache_k": cache_k} | ({} if cache_v is None else {"cache_v": cache_v})
    check_tensors(**latents, cache_seqlens=cache_seqlens)
    check_ndim("q_lat", q_lat, "(B, Tq, nh, r)")
    check_ndim("cache_k", cache_k, "(B, L, g, r)")
    B, Tq, nh, r = q_lat.shape
    Bk, L, g, rk = cache_k.shape
    if Bk != B or rk != r:
        raise ValueError(f"cache_k shape {tuple(cache_k.shape)} does not match q_lat {tuple(q_lat.shape)}: "
                         "need the same batch and latent dim")
    if g < 1 or nh % g != 0:
        raise ValueError(f"cache_k has g={g} groups; nh={nh} query heads must be a multiple of it")
    if cache_v is not None:
        if cache_v.dim() != 4 or tuple(cache_v.shape[:3]) != (B, L, g):
            raise ValueError(f"cache_v must be (B, L, g, rv) = ({B}, {L}, {g}, rv), got {tuple(cache_v.shape)}")
    rv = r if cache_v is None else cache_v.shape[3]
    for name, d in (("latent dim r of q_lat / cache_k", r), ("latent dim rv of cache_v", rv)):
        if not MIN_LATENT_DIM <= d <= MAX_LATENT_DIM:
            raise ValueError(f"{name} is {d}; allowed {MIN_LATENT_DIM}..{MAX_LATENT_DIM}")
    if Tq < 1:
        raise ValueError(f"q_lat needs at least one query (Tq >= 1), got Tq={Tq}")
    check_fp8_scales(cache_k, cache_v, k_scale, v_scale)
    if cache_k.dtype == FP8_DTYPE:
        check_dtypes(q_lat=q_lat)
    else:
        check_dtypes(**latents)
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must be ({B},), got shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens dtype must be int32 or int64, got {cache_seqlens.dtype}")
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None (heuristic) or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    capturing = q_lat.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_seqlens and not capturing:  # reading lengths syncs the device: impossible while capturing
        lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()  # one device sync
        if lo < Tq or hi > L:
            raise ValueError(f"cache_seqlens must lie in [Tq, L] = [{Tq}, {L}] (the {Tq} new tokens included), "
                             f"got min {lo}, max {hi}")


def _latent_decode_triton(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits, k_scale, v_scale):
    """Launch the partial kernel (the dot or the single-row one) and, with splits, the merge.
    Shapes as in `latent_decode`."""
    B, Tq, nh, r = q_lat.shape
    L, g = cache_k.shape[1], cache_k.shape[2]
    q_lat, cache_k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_lat, cache_k))
    joint = cache_v is None
    v = cache_k if joint else (cache_v if cache_v.stride(-1) == 1 else cache_v.contiguous())
    rv = v.shape[3]
    seqlens = cache_seqlens.to(torch.int32)
    hpg = nh // g
    block_dk = tile_dim(r)
    block_dv = block_dk if joint else tile_dim(rv)
    block_m = packed_block_m(hpg, Tq, max(block_dk, block_dv))
    m_blocks = triton.cdiv(hpg * Tq, block_m)
    scaled = k_scale is not None
    if num_splits is None:
        num_splits = default_num_splits(q_lat, cache_k, cache_v, scaled)
    num_splits = max(1, min(num_splits, L))
    split = num_splits > 1

    out = torch.empty(B, Tq, nh, rv, device=q_lat.device, dtype=q_lat.dtype)  # (B, Tq, nh, rv)
    lse = torch.empty(B, nh, Tq, device=q_lat.device, dtype=torch.float32)  # (B, nh, Tq)
    if split:
        o_dst = torch.empty(B, Tq, nh, num_splits, rv, device=q_lat.device, dtype=torch.float32)  # (B, Tq, nh, S, rv)
        l_dst = torch.empty(B, nh, Tq, num_splits, device=q_lat.device, dtype=torch.float32)  # (B, nh, Tq, S)
        o_strides = o_dst.stride()[:4]
        l_strides = l_dst.stride()
    else:
        o_dst, l_dst = out, lse
        o_strides = (*out.stride()[:3], 0)
        l_strides = (*lse.stride(), 0)

    grid = (B * g * m_blocks, num_splits)
    len_bucket = triton.next_power_of_2(L)  # keys the autotuner only: a tile per length class and split count
    ks = k_scale if scaled else seqlens  # an unread placeholder without scales
    vs = (k_scale if joint else v_scale) if scaled else seqlens
    scale_strides = (*ks.stride(), *vs.stride()) if scaled else (0,) * 6
    inputs = (q_lat, cache_k, v, ks, vs, seqlens, o_dst, l_dst, softmax_scale * LOG2E)
    cache_strides = (*cache_k.stride()[:3], *v.stride()[:3], *scale_strides)
    if uses_row_kernel(hpg, Tq):  # no query axis: strides of batch and head (and split)
        kernel, tuned = _decode_row_kernel, _decode_row_tuned
        args = (*inputs, q_lat.stride(0), q_lat.stride(2), *cache_strides,
                o_strides[0], o_strides[2], o_strides[3], l_strides[0], l_strides[1], l_strides[3],
                nh, r, rv, num_splits, len_bucket)
        meta = dict(BLOCK_DK=block_dk, BLOCK_DV=block_dv, JOINT=joint, SPLIT=split, SCALED=scaled)
    else:
        kernel, tuned = _decode_partial_kernel, _decode_partial_tuned
        args = (*inputs, *q_lat.stride()[:3], *cache_strides, *o_strides, *l_strides,
                nh, g, Tq, r, rv, num_splits, m_blocks, len_bucket)
        meta = dict(HPG=hpg, BLOCK_M=block_m, BLOCK_DK=block_dk, BLOCK_DV=block_dv, JOINT=joint, SPLIT=split,
                    IEEE_DOT=q_lat.dtype == torch.float32, SCALED=scaled)
    if interpreting():
        kernel[grid](*args, **meta, BLOCK_N=INTERPRETER_BLOCK_N)
    else:
        tuned[grid](*args, **meta)

    if split:
        merge_block_dv = min(MERGE_BLOCK_DV, block_dv)
        _decode_merge_kernel[(B * nh * Tq, triton.cdiv(rv, merge_block_dv))](
            o_dst, l_dst, out, lse,
            *o_strides, *l_strides,
            out.stride(0), out.stride(1), out.stride(2),
            *lse.stride(),
            nh, Tq, rv, num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_DV=merge_block_dv, MERGE_CHUNK=MERGE_CHUNK,
        )
    return out, lse


def _latent_decode_impl(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits, k_scale=None,
                        v_scale=None):
    if not on_kernel_device(q_lat):
        out, lse = latent_decode_ref(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, k_scale, v_scale)
        return out, lse.to(torch.float32)
    return _latent_decode_triton(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits, k_scale,
                                 v_scale)


def _latent_decode_launch(
    q_lat: torch.Tensor, cache_k: torch.Tensor, cache_v: Optional[torch.Tensor], cache_seqlens: torch.Tensor,
    softmax_scale: float, num_splits: Optional[int], k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _latent_decode_impl(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits, k_scale, v_scale)


def _latent_decode_fake(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits, k_scale=None, v_scale=None):
    B, Tq, nh, r = q_lat.shape
    rv = r if cache_v is None else cache_v.shape[3]
    out = q_lat.new_empty(B, Tq, nh, rv)  # (B, Tq, nh, rv)
    lse = q_lat.new_empty(B, nh, Tq, dtype=torch.float32)  # (B, nh, Tq)
    return out, lse


# opaque to Inductor (a decode step is replayed from a CUDA graph, not compiled)
_latent_decode_op = register_op("latent_decode", _latent_decode_launch, _latent_decode_fake, traceable=False)


def latent_decode(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits=None, check_seqlens=True,
                  k_scale=None, v_scale=None):
    """Attention of the Tq newest absorbed queries of each row over its latent KV cache.

    q_lat: (B, Tq, nh, r) absorbed queries q'_h = q_h W_uk^h^T, float16 / bfloat16 / float32;
      Tq is small (1 for plain decode, a few for speculative or chunked steps).
    cache_k: (B, L, g, r) K latents, nh % g == 0, head h reads group h // (nh // g).
    cache_v: (B, L, g, rv) V latents, or None for a joint latent (V = cache_k, rv = r).
      In q_lat's dtype, or float8_e4m3fn with their scales:
    k_scale, v_scale: (B, L, g) float32, one scale per cached position and group, so that
      latent = fp8 value * scale (`mla_kernels.reference.quantize_fp8`); a joint latent passes
      k_scale only. The kernel reads the fp8 bytes and applies the scales in registers (to the
      scores and the probabilities): no dequantized copy is ever written.
    cache_seqlens: (B,) int32 / int64, valid cached length of each row with the new
      tokens included, in [Tq, L]: query i of row b sits at position
      cache_seqlens[b] - Tq + i and sees positions <= that one (causal among the new
      tokens). Slots at or beyond cache_seqlens[b] are never read.
    softmax_scale: multiplies q'.c^k; for MLA this is 1 / sqrt(hs), not 1 / sqrt(r).
    num_splits: KV splits per row; None lets `num_splits_heuristic` choose.
    Latent dims 1..576, any value (padded to a power of two and masked); last dims
    must be contiguous (others are copied first).
    Returns o_lat (B, Tq, nh, rv) in q_lat's dtype and logsumexp (B, nh, Tq) float32,
    natural log, as `mla_kernels.reference.latent_decode_ref`.
    On CPU tensors without TRITON_INTERPRET=1 it runs that reference instead.
    Lengths are checked on the host (one device sync) except during CUDA graph capture or
    with check_seqlens=False, for callers that built cache_seqlens themselves (the model's
    decode step), where a sync per layer and token would stall the launch queue.
    """
    _check_inputs(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, num_splits, check_seqlens, k_scale,
                  v_scale)
    op = traced_or_eager(_latent_decode_op, _latent_decode_impl)
    return op(q_lat, cache_k, cache_v, cache_seqlens, float(softmax_scale), num_splits, k_scale, v_scale)
