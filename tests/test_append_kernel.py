"""Fused latent projection + cache append (mla_kernels.append) in the Triton CPU interpreter vs float64."""
import pytest
import torch
from helpers import assert_close, dtype_name

from mla_kernels.append import fp8_append_supported, project_append
from mla_kernels.cache import LatentKVCache
from mla_kernels.reference import FP8_DTYPE, FP8_MAX, project_append_ref

MAX_BATCH, MAX_SEQ = 4, 40  # the cache has room for more rows and positions than a step writes

# (B, T, C, query_dim, g, r, rv, bias, cache_seqlens): rv 0 is a joint latent; C and dims off the tile sizes
CASES = [
    (3, 1, 40, 12 * 8, 12, 8, 8, True, 7),  # decode step, g = nh (no grouping)
    (2, 5, 72, 4 * 24, 2, 24, 24, False, 0),  # a chunk written from position 0
    (3, 1, 48, 6 * 64, 1, 64, 0, True, 39),  # joint latent, into the last slot
    (1, 3, 40, 4 * 20, 2, 20, 6, True, 11),  # svd 'weight': value latent narrower than the key's
    (4, 2, 33, 2 * 16, 1, 16, 16, False, 30),
]
TOLS = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def _case_id(c):
    B, T, C, qd, g, r, rv, bias, pos = c
    return f"B{B}-T{T}-C{C}-Q{qd}-G{g}-D{r}" + ("-joint" if rv == 0 else f"-V{rv}") + \
        ("-bias" if bias else "") + f"-P{pos}"


def _inputs(B, T, C, qd, g, r, rv, bias, dtype):
    n_out = qd + g * r + g * rv
    x = torch.randn(B, T, C, dtype=dtype)  # (B, T, C)
    weight = (torch.randn(n_out, C) / C ** 0.5).to(dtype)  # (N, C)
    b = torch.randn(n_out, dtype=dtype) if bias else None
    return x, weight, b, _nan_cache(g, r, dtype=dtype), _nan_cache(g, rv, dtype=dtype)


def _nan_cache(g, *dim, dtype=torch.float32):
    """A cache buffer (MAX_BATCH, MAX_SEQ, g, *dim) all NaN, group-major in memory as LatentKVCache
    stores it; without dim, the per-(position, group) scales of an fp8 cache."""
    return torch.full((MAX_BATCH, g, MAX_SEQ, *dim), float("nan"), dtype=dtype).transpose(1, 2)


def _positions(kind, B, T, pos):
    """cache_seqlens as the op takes it: an int, a 0-dim tensor, or one start per row (all in range)."""
    if kind == "int":
        return pos
    if kind == "tensor":
        return torch.tensor(pos)
    return torch.tensor([(pos + 5 * b) % (MAX_SEQ - T + 1) for b in range(B)])  # rows at different positions


@pytest.mark.parametrize("dtype", list(TOLS), ids=dtype_name)
@pytest.mark.parametrize("positions", ["int", "tensor", "per-row"], ids=lambda k: f"{k}-pos")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_and_writes_only_new_slots(case, positions, dtype):
    B, T, C, qd, g, r, rv, bias, pos = case
    x, weight, b, k_cache, v_cache = _inputs(B, T, C, qd, g, r, rv, bias, dtype)
    cache_seqlens = _positions(positions, B, T, pos)
    k_ref, v_ref = k_cache.double(), v_cache.double()
    q_ref = project_append_ref(x.double(), weight.double(), None if b is None else b.double(), qd, k_ref, v_ref,
                               cache_seqlens)

    q = project_append(x, weight, b, qd, k_cache, v_cache, cache_seqlens)
    atol, rtol = TOLS[dtype]
    assert q.shape == (B, T, qd) and q.dtype == dtype
    assert_close("query columns", q, q_ref, atol, rtol)
    assert_close("key latent cache", k_cache, k_ref, atol, rtol, equal_nan=True)  # NaN where not written
    assert_close("value latent cache", v_cache, v_ref, atol, rtol, equal_nan=True)
    starts = torch.as_tensor(cache_seqlens).expand(B).tolist()
    for row, start in enumerate(starts):
        assert not k_cache[row, start : start + T].isnan().any(), f"a new slot of row {row} was not written"
    assert k_cache.isnan().sum() == k_cache.numel() - B * T * g * r, "a slot outside the new tokens was written"


FP8_CASES = [case for case in CASES if fp8_append_supported(case[3], case[5], case[6])]  # power-of-two r, rv 0 or r


@pytest.mark.parametrize("positions", ["int", "per-row"], ids=lambda k: f"{k}-pos")
@pytest.mark.parametrize("case", FP8_CASES, ids=_case_id)
def test_fp8_cache_is_quantized_in_the_kernel(case, positions):
    """fp8 caches: each new (token, group) latent quantized by its own amax, its scale beside it;
    against the reference quantizing the float64 projection: scales to float32 rounding, values
    within one fp8 step; nothing else written."""
    B, T, C, qd, g, r, rv, bias, pos = case
    x, weight, b, _, _ = _inputs(B, T, C, qd, g, r, rv, bias, torch.float32)
    caches = {dtype: [_nan_cache(g, d, dtype=dtype) for d in (r, rv)] for dtype in (FP8_DTYPE, torch.float64)}
    scales = {dtype: [_nan_cache(g) for _ in range(2)] for dtype in (FP8_DTYPE, torch.float64)}
    cache_seqlens = _positions(positions, B, T, pos)
    (k8, v8), (ks, vs) = caches[FP8_DTYPE], scales[FP8_DTYPE]
    q = project_append(x, weight, b, qd, k8, v8, cache_seqlens, ks, vs if rv else None)
    (k_ref, v_ref), (ks_ref, vs_ref) = [t.to(FP8_DTYPE) for t in caches[torch.float64]], scales[torch.float64]
    q_ref = project_append_ref(x.double(), weight.double(), None if b is None else b.double(), qd, k_ref, v_ref,
                               cache_seqlens, ks_ref, vs_ref if rv else None)
    assert_close("query columns", q, q_ref, 1e-5, 1e-5)
    for name, got, want, got_scale, want_scale in (("keys", k8, k_ref, ks, ks_ref), ("values", v8, v_ref, vs, vs_ref)):
        if not got.shape[-1]:
            continue
        torch.testing.assert_close(got_scale, want_scale, rtol=1e-5, atol=0, equal_nan=True, msg=name)
        written = ~got_scale.isnan()  # (max_batch, max_seq, g)
        assert int(written.sum()) == B * T * g, f"{name}: scales written outside the new tokens"
        step = 2**-3 * (want_scale[written] * FP8_MAX)[:, None]  # one fp8 step at each group's top
        got_values = got.float()[written] * got_scale[written][:, None]  # (B T g, dim)
        diff = got_values - want.float()[written] * want_scale[written][:, None]
        assert (diff.abs() <= step).all(), f"{name}: a value off by more than one fp8 step"
        assert got.float()[~written].isnan().all(), f"{name}: a slot outside the new tokens was written"


def test_fp8_cache_of_unsupported_widths_is_refused():
    args = _valid_args()
    k8 = torch.zeros(2, 8, 2, 16, dtype=FP8_DTYPE)
    v8 = torch.zeros(2, 8, 2, 8, dtype=FP8_DTYPE)  # rv 8 != r 16
    weight = torch.randn(32 + 2 * 16 + 2 * 8, 24)
    with pytest.raises(ValueError, match=r"r a power of two <= 512 dividing query_dim and rv in \(0, r\)"):
        project_append(args["x"], weight, None, 32, k8, v8, 3, torch.ones(2, 8, 2), torch.ones(2, 8, 2))


def test_follows_autocast_like_f_linear():
    """float32 weights and bias meet a float16 x under float16 autocast, as in F.linear."""
    B, T, C, qd, g, r, rv, bias, pos = CASES[0]
    x = torch.randn(B, T, C)
    weight, b = torch.randn(qd + g * (r + rv), C) / C**0.5, torch.randn(qd + g * (r + rv))
    k16, v16 = (torch.full((MAX_BATCH, MAX_SEQ, g, d), float("nan"), dtype=torch.float16) for d in (r, rv))
    with torch.autocast("cpu", dtype=torch.float16):
        q = project_append(x, weight, b, qd, k16, v16, pos)
    k_ref, v_ref = k16.double(), v16.double()
    q_ref = project_append_ref(x.half().double(), weight.half().double(), b.half().double(), qd, k_ref, v_ref, pos)
    assert q.dtype == torch.float16
    assert_close("query columns", q, q_ref, *TOLS[torch.float16])
    assert_close("key latent cache", k16, k_ref, *TOLS[torch.float16], equal_nan=True)


def test_append_into_a_cache_equals_its_update():
    """The layer's two ways to write a step's latents into a LatentKVCache, project_append into
    its `.k` / `.v` and F.linear then `update`, leave the same latents, which `latents` hands out."""
    B, T, C, g, r, rv = 2, 3, 40, 2, 16, 8
    qd = 4 * r
    x = torch.randn(B, T, C)
    weight = torch.randn(qd + g * r + g * rv, C)
    fused = LatentKVCache(MAX_BATCH, MAX_SEQ, g, r, rv, dtype=torch.float32, device="cpu")
    plain = LatentKVCache(MAX_BATCH, MAX_SEQ, g, r, rv, dtype=torch.float32, device="cpu")
    q = project_append(x, weight, None, qd, fused.k, fused.v, 5)
    y = x @ weight.T
    plain.update(5, y[..., qd : qd + g * r].reshape(B, T, g, r), y[..., qd + g * r :].reshape(B, T, g, rv))
    (k, v), (k_plain, v_plain) = fused.latents(B, 5 + T), plain.latents(B, 5 + T)
    assert k.shape == k_plain.shape == (B, 5 + T, g, r) and v.shape == v_plain.shape == (B, 5 + T, g, rv)
    assert k.data_ptr() == fused.k.data_ptr() and v.data_ptr() == fused.v.data_ptr()  # views, not copies
    torch.testing.assert_close(q, y[..., :qd], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v_plain, atol=1e-5, rtol=1e-5)


def _valid_args():
    g, r, rv, qd, C = 2, 16, 16, 32, 24
    return dict(x=torch.randn(2, 1, C), weight=torch.randn(qd + g * (r + rv), C), bias=None, query_dim=qd,
                k_cache=torch.zeros(2, 8, g, r), v_cache=torch.zeros(2, 8, g, rv), cache_seqlens=3)


@pytest.mark.parametrize("change, error, match", [
    (dict(cache_seqlens=8), ValueError, r"cache overflow: positions \[8, 9\) do not fit max_seq=8"),
    (dict(cache_seqlens=-1), ValueError, "cache overflow"),
    (dict(cache_seqlens=2.0), TypeError, "cache_seqlens must be an int or a 0-dim integer tensor, got float"),
    (dict(cache_seqlens=torch.tensor([3, 4, 5])), ValueError, r"shape \(\) or \(2,\), got torch.int64 shape \(3,\)"),
    (dict(weight=torch.randn(90, 24)), ValueError, r"weight must be .* = \(96, 24\), got \(90, 24\)"),
    (dict(bias=torch.randn(95)), ValueError, r"bias must be \(96,\)"),
    (dict(x=torch.randn(3, 1, 24)), ValueError, "batch 3, the cache holds max_batch=2"),
    (dict(x=torch.randn(2, 1, 24, dtype=torch.float64)), TypeError, "x dtype torch.float64 not supported"),
    (dict(k_cache=torch.zeros(2, 8, 2, 16, dtype=torch.float16)), TypeError, "k_cache dtype torch.float16 differs"),
    (dict(v_cache=torch.zeros(2, 7, 2, 16)), ValueError, r"v_cache must be \(2, 8, 2, rv\)"),
    (dict(query_dim=-1), ValueError, "query_dim must be an int >= 0, got -1"),
], ids=["pos-past-end", "pos-negative", "pos-float", "pos-shape", "weight-rows", "bias-shape", "batch",
        "x-dtype", "cache-dtype", "cache-shapes", "query-dim"])
def test_bad_input_is_a_clear_error(change, error, match):
    args = {**_valid_args(), **change}
    with pytest.raises(error, match=match):
        project_append(**args)
