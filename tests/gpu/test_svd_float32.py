"""The randomized SVD kernels on the GPU: the project's GPU correctness check for `mla_kernels.svd`.

    PYTHONPATH=. python -m pytest tests/gpu/test_svd_float32.py

The kernels load A in its own dtype (float32, bfloat16, float16) and compute in float32 (3xTF32
products, float64 Grams), so every input dtype is held to float32 tolerances, measured in float64
against the matrix the kernels were given (A as stored, upcast). For each case, `randomized_svd`
runs on fresh random matrices with a decaying spectrum (s_i = 1 / (i + 1), random singular
vectors), and:

- against the reference `randomized_svd_ref` (Householder QR, float32) with the same Gaussian test
  matrix (same generator seed): error ||A - U diag(S) Vh||_F / ||A||_F within REF_SLACK of the
  reference's, plus ERR_FLOOR, and max |S - S_ref| / S_ref[0] <= S_RTOL;
- against the optimum, the rank-k tail of torch.linalg.svdvals in float64 (Eckart-Young): error
  within OPT_SLACK of it, plus ERR_FLOOR;
- U and V have orthonormal columns: max |X^T X - I| <= ORTHO_ATOL.
Rank-deficient inputs (exact rank below the requested rank) must still give orthonormal U and V,
the nonzero singular values, zeros beyond them and an error at ERR_FLOOR.

The cases cover the three launch paths of `mla_kernels.svd`: the fused range finder (sketch
l <= 64, at most 2^20 elements per matrix), tiled products with the in-kernel Cholesky-QR2
(l <= 64, larger matrices), tiled products with Cholesky-QR2 through torch.linalg (l > 64).

DEVICE is the only device setting; a CPU dry run may set it to "cpu" with TRITON_INTERPRET=1.
"""

import pytest
import torch
from helpers import dtype_name

from mla_kernels.reference import randomized_svd_ref
from mla_kernels.svd import low_rank_approx, randomized_svd, top_left_singular_vectors

DEVICE = "cuda"
OVERSAMPLE, N_ITER = 8, 2  # the defaults of randomized_svd
REF_SLACK = 1e-3  # error <= (1 + REF_SLACK) x the reference's error with the same test matrix
OPT_SLACK = 0.05  # error <= (1 + OPT_SLACK) x the optimal rank-k error
ERR_FLOOR = 1e-5  # relative to ||A||_F: float32 rounding of the factors
S_RTOL = 1e-4  # singular values against the reference's, relative to the largest
ORTHO_ATOL = 1e-4  # |U^T U - I| and |V^T V - I|, float32 factors

# (batch, m, n, rank, dtype): sketch l = rank + OVERSAMPLE
CASES = [
    ((96,), 1024, 64, 16, torch.float32),  # the model's value maps: fused range finder
    ((96,), 1024, 64, 16, torch.bfloat16),  # same, A loaded as bf16
    ((2,), 4096, 512, 32, torch.float32),  # tiled products, in-kernel Cholesky-QR2
    ((1,), 4096, 4096, 256, torch.float32),  # tiled products, Cholesky-QR2 through torch.linalg
    ((3, 2), 77, 1000, 8, torch.float16),  # wide matrices, two batch dims
    ((5,), 333, 129, 20, torch.float32),  # sizes off every tile
]
# (batch, m, n, rank, true_rank, dtype): rank asked above the matrix's exact rank
DEFICIENT_CASES = [
    ((4,), 500, 300, 16, 10, torch.float32),  # fused: Cholesky-QR drops columns, Householder QR completes
    ((2,), 4096, 512, 32, 20, torch.float32),  # tiled, in-kernel Cholesky-QR2
    ((1,), 2048, 1024, 120, 100, torch.float32),  # through torch.linalg: counted by its singular values
]


def case_id(case):
    batch, m, n, rank, dtype = case
    return f"B{'x'.join(map(str, batch))}-M{m}-N{n}-R{rank}-{dtype_name(dtype)}"


def deficient_id(case):
    batch, m, n, rank, true_rank, dtype = case
    return f"B{'x'.join(map(str, batch))}-M{m}-N{n}-R{rank}-exact{true_rank}-{dtype_name(dtype)}"


def make_matrix(batch, m, n, true_rank=None):
    """(*batch, m, n) float64 with singular values 1 / (i + 1), zero from true_rank on, and random
    singular vectors."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, device=DEVICE, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, device=DEVICE, dtype=torch.float64))[0]
    s = 1.0 / torch.arange(1, k + 1, device=DEVICE, dtype=torch.float64)
    if true_rank is not None:
        s[true_rank:] = 0
    return (U * s) @ V.mT


def generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def rel_errors(A64, U, S, Vh):
    """||A - U diag(S) Vh||_F / ||A||_F per matrix, in float64."""
    approx = (U.double() * S.double()[..., None, :]) @ Vh.double()
    return torch.linalg.matrix_norm(A64 - approx) / torch.linalg.matrix_norm(A64)


def assert_orthonormal(X, name):
    """Columns of X (..., p, k) orthonormal within ORTHO_ATOL."""
    eye = torch.eye(X.shape[-1], device=X.device, dtype=torch.float64)
    dev = (X.double().mT @ X.double() - eye).abs().max().item()
    assert dev <= ORTHO_ATOL, f"max |{name}^T {name} - I| = {dev:.3e} > {ORTHO_ATOL}"


def assert_valid_factors(U, S, Vh, batch, m, n, rank):
    """Shapes, float32, finite, S descending and non-negative, U and V orthonormal."""
    assert U.shape == (*batch, m, rank) and S.shape == (*batch, rank) and Vh.shape == (*batch, rank, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert all(bool(torch.isfinite(t).all()) for t in (U, S, Vh)), "non-finite factors"
    assert bool((S[..., :-1] >= S[..., 1:]).all()) and bool((S >= 0).all()), "S not descending and >= 0"
    assert_orthonormal(U, "U")
    assert_orthonormal(Vh.mT, "V")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_randomized_svd(case):
    """Near the reference with the same test matrix and near the optimal rank-k error."""
    batch, m, n, rank, dtype = case
    A = make_matrix(batch, m, n).to(dtype)
    A64 = A.double()  # the matrix the kernels are given
    U, S, Vh = randomized_svd(A, rank, OVERSAMPLE, N_ITER, generator=generator(0))
    assert_valid_factors(U, S, Vh, batch, m, n, rank)

    Ur, Sr, Vhr = randomized_svd_ref(A.float(), rank, OVERSAMPLE, N_ITER, generator=generator(0))
    err, err_ref = rel_errors(A64, U, S, Vh), rel_errors(A64, Ur, Sr, Vhr)
    s = torch.linalg.svdvals(A64)
    err_opt = s[..., rank:].norm(dim=-1) / s.norm(dim=-1)
    s_diff = ((S.double() - Sr.double()).abs() / Sr.double()[..., :1]).max().item()
    report = (f"error: kernels {err.max().item():.6e}, reference {err_ref.max().item():.6e}, "
              f"optimal {err_opt.max().item():.6e}; max |S - S_ref| / S_ref[0] {s_diff:.2e}")
    assert bool((err <= (1 + REF_SLACK) * err_ref + ERR_FLOOR).all()), "worse than the reference: " + report
    assert bool((err <= (1 + OPT_SLACK) * err_opt + ERR_FLOOR).all()), "far from optimal: " + report
    assert s_diff <= S_RTOL, "singular values off the reference's: " + report


@pytest.mark.parametrize("case", DEFICIENT_CASES, ids=deficient_id)
def test_randomized_svd_rank_deficient(case):
    """Exact rank below the rank asked: the nonzero singular values, zeros after them, an exact
    reconstruction, and orthonormal U and V all the same."""
    batch, m, n, rank, true_rank, dtype = case
    A = make_matrix(batch, m, n, true_rank).to(dtype)
    A64 = A.double()
    U, S, Vh = randomized_svd(A, rank, OVERSAMPLE, N_ITER, generator=generator(1))
    assert_valid_factors(U, S, Vh, batch, m, n, rank)
    s = torch.linalg.svdvals(A64)[..., :rank]
    s_diff = ((S.double() - s).abs() / s[..., :1]).max().item()
    assert s_diff <= S_RTOL, f"max |S - S_true| / S_true[0] = {s_diff:.2e} (S_true beyond {true_rank} is 0)"
    err = rel_errors(A64, U, S, Vh).max().item()
    assert err <= ERR_FLOOR, f"rank-{true_rank} matrix not reconstructed: relative error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_low_rank_approx_and_top_left_singular_vectors(dtype):
    """Both are `randomized_svd` with the same test matrix: U diag(S) Vh in A's dtype, and U."""
    batch, m, n, rank = (96,), 1024, 64, 16
    A = make_matrix(batch, m, n).to(dtype)
    U, S, Vh = randomized_svd(A, rank, generator=generator(2))
    A_k = low_rank_approx(A, rank, generator=generator(2))
    assert A_k.shape == A.shape and A_k.dtype == dtype
    torch.testing.assert_close(A_k, ((U * S[..., None, :]) @ Vh).to(dtype))
    U_top = top_left_singular_vectors(A, rank, generator=generator(2))
    assert U_top.shape == U.shape and U_top.dtype == torch.float32
    torch.testing.assert_close(U_top, U, rtol=0, atol=1e-6)
