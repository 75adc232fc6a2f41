"""Triton attention kernels against the float64 reference, run by the Triton interpreter on CPU.

The interpreter's tl.dot is wrong on bfloat16, so these tests use float32 and float16;
bfloat16 is checked on the GPU by tests/gpu/test_attention_bf16.py. The shape cases are a
pairwise cover of B {1, 2} x T {1, 17, 64, 77, 130} x (nh, g) {(4, 4), (6, 2), (4, 1)} x
head dims {16, 24, 32, 48, 64} x cached keys before the queries {0, > 0} x dtype, not the
full product, so the file stays within a few minutes on 2 cores.
"""
import pytest
import torch
from helpers import assert_close, dtype_name

from mla_kernels import reference
from mla_kernels.attention import flash_attention, launch, mla_attention_expanded, op

# (dtype, atol, rtol): float32 runs exact products in the interpreter; float16 rounds the
# inputs, the probabilities and (fused path) the expanded K / V tiles to 11 bits.
F32 = (torch.float32, 2e-4, 2e-4)
F16 = (torch.float16, 1.5e-2, 1.5e-2)

# (B, Tq, nh, g, Dqk, Dv, cached keys before the queries, explicit q_offset or None, dtype spec)
CORE_CASES = [
    (1, 1, 4, 4, 16, 16, 0, None, F32),
    (2, 17, 6, 2, 24, 24, 0, None, F16),
    (1, 64, 4, 1, 32, 32, 0, None, F32),
    (2, 77, 4, 4, 48, 48, 19, None, F32),
    (1, 130, 6, 2, 64, 64, 0, None, F16),
    (2, 130, 4, 1, 16, 16, 7, None, F32),
    (1, 77, 4, 1, 24, 24, 33, None, F16),
    (2, 64, 6, 2, 48, 48, 0, None, F16),
    (1, 17, 4, 4, 64, 64, 40, None, F32),
    (2, 1, 6, 2, 32, 32, 25, None, F16),
    (1, 64, 4, 4, 32, 48, 0, None, F32),  # separate K / V latent widths
    (2, 17, 4, 1, 24, 64, 30, 11, F32),  # explicit offset: a chunk in the middle of the keys
    (1, 77, 6, 2, 64, 16, 17, 0, F16),  # top-left aligned although Tk > Tq
    (2, 33, 4, 2, 8, 12, 0, None, F32),  # head dims narrower than a tile: padded to 16 and masked
]


def _case_id(case):
    B, T, nh, g, dqk, dv, extra, off, (dtype, _, _) = case
    dims = f"D{dqk}" if dqk == dv else f"D{dqk}-Dv{dv}"
    offset = "" if off is None else f"-off{off}"
    return f"B{B}-T{T}-H{nh}-G{g}-{dims}-kv{T + extra}{offset}-{dtype_name(dtype)}"


@pytest.fixture
def poison(monkeypatch):
    """Fill every tensor the launchers allocate with NaN, so an unwritten element shows."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(launch.torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(launch.torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _check_grads(names, inputs, inputs64, atol, rtol):
    for name, x, x64 in zip(names, inputs, inputs64):
        assert_close(f"d{name}", x.grad, x64.grad, atol, rtol)


@pytest.mark.parametrize("case", CORE_CASES, ids=_case_id)
def test_flash_attention_matches_reference(case, poison):
    B, Tq, nh, g, dqk, dv, extra, q_offset, (dtype, atol, rtol) = case
    Tk = Tq + extra
    q = _leaf((B, Tq, nh, dqk), dtype)
    k = _leaf((B, Tk, g, dqk), dtype)
    v = _leaf((B, Tk, g, dv), dtype)
    out, lse = flash_attention(q, k, v, q_offset=q_offset, return_lse=True)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) * 0.1  # lse is differentiable too
    ((out * dout).sum() + (lse * dlse).sum()).backward()

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64, lse64 = reference.attention_ref(q64, k64, v64, q_offset=q_offset)
    ((out64 * dout.double()).sum() + (lse64 * dlse.double()).sum()).backward()

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (B, Tq, nh, dv) and lse.shape == (B, nh, Tq)
    assert_close("out", out, out64, atol, rtol)
    assert_close("lse", lse, lse64, atol, rtol)
    _check_grads("qkv", (q, k, v), (q64, k64, v64), atol, rtol)


def test_explicit_scale_matches_reference(poison):
    q = _leaf((1, 33, 4, 32), torch.float32)
    k, v = _leaf((1, 33, 2, 32), torch.float32), _leaf((1, 33, 2, 32), torch.float32)
    out = flash_attention(q, k, v, softmax_scale=0.3)
    ref, _ = reference.attention_ref(q.double(), k.double(), v.double(), softmax_scale=0.3)
    assert_close("out", out, ref, *F32[1:])


# (B, Tq, Tk, nh, g, Dqk, Dv, splits): one latent group with six heads, and two groups of four
# heads with cached keys before the queries and unequal head dims
SPLIT_CASES = [(2, 77, 77, 6, 1, 32, 32, s) for s in (1, 2, 3, 6)] + [(2, 33, 50, 8, 2, 24, 16, s) for s in (1, 2, 4)]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}-Tq{}-Tk{}-H{}-G{}-D{}-Dv{}-S{}".format(*c))
def test_dkdv_head_splits_agree(case, poison, monkeypatch):
    """The dK/dV backward gives the reference's gradients whether one program sums a group's query
    heads or several programs sum parts of them into float32 partials."""
    B, Tq, Tk, nh, g, dqk, dv, splits = case
    monkeypatch.setattr(launch, "dkdv_head_splits", lambda programs, rep, sms, query_blocks: splits)
    q = _leaf((B, Tq, nh, dqk), torch.float32)
    k, v = _leaf((B, Tk, g, dqk), torch.float32), _leaf((B, Tk, g, dv), torch.float32)
    dout = torch.randn(B, Tq, nh, dv)
    (flash_attention(q, k, v) * dout).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    (reference.attention_ref(q64, k64, v64)[0] * dout.double()).sum().backward()
    _check_grads("qkv", (q, k, v), (q64, k64, v64), *F32[1:])


@pytest.mark.parametrize("programs, rep, query_blocks, splits", [
    (256, 12, 16, 2),  # GPT-2 small's MLA core at T 1024, B 16: 256 key-block programs, 12 heads per latent
    (256, 12, 128, 2),  # T 8192, B 2: the same count of programs, each longer
    (256, 6, 4, 1),  # the char config's core at T 256, B 64: too short to gain from splitting
    (100, 12, 16, 3),  # fewer programs: three heads' partials each reach 300 >= 2 x 132
    (264, 12, 16, 1),  # enough programs without splitting
    (256, 1, 16, 1),  # one query head per KV head (standard attention): nothing to split
    (16, 5, 64, 5),  # no divisor of rep reaches the target: one program per head
])
def test_dkdv_head_splits_fill_the_multiprocessors(programs, rep, query_blocks, splits):
    assert launch.dkdv_head_splits(programs, rep, 132, query_blocks) == splits


def test_causality(poison):
    """Perturbing keys / values after position t leaves outputs and gradients before t unchanged."""
    B, T, nh, g, d, t = 2, 77, 6, 2, 48, 40
    q, k, v = (torch.randn(B, T, h, d) for h in (nh, g, g))
    dout = torch.randn(B, T, nh, d)
    dout[:, t:] = 0  # the loss reads the past queries only

    def run(k, v):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = flash_attention(qs, ks, vs)
        (out * dout).sum().backward()
        return out.detach(), qs.grad, ks.grad, vs.grad

    k2, v2 = k.clone(), v.clone()
    k2[:, t:] += 3 * torch.randn_like(k2[:, t:])
    v2[:, t:] += 3 * torch.randn_like(v2[:, t:])
    base, moved = run(k, v), run(k2, v2)
    for name, a, b in zip(("out", "dq"), base[:2], moved[:2]):
        assert torch.equal(a[:, :t], b[:, :t]), f"{name} before t={t} changed"
    for name, a, b in zip(("dk", "dv"), base[2:], moved[2:]):
        assert torch.equal(a[:, :t], b[:, :t]), f"{name} before t={t} changed"
        assert torch.all(b[:, t:] == 0), f"{name} after t={t} should get no gradient"
    assert not torch.equal(base[0][:, t:], moved[0][:, t:])


# (B, T, nh, g, hs, r, rv or None for a joint latent, dtype spec)
EXPANDED_CASES = [
    (2, 77, 4, 2, 32, 96, 48, F32),
    (1, 130, 4, 4, 16, 48, 24, F32),
    (1, 40, 6, 1, 32, 96, None, F16),
    (2, 17, 4, 4, 24, 64, 64, F16),
]


def _expanded_id(case):
    B, T, nh, g, hs, r, rv, (dtype, _, _) = case
    latent = f"r{r}-joint" if rv is None else f"r{r}-rv{rv}"
    return f"B{B}-T{T}-H{nh}-G{g}-D{hs}-{latent}-{dtype_name(dtype)}"


@pytest.mark.parametrize("case", EXPANDED_CASES, ids=_expanded_id)
def test_mla_attention_expanded_matches_reference(case, poison):
    B, T, nh, g, hs, r, rv, (dtype, atol, rtol) = case
    q = _leaf((B, T, nh, hs), dtype)
    c_k = _leaf((B, T, g, r), dtype)
    c_v = c_k if rv is None else _leaf((B, T, g, rv), dtype)
    w_uk = _leaf((nh, r, hs), dtype, r ** -0.5)
    w_uv = _leaf((nh, c_v.shape[-1], hs), dtype, r ** -0.5)
    out = mla_attention_expanded(q, c_k, c_v, w_uk, w_uv)
    dout = torch.randn_like(out)
    (out * dout).sum().backward()

    leaves = (q, c_k, w_uk, w_uv) if rv is None else (q, c_k, c_v, w_uk, w_uv)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    args64 = leaves64[:2] + leaves64[1:] if rv is None else leaves64
    out64, _ = reference.mla_attention_expanded_ref(*args64)
    (out64 * dout.double()).sum().backward()

    assert out.shape == (B, T, nh, hs) and out.dtype == dtype
    assert_close("out", out, out64, atol, rtol)
    names = ("q", "c_k", "w_uk", "w_uv") if rv is None else ("q", "c_k", "c_v", "w_uk", "w_uv")
    _check_grads(names, leaves, leaves64, atol, rtol)


def test_expansion_too_wide_for_shared_memory_runs_in_device_memory(poison, monkeypatch):
    """Expansion weights wider than the kernel keeps on chip (there hs 256 with r 256 in bf16; here
    every width, the limit set to 0): K / V are built in memory and the core kernel runs on them,
    with the reference's output and gradients (B2-T19-H4-G2-hs16-r24-rv8)."""
    monkeypatch.setattr(op, "MAX_RESIDENT_WEIGHT_BYTES", 0)
    monkeypatch.setattr(op, "_mla_expanded_eager", lambda *args: pytest.fail("the fused kernel ran"))
    q, c_k, c_v = (_leaf(shape, torch.float32) for shape in ((2, 19, 4, 16), (2, 19, 2, 24), (2, 19, 2, 8)))
    w_uk, w_uv = _leaf((4, 24, 16), torch.float32, 24 ** -0.5), _leaf((4, 8, 16), torch.float32, 8 ** -0.5)
    leaves = (q, c_k, c_v, w_uk, w_uv)
    out = mla_attention_expanded(*leaves)
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    out64, _ = reference.mla_attention_expanded_ref(*leaves64)
    (out64 * dout.double()).sum().backward()
    assert_close("out", out, out64, *F32[1:])
    _check_grads(("q", "c_k", "c_v", "w_uk", "w_uv"), leaves, leaves64, *F32[1:])


def test_float64_falls_back_to_reference():
    q, k, v = (torch.randn(1, 9, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = flash_attention(q, k, v, return_lse=True)
    ref, ref_lse = reference.attention_ref(q, k, v)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out.sum().backward()
    assert q.grad is not None


def test_custom_ops_pass_opcheck():
    q, k, v = torch.randn(1, 20, 4, 16), torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16)
    torch.library.opcheck(torch.ops.mla_kernels.flash_attention_fwd, (q, k, v, 0.25, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    w = torch.randn(4, 16, 16) * 0.25
    torch.library.opcheck(torch.ops.mla_kernels.mla_attention_expanded_fwd, (q, k, v, w, w, 0.25, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("splits", [1, 2], ids=["one-program", "split-heads"])
def test_backward_op_gradients_keep_the_inputs_layouts(splits, monkeypatch):
    """The backward op's dk / dv have k's and v's strides, as its fake says, whether the dK/dV
    kernel writes them directly or sums split partials into them (k / v here (B, g, T, D) transposed)."""
    monkeypatch.setattr(launch, "dkdv_head_splits", lambda programs, rep, sms, query_blocks: splits)
    q = torch.randn(1, 20, 4, 16)
    k, v = (torch.randn(1, 2, 20, 16).transpose(1, 2) for _ in range(2))  # (B, T, g, D), not contiguous
    out, lse = torch.ops.mla_kernels.flash_attention_fwd(q, k, v, 0.25, 0)
    args = (torch.randn_like(out), None, q, k, v, out, lse, 0.25, 0)
    torch.library.opcheck(torch.ops.mla_kernels.flash_attention_bwd, args,
                          test_utils=("test_schema", "test_faketensor"))
    _, dk, dv = torch.ops.mla_kernels.flash_attention_bwd(*args)
    assert dk.stride() == k.stride() and dv.stride() == v.stride()


def test_compiles_without_graph_break():
    def f(q, k, v, c, w):
        return flash_attention(q, k, v).sum() + mla_attention_expanded(q, c, c, w, w).sum()

    leaves = [torch.randn(1, 24, 4, 16) for _ in range(3)] + [torch.randn(1, 24, 2, 32), torch.randn(4, 32, 16) * 0.2]
    grads = {}
    # the compiled graph runs the custom ops; eager calls run their autograd.Function twins
    for name, fn in (("compiled", torch.compile(f, backend="aot_eager", fullgraph=True)), ("eager", f)):
        inputs = [x.clone().requires_grad_() for x in leaves]
        loss = fn(*inputs)
        loss.backward()
        assert torch.isfinite(loss)
        grads[name] = [x.grad for x in inputs]
    for got, want in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(q=(1, 8, 6, 16), k=(1, 8, 4, 16)), ValueError, "multiple of KV heads"),
    (dict(q=(1, 8, 4, 0), k=(1, 8, 4, 0)), ValueError, "head dim must be in"),
    (dict(q=(1, 8, 4, 300), k=(1, 8, 4, 300)), ValueError, "head dim must be in"),
    (dict(q=(1, 8, 4, 16), k=(1, 8, 4, 32)), ValueError, "k head dim"),
    (dict(q=(1, 9, 4, 16), k=(1, 8, 4, 16)), ValueError, "q_offset must be >= 0"),
    (dict(q=(1, 8, 16), k=(1, 8, 4, 16)), ValueError, "q must have 4 dims"),
], ids=["heads", "dim0", "dim300", "dk-mismatch", "Tq>Tk", "ndim"])
def test_flash_attention_rejects_bad_input(kwargs, error, match):
    q, k = torch.randn(kwargs["q"]), torch.randn(kwargs["k"])
    with pytest.raises(error, match=match):
        flash_attention(q, k, k)


def test_rejects_wrong_types():
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        flash_attention(q, "k", q)
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="q_offset"):
        flash_attention(q, q, q, q_offset=1.5)
    with pytest.raises(ValueError, match="w_uk must have shape"):
        mla_attention_expanded(q, q, q, torch.randn(4, 16, 8), torch.randn(4, 16, 16))
