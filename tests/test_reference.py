"""The PyTorch reference ops against direct float64 math: the ground truth must itself be right."""
import math

import pytest
import torch

from mla_kernels import reference as ref


def naive_attention(q, k, v, scale, q_offset):
    """Loop over rows and heads with explicit softmax: (B, Tq, nh, D) -> out, lse."""
    B, Tq, nh, _ = q.shape
    rep = nh // k.shape[2]
    out = torch.empty(B, Tq, nh, v.shape[-1], dtype=torch.float64)
    lse = torch.empty(B, nh, Tq, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            for i in range(Tq):
                visible = q_offset + i + 1
                s = [scale * float(q[b, i, h] @ k[b, j, h // rep]) for j in range(visible)]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                total = sum(w)
                lse[b, h, i] = m + math.log(total)
                out[b, i, h] = sum(wj * v[b, j, h // rep] for j, wj in enumerate(w)) / total
    return out, lse


@pytest.mark.parametrize("B,Tq,Tk,nh,g,D,Dv", [(1, 5, 5, 2, 2, 8, 8), (2, 3, 9, 4, 2, 6, 10),
                                                (2, 1, 7, 3, 1, 5, 4)],
                         ids=["B1-T5-H2-G2-D8", "B2-Tq3-Tk9-H4-G2-D6-Dv10", "B2-Tq1-Tk7-H3-G1-D5-Dv4"])
def test_attention_ref_matches_loops(B, Tq, Tk, nh, g, D, Dv):
    q = torch.randn(B, Tq, nh, D, dtype=torch.float64)
    k = torch.randn(B, Tk, g, D, dtype=torch.float64)
    v = torch.randn(B, Tk, g, Dv, dtype=torch.float64)
    scale = 0.37
    out, lse = ref.attention_ref(q, k, v, scale)
    want_out, want_lse = naive_attention(q, k, v, scale, Tk - Tq)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)


def test_attention_ref_explicit_offset_and_default_scale():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    v = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    out, lse = ref.attention_ref(q, k, v, q_offset=3)
    want_out, want_lse = naive_attention(q, k, v, 1 / math.sqrt(8), 3)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("g,joint,r", [(4, False, 6), (2, False, 24), (1, True, 12)],
                         ids=["G4-r6", "G2-r24", "G1-joint-r12"])
def test_absorbed_equals_expanded_float64(g, joint, r):
    B, T, nh, hs = 2, 11, 4, 8
    q = torch.randn(B, T, nh, hs, dtype=torch.float64)
    c_k = torch.randn(B, T, g, r, dtype=torch.float64)
    c_v = c_k if joint else torch.randn(B, T, g, r, dtype=torch.float64)
    w_uk = torch.randn(nh, r, hs, dtype=torch.float64)
    w_uv = torch.randn(nh, r, hs, dtype=torch.float64)
    out_e, lse_e = ref.mla_attention_expanded_ref(q, c_k, c_v, w_uk, w_uv)
    out_a, lse_a = ref.mla_attention_absorbed_ref(q, c_k, c_v, w_uk, w_uv)
    torch.testing.assert_close(out_a, out_e, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse_a, lse_e, atol=1e-10, rtol=1e-10)


def test_expand_latent_per_head():
    c = torch.randn(2, 3, 2, 5, dtype=torch.float64)
    w = torch.randn(4, 5, 7, dtype=torch.float64)
    out = ref.expand_latent(c, w)
    for h in range(4):
        torch.testing.assert_close(out[:, :, h], c[:, :, h // 2] @ w[h])


@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
def test_latent_decode_ref_per_row_lengths(joint):
    B, L, nh, g, r, Tq = 3, 12, 4, 2, 6, 2
    seqlens = torch.tensor([2, 7, 12])
    q = torch.randn(B, Tq, nh, r, dtype=torch.float64)
    cache_k = torch.randn(B, L, g, r, dtype=torch.float64)
    cache_v = None if joint else torch.randn(B, L, g, r, dtype=torch.float64)
    for b in range(B):  # slots past each row's length must never be read
        cache_k[b, seqlens[b]:] = float("nan")
        if cache_v is not None:
            cache_v[b, seqlens[b]:] = float("nan")
    out, lse = ref.latent_decode_ref(q, cache_k, cache_v, seqlens, 0.3)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    values = cache_k if joint else cache_v
    for b in range(B):
        n = int(seqlens[b])
        want, want_lse = naive_attention(q[b:b + 1], cache_k[b:b + 1, :n], values[b:b + 1, :n], 0.3, n - Tq)
        torch.testing.assert_close(out[b:b + 1], want)
        torch.testing.assert_close(lse[b:b + 1], want_lse)


def matrix_with_spectrum(batch, m, n, spectrum, generator):
    """(batch, m, n) float64 matrices U diag(spectrum) V^T with random orthonormal U, V."""
    k = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(batch, m, k, dtype=torch.float64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(batch, n, k, dtype=torch.float64, generator=generator))
    s = torch.tensor(spectrum, dtype=torch.float64)
    return (U * s) @ V.transpose(-1, -2)


SPECTRA = {
    "fast-decay": lambda n: [0.5 ** i for i in range(n)],
    "slow-decay": lambda n: [1.0 / (1 + i) for i in range(n)],
    "exact-rank-6": lambda n: [float(6 - i) for i in range(6)],
    "repeated": lambda n: [3.0] * 4 + [2.0] * 4 + [0.01 * 0.7 ** i for i in range(n - 8)],
}


@pytest.mark.parametrize("m,n", [(77, 48), (40, 90)], ids=["tall-77x48", "wide-40x90"])
@pytest.mark.parametrize("spectrum", SPECTRA, ids=list(SPECTRA))
def test_randomized_svd_ref_error_near_optimal(spectrum, m, n):
    gen = torch.Generator().manual_seed(0)
    values = SPECTRA[spectrum](min(m, n))
    A = matrix_with_spectrum(3, m, n, values, gen)
    rank = 6
    U, S, Vh = ref.randomized_svd_ref(A, rank, generator=gen)
    assert U.shape == (3, m, rank) and S.shape == (3, rank) and Vh.shape == (3, rank, n)
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(U.transpose(-1, -2) @ U, eye.expand(3, -1, -1), atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.transpose(-1, -2), eye.expand(3, -1, -1), atol=1e-10, rtol=0)
    assert (S[:, :-1] >= S[:, 1:]).all()
    err = torch.linalg.matrix_norm(A - (U * S[:, None, :]) @ Vh)
    optimal = torch.tensor(values[rank:], dtype=torch.float64).norm()
    slack = {"fast-decay": 1e-6, "slow-decay": 0.1, "exact-rank-6": 1e-8, "repeated": 1e-6}[spectrum]
    assert (err <= optimal * (1 + slack) + 1e-10).all(), (err, optimal)


def test_low_rank_approx_ref_keeps_dtype_and_shape():
    A = torch.randn(2, 3, 20, 10)
    approx = ref.low_rank_approx_ref(A, 4)
    assert approx.shape == A.shape and approx.dtype == A.dtype
    assert torch.linalg.matrix_rank(approx, rtol=1e-4).max() <= 4  # float32 rounding leaves ~1e-7 tails


@pytest.mark.parametrize("rank", [0, 21], ids=["rank0", "rank>min"])
def test_randomized_svd_ref_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match=f"rank must be in \\[1, min\\(m, n\\)\\] = \\[1, 20\\].*got {rank}"):
        ref.randomized_svd_ref(torch.randn(30, 20), rank)
