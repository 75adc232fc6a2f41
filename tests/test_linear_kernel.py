"""The decode step's linear layer (mla_kernels.linear) in the Triton CPU interpreter vs float64,
and the model's generation MLP through it against nn.Linear and nn.GELU."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, dtype_name

from mla_gpt.model import GPT, GPTConfig, core
from mla_kernels import linear
from mla_kernels.linear import INTERPRETER_TILE, MAX_ROWS, decode_linear, split_count
from mla_kernels.reference import linear_ref

# (rows as leading dims, K, N, activation, bias): K and N off the interpreter's 32 x 16 tiles;
# some split K over the pretend 8-program GPU (the last one to arrive reduces), some do not
CASES = [((3,), 77, 40, "gelu", True), ((1, 1), 33, 17, None, False), ((4, 5), 130, 50, "gelu_tanh", True),
         ((64,), 96, 33, "gelu", False), ((2, 1), 200, 70, None, True), ((7,), 16, 96, "gelu", True)]
TOLS = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 2e-3)}


def _case_id(c):
    lead, K, N, activation, bias = c
    return "x".join(map(str, lead)) + f"-K{K}-N{N}-{activation or 'linear'}" + ("-bias" if bias else "")


@pytest.fixture
def poison(monkeypatch):
    """Tensors allocated with torch.empty during the test start as NaN (the output and the split
    partial sums among them), so an element the kernel does not write, or a partial the reduce
    reads before it is written, shows."""
    empty = torch.empty
    monkeypatch.setattr(linear.torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


def _inputs(lead, K, N, bias, dtype):
    x = torch.randn(*lead, K, dtype=dtype)  # (..., K)
    weight = torch.randn(N, K, dtype=dtype) / K ** 0.5  # (N, K): outputs of order 1, where GELU bends
    return x, weight, torch.randn(N, dtype=dtype) if bias else None


def _splits(K, N):
    block_n, block_k = INTERPRETER_TILE[:2]
    return split_count(-(-N // block_n), K, block_k, linear.INTERPRETER_PROGRAMS)[0]


def test_the_cases_cover_split_and_whole_k():
    assert {_splits(K, N) > 1 for _, K, N, _, _ in CASES} == {True, False}


@pytest.mark.parametrize("dtype", list(TOLS), ids=dtype_name)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64(case, dtype, poison):
    """act(x W^T + b) equals float64's linear, rounded to the dtype, then float64's activation."""
    lead, K, N, activation, bias = case
    x, weight, b = _inputs(lead, K, N, bias, dtype)
    out = decode_linear(x, weight, b, activation)
    assert out.dtype == dtype and out.shape == (*lead, N)
    ref = linear_ref(x.double(), weight.double(), None if b is None else b.double(), activation)
    atol, rtol = TOLS[dtype]
    assert_close("out", out, ref, atol, rtol)


def test_the_arrival_counters_are_left_at_zero():
    """Each column block's reducer resets its counter: the next launch (a replayed graph's) starts clean."""
    x, weight, b = _inputs((3,), 200, 70, True, torch.float32)
    assert _splits(200, 70) > 1
    first = decode_linear(x, weight, b)
    assert not linear._ARRIVALS[x.device].any()
    assert torch.equal(decode_linear(x, weight, b), first)  # and the same sums, in the same order


def test_rows_are_independent(poison):
    """Changing one row changes that row's outputs only."""
    x, weight, b = _inputs((6,), 77, 40, True, torch.float32)
    out = decode_linear(x, weight, b, "gelu")
    x[2] += 1.0
    out2 = decode_linear(x, weight, b, "gelu")
    others = [0, 1, 3, 4, 5]
    assert torch.equal(out2[others], out[others]) and not torch.equal(out2[2], out[2])


def test_non_contiguous_rows(poison):
    """Row-strided x (a slice of a wider buffer) reads as its values."""
    wide = torch.randn(5, 100)
    x = wide[:, 3:80]  # (5, 77), rows 100 apart
    weight = torch.randn(40, 77) / 77 ** 0.5
    assert_close("out", decode_linear(x, weight), x.double() @ weight.double().T, 2e-6, 2e-6)


def test_autocast_rounds_a_float32_weight_as_autocast_does(poison):
    """Inside autocast x and the float32 weight and bias meet in autocast's dtype, as in F.linear."""
    x, weight, b = _inputs((3,), 77, 40, True, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = decode_linear(x, weight, b, "gelu")
    assert out.dtype == torch.float16
    ref = linear_ref(x.half().double(), weight.half().double(), b.half().double(), "gelu")
    assert_close("out", out, ref, *TOLS[torch.float16])


def test_float64_runs_the_reference():
    x, weight, b = _inputs((3, 2), 20, 24, True, torch.float64)
    out = decode_linear(x, weight, b, "gelu_tanh")
    assert_close("out", out, F.gelu(F.linear(x, weight, b), approximate="tanh"), 1e-12, 1e-12)


def test_inputs_that_need_gradients_are_refused():
    x, weight, b = _inputs((2,), 24, 16, True, torch.float32)
    with pytest.raises(RuntimeError, match="decode_linear has no backward"):
        decode_linear(x, weight.requires_grad_(), b)
    with torch.no_grad():
        decode_linear(x, weight, b)


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(65, 8)), r"x holds 65 rows \(its leading dims \(65,\)\); decode_linear takes 1 to 64"),
    (dict(weight=torch.randn(16, 9)), r"x must be \(..., K\) and weight \(N, K\)"),
    (dict(bias=torch.randn(15)), r"bias must be \(16,\)"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(weight=torch.randn(16, 8).half()), "weight dtype torch.float16 differs from x dtype torch.float32"),
    (dict(x=torch.randint(0, 5, (2, 8), dtype=torch.int32)), "x dtype torch.int32 not supported"),
    (dict(weight=[1.0] * 8), "weight must be a torch.Tensor"),
])
def test_bad_input_is_named(bad, message):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(16, 8), bias=None, activation=None)
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=message):
        decode_linear(**args)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_generation_mlp_equals_the_modules(bias, approximate, monkeypatch):
    """MLP.generation_step on a decode step's rows runs two decode_linear calls (GELU fused into
    the first) and gives the modules' output; a prefill's rows past MAX_ROWS go through forward."""
    calls = []
    monkeypatch.setattr(core, "DECODE_LINEAR_ROWS", MAX_ROWS)
    monkeypatch.setattr("mla_gpt.model.gpt.decode_linear", lambda *a: calls.append(a[-1:]) or decode_linear(*a))
    config = GPTConfig(block_size=128, vocab_size=50, n_layer=1, n_head=4, n_embd=48, bias=bias,
                       gelu_approximate=approximate)
    mlp = GPT(config).transformer.h[0].mlp.eval()
    x = torch.randn(3, 1, 48)  # (B, T, C): a decode step of 3 rows
    with torch.no_grad():
        got, ref = mlp.generation_step(x), mlp(x)
        assert len(calls) == 2 and calls[0] == ("gelu_tanh" if approximate == "tanh" else "gelu",)
        calls.clear()
        long = torch.randn(2, 40, 48)  # 80 rows: a prefill
        assert torch.equal(mlp.generation_step(long), mlp(long)) and not calls
    assert_close("mlp", got, ref, 2e-6, 2e-6)


@pytest.mark.parametrize("joint", [False, True], ids=["g4", "joint-g1"])
def test_generation_on_decode_linear_equals_the_plain_model(joint, monkeypatch):
    """With decode_linear on (core.DECODE_LINEAR_ROWS), an MLA model's prefill and decode step
    give the logits of the same model on the 'sdpa' backend (cuBLAS, no fused ops) within float32
    rounding; each decode step's layer calls it three times (c_fc, c_proj, the output projection)."""
    calls = []
    monkeypatch.setattr(core, "DECODE_LINEAR_ROWS", MAX_ROWS)
    for module in ("gpt", "attention"):
        monkeypatch.setattr(f"mla_gpt.model.{module}.decode_linear",
                            lambda *a: calls.append(1) or decode_linear(*a))
    torch.manual_seed(0)
    config = dict(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64, bias=True, use_mla=True,
                  **(dict(mla_kv_groups=1, mla_latent_dim=32, mla_joint_kv=True) if joint else {}))
    fused = GPT(GPTConfig(**config, attn_backend="triton")).eval()
    plain = GPT(GPTConfig(**config, attn_backend="sdpa")).eval()
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50, (3, 9))
    logits = {}
    with torch.no_grad():
        for name, model in (("fused", fused), ("plain", plain)):
            caches = model.setup_caches(3, 16, torch.float32)
            model(idx[:, :8], caches=caches)
            calls.clear()
            logits[name] = model(idx[:, 8:], caches=caches, input_pos=torch.tensor(8, dtype=torch.int32))[0]
            assert len(calls) == (3 * config["n_layer"] if name == "fused" else 0), name
    assert_close("decode step logits", logits["fused"], logits["plain"], 1e-4, 1e-4)
