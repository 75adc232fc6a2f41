"""Causal flash attention's Triton kernels and their tile candidates (launched by `launch.py`).

Flash attention v2: softmax in base 2 (scale folded with log2 e into the exp2's argument), causal
work split into key blocks below the diagonal (no mask) and blocks on it (masked), logsumexp stored
for the backward. The backward runs in three kernels: delta = rowsum(o * do), dK/dV over query
blocks (GQA: summed over the heads of a group inside the program, no atomics; with few KV heads, as
MLA's one latent group, the heads are split over several programs whose float32 partials are added
after), and dQ over key blocks. The forward can build each K/V tile on chip from latent tiles
(EXPAND: k = c^k W_uk^h, v = c^v W_uv^h). Head dims that are not powers of two are padded to the
next one inside the kernels and masked.
"""
import triton
import triton.language as tl

from mla_kernels._dispatch import interpreting, tuned_candidates
from mla_kernels._tiles import LOG2E

LN2 = 0.6931471805599453  # ln(2): converts the base-2 logsumexp back to natural log
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
    if "q_ptr" in args:  # tiles are sized for 16-bit inputs: a float32 dim d takes the bytes of a 16-bit 2d
        widest *= max(1, args["q_ptr"].element_size() // 2)
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
def _query_program(Tq, NH, REP, BLOCK_M: tl.constexpr):
    """What a program of the 1-D grid (cdiv(Tq, BLOCK_M) * B * NH,) owns: (bh, b, h, kvh, start_m,
    offs_m), its (batch, head) index, batch b in int64 (batch offsets pass 2^31 elements on long
    batched prefills), head h, its KV head, and its BLOCK_M query rows from start_m. One axis, as
    CUDA's second and third hold at most 65535 programs (B * NH passes that at B 5462, 12 heads);
    the query blocks of one (batch, head) stay consecutive."""
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(Tq, BLOCK_M)
    bh = pid // m_blocks
    h = bh % NH
    start_m = (pid % m_blocks) * BLOCK_M
    return bh, (bh // NH).to(tl.int64), h, h // REP, start_m, start_m + tl.arange(0, BLOCK_M)


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
def _fwd_kernel(q_ptr, k_ptr, v_ptr, wk_ptr, wv_ptr, o_ptr, lse_ptr,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                swkh, swkr, swvh, swvr, sob, sot, soh,
                Tq, Tk, NH, REP, q_offset, qk_scale, TQ_BUCKET, TK_BUCKET,
                DQ: tl.constexpr, DO: tl.constexpr, DK_IN: tl.constexpr, DV_IN: tl.constexpr,
                DQ_P: tl.constexpr, DO_P: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr,
                EXPAND: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). Grid (cdiv(Tq, BLOCK_M) * B * NH,)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    bh, b, h, kvh, start_m, offs_m = _query_program(Tq, NH, REP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, DQ_P)
    offs_do = tl.arange(0, DO_P)
    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, offs_dq, sqt, Tq, DQ, True, DQ != DQ_P)
    if EXPAND:
        wk = _load_tile(wk_ptr + h * swkh, offs_dk, offs_dq, swkr, DK_IN, DQ, DK_IN != DK_P, DQ != DQ_P)
        wv = _load_tile(wv_ptr + h * swvh, offs_dv, offs_do, swvr, DV_IN, DO, DV_IN != DV_P, DO != DO_P)
    else:
        wk = q
        wv = q
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
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
    o_ptrs = o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_do[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_do[None, :] < DO))
    tl.store(lse_ptr + bh * Tq + offs_m, (m_i + tl.math.log2(l_i)) * LN2_C, mask=offs_m < Tq)


@triton.jit
def _bwd_preprocess(o_ptr, do_ptr, dlse_ptr, delta_ptr, sob, sot, soh, sdb, sdt, sdh, Tq, NH,
                    DV: tl.constexpr, DV_P: tl.constexpr, HAS_DLSE: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """delta = rowsum(o * do) - dlse, (B, NH, Tq) float32. Grid (cdiv(Tq, BLOCK_M) * B * NH,)."""
    bh, b, h, _, _, offs_m = _query_program(Tq, NH, 1, BLOCK_M)
    offs_d = tl.arange(0, DV_P)
    o = _load_tile(o_ptr + b * sob + h * soh, offs_m, offs_d, sot, Tq, DV, True, DV != DV_P)
    do = _load_tile(do_ptr + b * sdb + h * sdh, offs_m, offs_d, sdt, Tq, DV, True, DV != DV_P)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:  # d lse / d s = p, so a logsumexp gradient shifts delta
        delta -= tl.load(dlse_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    tl.store(delta_ptr + bh * Tq + offs_m, delta, mask=offs_m < Tq)


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
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                     sdks, sdkb, sdkt, sdkh, sdvs, sdvb, sdvt, sdvh,
                     Tq, Tk, NH, G, REP, SPLITS, q_offset, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
                     DQ: tl.constexpr, DV: tl.constexpr, DQ_P: tl.constexpr, DV_P: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, KV head), summed over REP / SPLITS of its query
    heads; split s writes its sums at dk_ptr + s * sdks (SPLITS > 1: float32 partials, summed after).

    Grid (B * G * SPLITS, cdiv(Tk, BLOCK_N)): the key block varies slowest, so the programs of the
    first key blocks, which see the most queries, start first and the short ones fill in after.
    """
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from Inductor
    start_n = tl.program_id(1) * BLOCK_N
    bgs = tl.program_id(0)
    split = bgs % SPLITS
    b = (bgs // SPLITS // G).to(tl.int64)  # batch offsets pass 2^31 elements on long batched prefills
    kvh = bgs // SPLITS % G
    heads_per_split = REP // SPLITS
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, DQ_P)
    offs_dv = tl.arange(0, DV_P)
    k = _load_tile(k_ptr + b * skb + kvh * skh, cols, offs_dq, skt, Tk, DQ, True, DQ != DQ_P)
    v = _load_tile(v_ptr + b * svb + kvh * svh, cols, offs_dv, svt, Tk, DV, True, DV != DV_P)
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
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + b * sdb + h * sdh
        lse_base = lse_ptr + (b * NH + h) * Tq
        delta_base = delta_ptr + (b * NH + h) * Tq
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
    tl.store(dk_ptr + split * sdks + b * sdkb + kvh * sdkh + cols[:, None] * sdkt + offs_dq[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=row_ok & (offs_dq[None, :] < DQ))
    tl.store(dv_ptr + split * sdvs + b * sdvb + kvh * sdvh + cols[:, None] * sdvt + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=row_ok & (offs_dv[None, :] < DV))


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
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sdqb, sdqt, sdqh,
                   Tq, Tk, NH, REP, q_offset, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
                   DQ: tl.constexpr, DV: tl.constexpr, DQ_P: tl.constexpr, DV_P: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch, head). Grid (cdiv(Tq, BLOCK_M) * B * NH,)."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from Inductor
    bh, b, h, kvh, start_m, offs_m = _query_program(Tq, NH, REP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, DQ_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, offs_dq, sqt, Tq, DQ, True, DQ != DQ_P)
    do = _load_tile(do_ptr + b * sdb + h * sdh, offs_m, offs_dv, sdt, Tq, DV, True, DV != DV_P)
    lse = tl.load(lse_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0) * LOG2E_C
    delta = tl.load(delta_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
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
    tl.store(dq_ptr + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_dq[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_dq[None, :] < DQ))
