"""The fused residual add + layer norm of generation (mla_kernels.layer_norm) in the Triton CPU
interpreter vs float64, and the model's generation through it against its plain-PyTorch blocks."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, dtype_name

from mla_gpt.model import GPT, GPTConfig, gpt
from mla_kernels import layer_norm
from mla_kernels.layer_norm import add_layer_norm

# (leading dims, C, bias): C off the power-of-two tiles; rows past one interpreter block (64)
CASES = [((3, 1), 77, True), ((2, 5), 48, False), ((70,), 130, True), ((1, 2, 3), 1, True), ((2, 40), 33, False)]
TOLS = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 2e-3)}


def _case_id(c):
    lead, C, bias = c
    return "x".join(map(str, lead)) + f"-C{C}" + ("-bias" if bias else "")


@pytest.fixture
def poison(monkeypatch):
    """Tensors allocated with torch.empty during the test start as NaN (the op's outputs among
    them), so an element the kernel does not write shows."""
    empty = torch.empty
    monkeypatch.setattr(layer_norm.torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def _inputs(lead, C, bias, dtype):
    x = torch.randn(*lead, C, dtype=dtype) * 3 + 1  # (..., C): off-zero mean, as a residual stream
    y = torch.randn(*lead, C, dtype=dtype)
    weight = torch.randn(C, dtype=dtype)
    return x, y, weight, torch.randn(C, dtype=dtype) if bias else None


@pytest.mark.parametrize("dtype", list(TOLS), ids=dtype_name)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sum_and_norm_match_float64(case, dtype, poison):
    """The sum is x + y rounded to the dtype; the norm is float64's layer norm of that sum as stored."""
    lead, C, bias = case
    x, y, weight, b = _inputs(lead, C, bias, dtype)
    total, normed = add_layer_norm(x, y, weight, b)
    assert total.dtype == normed.dtype == dtype and total.shape == normed.shape == x.shape
    atol, rtol = TOLS[dtype]
    assert_close("sum", total, x.double() + y.double(), atol * 4, rtol)
    ref = F.layer_norm(total.double(), (C,), weight.double(), None if b is None else b.double(), 1e-5)
    assert_close("norm", normed, ref, atol, rtol)


def test_rows_are_independent(poison):
    """Changing one row changes that row's outputs only."""
    x, y, weight, b = _inputs((6,), 40, True, torch.float32)
    total, normed = add_layer_norm(x, y, weight, b)
    x[2] += torch.randn(40)
    total2, normed2 = add_layer_norm(x, y, weight, b)
    others = [0, 1, 3, 4, 5]
    assert torch.equal(total2[others], total[others]) and torch.equal(normed2[others], normed[others])
    assert not torch.equal(normed2[2], normed[2])


def test_mixed_dtypes_promote_as_the_plain_ops(poison):
    """A float32 residual plus a float16 output sums in float32, as `x + y`; the norm's dtype is
    `F.layer_norm`'s, inside CPU autocast too (which leaves layer_norm alone)."""
    x, y, weight, b = _inputs((2, 3), 24, True, torch.float32)
    total, normed = add_layer_norm(x, y.half(), weight, b)
    assert total.dtype == normed.dtype == torch.float32
    assert_close("sum", total, x.double() + y.half().double(), 1e-6, 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, normed = add_layer_norm(x.half(), y.half(), weight, b)
        plain = F.layer_norm(x.half() + y.half(), (24,), weight, b)
    assert total.dtype == torch.float16 and normed.dtype == plain.dtype


def test_inputs_that_need_gradients_are_refused():
    x, y, weight, b = _inputs((2, 3), 24, True, torch.float32)
    with pytest.raises(RuntimeError, match="add_layer_norm has no backward"):
        add_layer_norm(x, y, weight.requires_grad_(), b)
    with torch.no_grad():
        add_layer_norm(x, y, weight, b)


def test_float64_runs_the_reference():
    """A model in double gets the reference's float64 sum and norm."""
    x, y, weight, b = _inputs((3, 2), 20, True, torch.float64)
    total, normed = add_layer_norm(x, y, weight, b)
    assert torch.equal(total, x + y)
    assert_close("norm", normed, F.layer_norm(x + y, (20,), weight, b, 1e-5), 1e-12, 1e-12)


def test_non_contiguous_rows(poison):
    """Row-strided inputs (a slice of a wider buffer) read as their values."""
    wide = torch.randn(5, 3, 64)
    x, y = wide[..., :33], wide[..., 31:]  # (5, 3, 33), rows 64 apart
    weight = torch.randn(33)
    total, normed = add_layer_norm(x, y, weight)
    assert_close("sum", total, x.double() + y.double(), 1e-6, 1e-6)
    assert_close("norm", normed, F.layer_norm(total.double(), (33,), weight.double(), None, 1e-5), 2e-6, 2e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(y=torch.randn(2, 4, 9)), "x and y must have one shape"),
    (dict(weight=torch.randn(7)), r"weight must be \(8,\)"),
    (dict(bias=torch.randn(9)), r"bias must be \(8,\)"),
    (dict(x=torch.randint(0, 5, (2, 4, 8), dtype=torch.int32)), "x dtype torch.int32 not supported"),
    (dict(eps=0.0), "eps must be a float > 0, got 0.0"),
    (dict(weight=[1.0] * 8), "weight must be a torch.Tensor"),
])
def test_bad_input_is_named(bad, message):
    args = dict(x=torch.randn(2, 4, 8), y=torch.randn(2, 4, 8), weight=torch.randn(8), bias=None, eps=1e-5)
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=message):
        add_layer_norm(**args)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("use_mla", [False, True], ids=["standard", "mla"])
def test_generation_blocks_equal_the_plain_blocks(use_mla, bias, monkeypatch):
    """A prefill and a decode step over the caches give the logits of the same model whose blocks
    add, then norm, in PyTorch ('sdpa' backend: no fused norms), within float32 rounding; the
    fused model calls the op twice per block and call, the plain one never."""
    calls = []
    monkeypatch.setattr(gpt, "add_layer_norm", lambda *args: calls.append(1) or add_layer_norm(*args))
    torch.manual_seed(0)
    config = dict(block_size=32, vocab_size=50, n_layer=3, n_head=4, n_embd=64, bias=bias, use_mla=use_mla)
    fused = GPT(GPTConfig(**config, attn_backend="triton")).eval()
    plain = GPT(GPTConfig(**config, attn_backend="sdpa")).eval()
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        logits = {}
        for name, model in (("fused", fused), ("plain", plain)):
            caches = model.setup_caches(2, 16, torch.float32)
            prompt_logits, _ = model(idx[:, :8], caches=caches)
            step_logits, _ = model(idx[:, 8:], caches=caches, input_pos=torch.tensor(8, dtype=torch.int32))
            logits[name] = (prompt_logits, step_logits)
            assert len(calls) == (2 * 2 * config["n_layer"] if name == "fused" else 0), name
            calls.clear()
    for what, got, ref in zip(("prefill", "decode step"), logits["fused"], logits["plain"]):
        assert_close(f"{what} logits", got, ref, 1e-4, 1e-4)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_a_cache_per_layer_or_an_error(backend):
    """Fewer caches than layers is refused by name, on the fused path and the plain one alike."""
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=3, n_head=4, n_embd=64, attn_backend=backend)).eval()
    caches = model.setup_caches(1, 8, torch.float32)[:2]
    with torch.no_grad(), pytest.raises(ValueError, match=r"caches must hold one cache per layer \(n_layer=3\), got 2"):
        model(torch.randint(0, 50, (1, 4)), caches=caches)
