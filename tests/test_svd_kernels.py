"""Randomized SVD kernels (Triton interpreter on CPU) against torch.linalg.svd in float64."""
import math

import pytest
import torch

import mla_kernels.svd as svd
from mla_kernels.reference import randomized_svd_ref
from mla_kernels.svd import low_rank_approx, randomized_svd, top_left_singular_vectors

ORTHO_ATOL = 2e-5  # |X^T X - I| for float32 factors


def _spectrum(kind, k, rank):
    i = torch.arange(k, dtype=torch.float64)
    if kind == "fast":
        return 0.7**i
    if kind == "slow":
        return 1.0 / (i + 1.0)
    if kind == "exact":
        return torch.where(i < rank, 1.0 + i.flip(0) / k, torch.zeros_like(i))
    if kind == "repeated":  # plateaus of 3 equal values, with the rank cut inside a plateau
        return 0.6 ** torch.div(i, 3, rounding_mode="floor")
    raise ValueError(kind)


def _matrix(batch, m, n, spectrum, seed):
    """(*batch, m, n) float64 with the given singular values and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
    return (U * spectrum) @ V.mT


def _errors(A64, U, S, Vh):
    """Frobenius error of U diag(S) Vh against A64, per matrix."""
    approx = (U.double() * S.double()[..., None, :]) @ Vh.double()
    return torch.linalg.matrix_norm(A64 - approx)


def _optimal_error(A64, rank):
    s = torch.linalg.svdvals(A64)
    return s[..., rank:].norm(dim=-1)


def _check_orthonormal(X, name):
    """Columns of X (..., p, r) orthonormal."""
    gram = X.double().mT @ X.double()
    eye = torch.eye(X.shape[-1], dtype=torch.float64)
    dev = (gram - eye).abs()
    worst = divmod(int(dev.argmax()), X.shape[-1])
    assert dev.max() <= ORTHO_ATOL, f"{name}^T {name} - I: max {dev.max():.3g} at {worst}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype, rel_slack, s_rtol", [
    (torch.float32, 1e-3, 1e-4),
    (torch.float16, 1e-3, 1e-4),
], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch, m, n, rank", [
    ((2,), 77, 48, 8),
    ((), 48, 77, 8),
    ((2, 1), 40, 24, 4),
    ((1,), 64, 64, 12),
], ids=["B2-M77-N48-R8", "unbatched-M48-N77-R8", "B2x1-M40-N24-R4", "B1-M64-N64-R12"])
def test_fast_decay_near_optimal(batch, m, n, rank, dtype, rel_slack, s_rtol):
    """Fast decay: error within (1 + eps) of the optimal rank-k error; S, U and V match."""
    A64 = _matrix(batch, m, n, _spectrum("fast", min(m, n), rank), seed=m + n)
    A = A64.to(dtype)
    A64 = A.double()  # the optimum of the matrix the kernel is given
    U, S, Vh = randomized_svd(A, rank, generator=_gen(0))
    assert U.shape == (*batch, m, rank) and S.shape == (*batch, rank) and Vh.shape == (*batch, rank, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    err, opt = _errors(A64, U, S, Vh), _optimal_error(A64, rank)
    assert (err <= (1 + rel_slack) * opt).all(), f"error / optimal = {(err / opt).tolist()}"
    s_true = torch.linalg.svdvals(A64)[..., :rank]
    torch.testing.assert_close(S.double(), s_true, rtol=s_rtol, atol=1e-6)
    assert (S[..., :-1] >= S[..., 1:]).all(), "S not descending"
    _check_orthonormal(U, "U")
    _check_orthonormal(Vh.mT, "V")


def _case_id(case):
    kind, batch, m, n, rank = case
    return f"{kind}-B{'x'.join(map(str, batch)) or 1}-M{m}-N{n}-R{rank}"


CASES = [
    ("slow", (2,), 77, 48, 8),
    ("slow", (), 48, 77, 8),
    ("exact", (2,), 77, 48, 8),
    ("repeated", (), 77, 48, 7),
    ("repeated", (2,), 48, 77, 5),
]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_no_worse_than_torch_svd_lowrank(case):
    """Error no worse than torch.svd_lowrank with the same sketch width and iterations."""
    kind, batch, m, n, rank = case
    oversample, n_iter = 8, 2
    A64 = _matrix(batch, m, n, _spectrum(kind, min(m, n), rank), seed=7 * m + n)
    A = A64.float()
    U, S, Vh = randomized_svd(A, rank, oversample, n_iter, generator=_gen(1))
    err = _errors(A64, U, S, Vh)
    torch.manual_seed(1)
    Ut, St, Vt = torch.svd_lowrank(A, q=rank + oversample, niter=n_iter)
    err_torch = _errors(A64, Ut[..., :rank], St[..., :rank], Vt[..., :rank].mT)
    scale = torch.linalg.matrix_norm(A64)
    assert (err <= 1.01 * err_torch + 1e-6 * scale).all(), f"ours {err.tolist()} torch {err_torch.tolist()}"
    assert (err <= 1.05 * _optimal_error(A64, rank) + 1e-6 * scale).all()
    _check_orthonormal(U, "U")
    _check_orthonormal(Vh.mT, "V")


@pytest.mark.parametrize("batch, m, n, rank, exact_rank", [
    ((2,), 77, 48, 12, 6),  # sketch 20: Cholesky-QR in the kernels, which counts the columns it keeps
    ((1,), 150, 96, 70, 50),  # sketch 78 > 64: torch.linalg's QR, which keeps every column
], ids=["kernel-QR-M77-N48-R12-exact6", "linalg-QR-M150-N96-R70-exact50"])
def test_rank_deficient_input_keeps_orthonormal_factors(batch, m, n, rank, exact_rank):
    """More rank asked for than A has: the extra singular values are ~0 and U, V stay orthonormal."""
    A64 = _matrix(batch, m, n, _spectrum("exact", min(m, n), exact_rank), seed=m * n)
    U, S, Vh = randomized_svd(A64.float(), rank, generator=_gen(2))
    scale = torch.linalg.matrix_norm(A64)
    assert (_errors(A64, U, S, Vh) <= 1e-5 * scale).all()
    assert (S[..., exact_rank:] <= 1e-5 * S[..., :1]).all(), "singular values beyond A's rank"
    _check_orthonormal(U, "U")
    _check_orthonormal(Vh.mT, "V")


def test_matches_reference_and_is_deterministic():
    """Same generator state -> bitwise equal results; the reference with that state agrees."""
    A = _matrix((2,), 77, 48, _spectrum("slow", 48, 8), seed=3).float()
    U1, S1, Vh1 = randomized_svd(A, 8, generator=_gen(5))
    U2, S2, Vh2 = randomized_svd(A, 8, generator=_gen(5))
    assert torch.equal(U1, U2) and torch.equal(S1, S2) and torch.equal(Vh1, Vh2)
    U3, _, _ = randomized_svd(A, 8, generator=_gen(6))
    assert not torch.equal(U1, U3)
    Ur, Sr, Vhr = randomized_svd_ref(A, 8, generator=_gen(5))
    torch.testing.assert_close(S1, Sr, rtol=1e-5, atol=1e-6)
    # singular vectors up to sign: compare the rank-8 projectors
    torch.testing.assert_close(U1 @ U1.mT, Ur @ Ur.mT, rtol=0, atol=1e-4)
    torch.testing.assert_close(Vh1.mT @ Vh1, Vhr.mT @ Vhr, rtol=0, atol=1e-4)


def _poisoned_empty(monkeypatch):
    """Scratch and outputs from torch.empty start as NaN (int: -1), so unwritten elements show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(svd.torch, "empty", empty)


def _no_fallback(monkeypatch):
    def fail(*args):
        raise AssertionError("Householder fallback used: Cholesky-QR kept fewer columns than rank")

    monkeypatch.setattr(svd, "_householder_rsvd", fail)


@pytest.mark.parametrize("m, n, rank, oversample", [(77, 48, 8, 8), (100, 90, 60, 10)],
                         ids=["M77-N48-R8-kernelQR", "M100-N90-R60-torchQR"])
def test_tiled_path(monkeypatch, m, n, rank, oversample):
    """The tiled launches (batched products, Cholesky-QR2 in kernel or through torch.linalg)."""
    monkeypatch.setattr(svd, "_FUSED_MAX_ELEMENTS", 0)
    _poisoned_empty(monkeypatch)
    _no_fallback(monkeypatch)
    A64 = _matrix((2,), m, n, _spectrum("fast", min(m, n), rank) ** 0.2, seed=11)
    U, S, Vh = randomized_svd(A64.float(), rank, oversample, generator=_gen(2))
    err, opt = _errors(A64, U, S, Vh), _optimal_error(A64, rank)
    assert (err <= 1.01 * opt).all(), f"error / optimal = {(err / opt).tolist()}"
    _check_orthonormal(U, "U")
    _check_orthonormal(Vh.mT, "V")


def test_fused_writes_everything(monkeypatch):
    _poisoned_empty(monkeypatch)
    _no_fallback(monkeypatch)
    A64 = _matrix((3,), 50, 33, _spectrum("slow", 33, 6), seed=13)
    U, S, Vh = randomized_svd(A64.float(), 6, generator=_gen(3))
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert (_errors(A64, U, S, Vh) <= 1.05 * _optimal_error(A64, 6)).all()


def test_rank_above_numerical_rank_falls_back_to_householder():
    """Exact rank 5, rank 7 asked: Cholesky-QR drops the null columns, Householder QR completes U."""
    spectrum = torch.zeros(48, dtype=torch.float64)
    spectrum[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    A64 = _matrix((2,), 77, 48, spectrum, seed=17)
    U, S, Vh = randomized_svd(A64.float(), 7, generator=_gen(4))
    _check_orthonormal(U, "U")
    torch.testing.assert_close(S[:, :5].double(), spectrum[:5].expand(2, 5), rtol=1e-5, atol=1e-5)
    assert (S[:, 5:] < 1e-5).all()
    assert (_errors(A64, U, S, Vh) <= 1e-5 * torch.linalg.matrix_norm(A64)).all()


def test_low_rank_approx_and_top_left_singular_vectors():
    A64 = _matrix((2,), 40, 24, _spectrum("fast", 24, 4), seed=19)
    A = A64.half()
    A_k = low_rank_approx(A, 4, generator=_gen(8))
    assert A_k.shape == A.shape and A_k.dtype == torch.float16
    U, S, Vh = randomized_svd(A, 4, generator=_gen(8))
    torch.testing.assert_close(A_k, ((U * S[..., None, :]) @ Vh).half())
    assert torch.equal(top_left_singular_vectors(A, 4, generator=_gen(8)), U)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    A = torch.randn(3, 30, 20)
    U, S, Vh = randomized_svd(A, 5, generator=_gen(9))
    Ur, Sr, Vhr = randomized_svd_ref(A, 5, generator=_gen(9))
    assert torch.equal(U, Ur) and torch.equal(S, Sr) and torch.equal(Vh, Vhr)


@pytest.mark.parametrize("args, error, words", [
    ((torch.randn(10, 8), 0), ValueError, ["rank", ">= 1", "0"]),
    ((torch.randn(10, 8), 9), ValueError, ["rank", "min(m, n) = 8", "9"]),
    ((torch.randn(10, 8), 2.0), TypeError, ["rank", "int", "2.0"]),
    ((torch.randn(10, 8), 2, -1), ValueError, ["oversample", ">= 0", "-1"]),
    ((torch.randn(10, 8), 2, 8, -2), ValueError, ["n_iter", ">= 0", "-2"]),
    ((torch.ones(10, 8, dtype=torch.int64), 2), TypeError, ["A", "floating", "torch.int64"]),
    ((torch.randn(10), 2), ValueError, ["A", "(..., m, n)", "(10,)"]),
    (([[1.0, 2.0]], 1), TypeError, ["A", "torch.Tensor", "list"]),
    ((torch.randn(10, 8).index_put_((torch.tensor([3]), torch.tensor([2])), torch.tensor(math.nan)), 2),
     ValueError, ["A", "finite", "NaN"]),
    ((torch.randn(10, 8).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.inf)), 2),
     ValueError, ["A", "finite", "inf"]),
], ids=["rank0", "rank-too-big", "rank-float", "oversample-neg", "n_iter-neg", "int-dtype", "1d", "list",
        "nan", "inf"])
def test_bad_input(args, error, words):
    with pytest.raises(error) as info:
        randomized_svd(*args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_bad_input_names_m_for_top_left_singular_vectors():
    with pytest.raises(TypeError, match="M must have a floating dtype"):
        top_left_singular_vectors(torch.ones(4, 4, dtype=torch.int32), 2)


def test_check_finite_false_skips_only_the_nan_check():
    bad = torch.randn(20, 12)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="M must be finite"):
        top_left_singular_vectors(bad, 3)
    good = torch.randn(20, 12)
    checked = top_left_singular_vectors(good, 3, generator=torch.Generator().manual_seed(0))
    unchecked = top_left_singular_vectors(good, 3, generator=torch.Generator().manual_seed(0), check_finite=False)
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank must be <= min"):
        top_left_singular_vectors(good, 13, check_finite=False)  # every other check stays
