"""Latent decode kernel (mla_kernels.decode) in the Triton CPU interpreter vs the float64 reference."""
import pytest
import torch
from helpers import assert_close, poison_past_lengths, rel_err

from mla_kernels.decode import MAX_ACC_REGS, MAX_WARPS, latent_decode, num_splits_heuristic, packed_block_m
from mla_kernels.reference import FP8_DTYPE, dequantize_fp8, latent_decode_ref, quantize_fp8

SCALE = 0.125  # 1 / sqrt(hs) for hs 64: MLA keeps the head size's scale, not the latent's
L_CACHE = 320  # cache capacity; the longest row uses 300, so every row has NaN-filled slots

# (B, Tq, nh, g, r, rv, joint, num_splits): g in {nh, 2, 1}, dims {8, 16, 24, 32, 48, 64, 96}, rv != r too
CASES = [
    (3, 1, 4, 4, 16, 16, False, 1),
    (3, 1, 4, 2, 24, 24, False, 3),
    (3, 1, 4, 1, 64, 64, True, 4),
    (3, 3, 6, 1, 96, 96, True, 1),
    (3, 2, 4, 2, 64, 24, False, 2),
    (3, 4, 4, 4, 96, 96, False, 5),
    (3, 4, 32, 1, 16, 16, True, 2),  # 32 heads x 4 queries = 128 packed rows: two query blocks
    (3, 1, 4, 2, 8, 12, False, 2),  # latents narrower than a tile: padded to 16 and masked
    # one query row per group (g = nh, Tq 1): the single-row kernel
    (3, 1, 4, 4, 32, 32, False, 3),
    (3, 1, 6, 6, 24, 40, False, 1),
    (3, 1, 2, 2, 48, 48, True, 2),
]
TOLS = [(torch.float32, 2e-5, 2e-5), (torch.float16, 3e-3, 3e-3)]


def _case_id(c):
    B, Tq, nh, g, r, rv, joint, s = c
    return f"B{B}-T{Tq}-H{nh}-G{g}-D{r}" + ("-joint" if joint else f"-V{rv}") + f"-S{s}"


def _make_inputs(B, Tq, nh, g, r, rv, joint, dtype, seqlens, L=L_CACHE):
    """Random queries and caches; slots at or beyond each row's length are NaN."""
    q = torch.randn(B, Tq, nh, r, dtype=dtype)  # (B, Tq, nh, r)
    ck = torch.randn(B, L, g, r, dtype=dtype)  # (B, L, g, r)
    cv = None if joint else torch.randn(B, L, g, rv, dtype=dtype)  # (B, L, g, rv)
    lens = torch.tensor(seqlens, dtype=torch.int32)  # (B,)
    poison_past_lengths(seqlens, ck, cv)
    return q, ck, cv, lens


def _check(q, ck, cv, lens, num_splits, atol, rtol):
    out, lse = latent_decode(q, ck, cv, lens, SCALE, num_splits=num_splits)
    ref_out, ref_lse = latent_decode_ref(q.double(), ck.double(), None if cv is None else cv.double(), lens, SCALE)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert_close("o_lat", out, ref_out, atol, rtol)
    assert_close("lse", lse, ref_lse, 1e-4, 1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", TOLS, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, dtype, atol, rtol):
    B, Tq, nh, g, r, rv, joint, num_splits = case
    torch.manual_seed(CASES.index(case))
    seqlens = [max(Tq, 1), 17, 300]
    _check(*_make_inputs(B, Tq, nh, g, r, rv, joint, dtype, seqlens), num_splits, atol, rtol)


FP8_CASES = [case for case in CASES if case[1] * case[2] <= 64]  # one query block each: the interpreter is slow
FP8_VALUE_ERROR = 2.0**-4  # e4m3: 3 mantissa bits, a relative rounding error of at most 2^-4 per value


def _fp8_inputs(case, dtype, amplitude=1.0):
    """The case's inputs with the caches (times amplitude) quantized to fp8 per (row, position,
    group); NaN past each length."""
    B, Tq, nh, g, r, rv, joint, _ = case
    q, ck, cv, lens = _make_inputs(B, Tq, nh, g, r, rv, joint, torch.float32, [max(Tq, 1), 17, 300])
    ck, cv = ck * amplitude, None if cv is None else cv * amplitude
    ck8, k_scale = quantize_fp8(ck.nan_to_num(0.0))  # (B, L, g, r), (B, L, g)
    cv8, v_scale = (None, None) if cv is None else quantize_fp8(cv.nan_to_num(0.0))
    poison_past_lengths(lens.tolist(), ck8, k_scale, cv8, v_scale)  # what no row may read: values and scales
    return q.to(dtype), (ck, ck8, k_scale), (cv, cv8, v_scale), lens


# a bfloat16 query runs the fp8 tiles' dots in float16 (exact for its values), so the interpreter,
# whose bfloat16 dot is wrong, can check it too; the output is rounded to bfloat16
FP8_TOLS = [*TOLS, (torch.bfloat16, 1e-2, 1e-2)]


@pytest.mark.parametrize("dtype, atol, rtol", FP8_TOLS, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", FP8_CASES, ids=_case_id)
def test_fp8_cache_matches_reference_on_the_dequantized_values(case, dtype, atol, rtol):
    """The kernel applies the scales in registers: exactly the reference over the dequantized latents,
    up to accumulation order."""
    torch.manual_seed(100 + CASES.index(case))
    q, (_, ck8, k_scale), (_, cv8, v_scale), lens = _fp8_inputs(case, dtype)
    out, lse = latent_decode(q, ck8, cv8, lens, SCALE, num_splits=case[-1], k_scale=k_scale, v_scale=v_scale)
    ck64 = dequantize_fp8(ck8, k_scale, torch.float64)
    cv64 = None if cv8 is None else dequantize_fp8(cv8, v_scale, torch.float64)
    ref_out, ref_lse = latent_decode_ref(q.double(), ck64, cv64, lens, SCALE)
    assert_close("o_lat", out, ref_out, atol, rtol)
    assert_close("lse", lse, ref_lse, 1e-4, 1e-5)


@pytest.mark.parametrize("amplitude", [1e-2, 1e-4], ids=["amax1e-2", "amax1e-4"])
@pytest.mark.parametrize("dtype, atol, rtol", FP8_TOLS[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [FP8_CASES[0], FP8_CASES[2]], ids=_case_id)
def test_fp8_cache_of_small_latents_keeps_its_precision(case, dtype, atol, rtol, amplitude):
    """Latents of small magnitude have small scales: the float16 probabilities carry each scale
    relative to its tile's largest, so p x scale never goes subnormal and the error stays the
    dtype's (the tolerances are relative to the output's size here)."""
    torch.manual_seed(300 + CASES.index(case))
    q, (_, ck8, k_scale), (_, cv8, v_scale), lens = _fp8_inputs(case, dtype, amplitude)
    out, _ = latent_decode(q, ck8, cv8, lens, SCALE, num_splits=case[-1], k_scale=k_scale, v_scale=v_scale)
    ck64 = dequantize_fp8(ck8, k_scale, torch.float64)
    cv64 = None if cv8 is None else dequantize_fp8(cv8, v_scale, torch.float64)
    ref, _ = latent_decode_ref(q.double(), ck64, cv64, lens, SCALE)
    assert_close("o_lat / amplitude", out.double() / amplitude, ref / amplitude, atol, rtol)


@pytest.mark.parametrize("case", FP8_CASES, ids=_case_id)
def test_fp8_cache_error_is_bounded_by_fp8_precision(case):
    """Against the unquantized cache: each latent is off by at most 2^-4 relatively, so the output,
    a convex mix of values under slightly moved weights, is off by a small multiple of it."""
    torch.manual_seed(200 + CASES.index(case))
    q, (ck, ck8, k_scale), (cv, cv8, v_scale), lens = _fp8_inputs(case, torch.float32)
    out, _ = latent_decode(q, ck8, cv8, lens, SCALE, num_splits=case[-1], k_scale=k_scale, v_scale=v_scale)
    exact, _ = latent_decode_ref(q.double(), ck.double(), None if cv is None else cv.double(), lens, SCALE)
    rel = rel_err(out, exact)
    assert rel <= 4 * FP8_VALUE_ERROR, f"relative error {rel:.3g} against the unquantized cache"
    assert rel > 0, "the fp8 path read the unquantized values"


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: {**a, "k_scale": None}, TypeError, "needs k_scale"),
    (lambda a: {**a, "v_scale": a["v_scale"][:, :5]}, ValueError, r"v_scale must be float32 of shape \(2, 32, 2\)"),
    (lambda a: {**a, "cache_v": a["cache_v"].float()}, TypeError, "both fp8 or neither"),
    (lambda a: {**a, "k_scale": a["k_scale"].half()}, ValueError, "k_scale must be float32"),
], ids=["no-scale", "scale-shape", "mixed-dtypes", "scale-dtype"])
def test_fp8_cache_inputs_are_checked(mutate, exc, match):
    torch.manual_seed(5)
    q, ck, cv, lens = _make_inputs(2, 1, 4, 2, 16, 16, False, torch.float32, [1, 30], L=32)
    ck8, k_scale = quantize_fp8(ck.nan_to_num(0.0))
    cv8, v_scale = quantize_fp8(cv.nan_to_num(0.0))
    args = mutate(dict(q_lat=q, cache_k=ck8, cache_v=cv8, cache_seqlens=lens, softmax_scale=SCALE,
                       k_scale=k_scale, v_scale=v_scale))
    with pytest.raises(exc, match=match):
        latent_decode(**args)


def test_quantize_fp8_round_trip():
    x = torch.randn(5, 7, 33) * torch.logspace(-3, 3, 33)  # vectors over six decades
    values, scales = quantize_fp8(x)
    assert values.dtype == FP8_DTYPE and scales.shape == (5, 7) and scales.dtype == torch.float32
    back = dequantize_fp8(values, scales, torch.float64)
    amax = x.abs().amax(-1, keepdim=True).double()
    assert ((back - x.double()).abs() <= FP8_VALUE_ERROR * amax).all()  # within fp8's step at the vector's top
    zeros, zero_scales = quantize_fp8(torch.zeros(3, 8))
    assert (zero_scales == 1).all() and (zeros.float() == 0).all()


@pytest.mark.parametrize("num_splits", [1, 7], ids=["S1", "S7"])
def test_strided_views_of_one_buffer(num_splits):
    """K and V as column slices of one (B, L, g, r + rv) buffer, the batch taken with a step."""
    torch.manual_seed(1)
    B, Tq, nh, g, r, rv = 2, 2, 4, 2, 24, 40
    buf = torch.randn(2 * B, L_CACHE, g, r + rv)[::2]  # (B, L, g, r + rv), batch stride doubled
    lens = torch.tensor([5, 260], dtype=torch.int32)
    poison_past_lengths(lens.tolist(), buf)
    q = torch.randn(B, Tq, nh, r)
    _check(q, buf[..., :r], buf[..., r:], lens, num_splits, 2e-5, 2e-5)


def test_more_splits_than_tiles():
    """Splits past a short row's length see no key; the merge must weigh them 0."""
    torch.manual_seed(2)
    q, ck, cv, lens = _make_inputs(2, 1, 2, 1, 16, 16, True, torch.float32, [1, 40], L=64)
    _check(q, ck, cv, lens, 16, 2e-5, 2e-5)


@pytest.fixture
def poison(monkeypatch):
    """Fill every tensor the launcher allocates (the outputs, the splits' partials) with NaN, so an
    unwritten element or a read of an unwritten partial shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


# (B, Tq, nh, g, r, rv, joint, num_splits): value widths that are not whole merge column blocks (64)
MERGE_CASES = [
    (3, 1, 4, 2, 16, 48, False, 4),  # one block, 16 of its columns masked
    (3, 2, 4, 1, 100, 100, True, 3),  # two blocks, the second 36 wide
    (3, 1, 4, 2, 32, 200, False, 6),  # four blocks, the last 8 wide
]


@pytest.mark.parametrize("dtype, atol, rtol", TOLS, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", MERGE_CASES, ids=_case_id)
def test_merge_column_blocks_cover_the_value_width(case, dtype, atol, rtol, poison):
    """The merge runs one program per output and block of value columns: together they write every
    column of the output and the logsumexp, and read no partial column past rv."""
    B, Tq, nh, g, r, rv, joint, num_splits = case
    torch.manual_seed(400 + MERGE_CASES.index(case))
    _check(*_make_inputs(B, Tq, nh, g, r, rv, joint, dtype, [max(Tq, 1), 17, 300]), num_splits, atol, rtol)


def test_cpu_fallback_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET the op runs the reference, float64 included."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(3)
    q, ck, cv, lens = _make_inputs(3, 2, 4, 2, 24, 24, False, torch.float32, [2, 17, 300])
    out, lse = latent_decode(q, ck, cv, lens, SCALE)
    ref_out, ref_lse = latent_decode_ref(q, ck, cv, lens, SCALE)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_custom_op_registration():
    """Fake (meta) implementation, schema and dispatch agree with the real op."""
    torch.manual_seed(4)
    q, ck, cv, lens = _make_inputs(2, 1, 4, 2, 16, 16, False, torch.float32, [3, 40], L=48)
    torch.library.opcheck(torch.ops.mla_kernels.latent_decode.default, (q, ck, cv, lens, SCALE, 2),
                          test_utils=("test_schema", "test_faketensor"))
    (k8, k_scale), (v8, v_scale) = quantize_fp8(ck.nan_to_num(0.0)), quantize_fp8(cv.nan_to_num(0.0))
    # fp8 inputs: the fake implementation only (the schema check compares inputs with CPU ops fp8 lacks)
    torch.library.opcheck(torch.ops.mla_kernels.latent_decode.default,
                          (q, k8, v8, lens, SCALE, 2, k_scale, v_scale), test_utils=("test_faketensor",))


def test_compiled_call_runs_the_custom_op_and_matches_eager():
    """torch.compile traces the custom op (fullgraph); eager calls skip the dispatcher."""
    torch.manual_seed(5)
    q, ck, cv, lens = _make_inputs(2, 1, 4, 2, 16, 16, False, torch.float32, [3, 40], L=48)

    def decode(q, ck, cv, lens):
        return latent_decode(q, ck, cv, lens, SCALE, num_splits=2, check_seqlens=False)

    compiled = torch.compile(decode, backend="aot_eager", fullgraph=True)(q, ck, cv, lens)
    eager = decode(q, ck, cv, lens)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("case", [
    ("default", 64, 4096, 1),  # 768 programs already fill the H200
    ("default", 16, 32768, 2),  # 3 programs on the busiest SM beat 2 of full length
    ("default", 1, 131072, 32),
    ("default", 1, 300, 1),  # too short to split
    ("joint", 64, 4096, 4),  # 256 programs, 2 per SM; 5 splits would leave a tail of 56
    ("joint", 16, 32768, 16),  # not 17: 272 programs would put 3 on some SMs
    ("joint", 1, 131072, 128),  # one program per SM: 256 would double the merge's reads
], ids=lambda c: f"{c[0]}-B{c[1]}-L{c[2]}-S{c[3]}")
def test_heuristic_on_the_h200(case):
    """GPT-2-small heads (nh 12) over bf16 latents: default g 12, r = rv = 32; joint g 1, r 256."""
    mode, B, L, splits = case
    nh, sms, elt = 12, 132, 2
    g, row_bytes, rv = (12, 2 * 32 * elt, 32) if mode == "default" else (1, 256 * elt, 256)
    assert num_splits_heuristic(B * g, L, row_bytes, B * nh, rv, sms) == splits


@pytest.mark.parametrize("case", [
    (12, 1, 32, 16),  # GPT-2 small, g 1: 12 rows padded to the 16-row minimum
    (16, 3, 32, 64),  # 48 packed rows
    (32, 4, 32, 64),  # 128 rows: two programs of 64
    (16, 3, 1024, 32),  # r 576, tiled as 1024: 64 rows would need 256 KB of shared memory on an H200
    (128, 1, 1024, 32),  # DeepSeek-V2's 128 heads over the joint 576 latent
], ids=lambda c: f"HPG{c[0]}-Tq{c[1]}-D{c[2]}-M{c[3]}")
def test_packed_rows_per_program(case):
    """A program packs (head, query) rows up to MAX_BLOCK_M, fewer where a float32 tile as wide as
    its key or value tile would not fit in the registers of the widest tile candidate."""
    heads_per_group, new_tokens, widest_tile, block_m = case
    assert packed_block_m(heads_per_group, new_tokens, widest_tile) == block_m
    assert block_m * widest_tile <= MAX_ACC_REGS * 32 * MAX_WARPS


def _valid():
    torch.manual_seed(5)
    return _make_inputs(2, 1, 4, 2, 16, 16, False, torch.float32, [1, 30], L=32)


@pytest.mark.parametrize("lengths, match", [([0, 30], "cache_seqlens"), ([1, 33], "cache_seqlens")],
                         ids=["len0", "beyond-L"])
def test_bad_lengths(lengths, match):
    q, ck, cv, _ = _valid()
    with pytest.raises(ValueError, match=match):
        latent_decode(q, ck, cv, torch.tensor(lengths, dtype=torch.int32), SCALE)


def test_fewer_cached_than_new_tokens():
    q, ck, cv, _ = _valid()
    q2 = torch.randn(2, 3, 4, 16)
    with pytest.raises(ValueError, match="cache_seqlens"):
        latent_decode(q2, ck, cv, torch.tensor([2, 30], dtype=torch.int32), SCALE)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: {**a, "cache_k": a["cache_k"][:1]}, ValueError, "cache_k"),
    (lambda a: {**a, "cache_k": torch.randn(2, 32, 2, 600), "q_lat": torch.randn(2, 1, 4, 600)}, ValueError,
     "1..576"),
    (lambda a: {**a, "cache_v": a["cache_v"][:, :5]}, ValueError, "cache_v"),
    (lambda a: {**a, "q_lat": a["q_lat"][:, :, :3]}, ValueError, "multiple"),
    (lambda a: {**a, "cache_k": a["cache_k"].half()}, TypeError, "cache_k"),
    (lambda a: {**a, "q_lat": a["q_lat"].double(), "cache_k": a["cache_k"].double(),
                "cache_v": a["cache_v"].double()}, TypeError, "q_lat"),
    (lambda a: {**a, "cache_seqlens": a["cache_seqlens"].float()}, TypeError, "cache_seqlens"),
    (lambda a: {**a, "cache_seqlens": a["cache_seqlens"][:1]}, ValueError, "cache_seqlens"),
    (lambda a: {**a, "q_lat": a["q_lat"][0]}, ValueError, "q_lat"),
    (lambda a: {**a, "num_splits": 0}, ValueError, "num_splits"),
    (lambda a: {**a, "softmax_scale": -1.0}, ValueError, "softmax_scale"),
    (lambda a: {**a, "q_lat": a["q_lat"].numpy()}, TypeError, "q_lat"),
], ids=["batch", "dim8", "v-len", "heads", "k-dtype", "float64", "len-dtype", "len-shape", "q-3d", "splits0",
        "scale", "numpy"])
def test_bad_inputs(mutate, exc, match):
    q, ck, cv, lens = _valid()
    args = mutate({"q_lat": q, "cache_k": ck, "cache_v": cv, "cache_seqlens": lens, "softmax_scale": SCALE,
                   "num_splits": None})
    with pytest.raises(exc, match=match):
        latent_decode(**args)
