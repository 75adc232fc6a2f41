"""bf16 accuracy of the decode step's linear layer (`mla_kernels.linear.decode_linear`) on the GPU.

    PYTHONPATH=. python -m pytest tests/gpu/test_linear_bf16.py

Compared with float64's linear and GELU, within flash-attention's criterion (tests/helpers.py)
of PyTorch's own bf16 path, F.linear then F.gelu (cuBLAS), the pair it replaces. The shapes are
the generation step's: GPT-2 small's MLP (split K on c_proj), MLA's composed output projection,
rows from 1 to MAX_ROWS; then graphed generation on it against cuBLAS. Outputs and split partials
start as NaN (the op's allocations are poisoned), so an unwritten element or a partial read before
it is written fails.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import ERR_FLOOR, assert_within_torch_error

from mla_kernels import linear
from mla_kernels.linear import MAX_ROWS, decode_linear

DEVICE = "cuda"
LOW = torch.bfloat16

# (rows, K, N, activation, bias)
CASES = [
    (32, 768, 3072, "gelu", False),  # c_fc of GPT-2 small at B 32 (nanoGPT's bias=False)
    (32, 3072, 768, None, False),  # its c_proj: K split
    (1, 768, 3072, "gelu_tanh", True),  # B 1, GPT-2's own GELU
    (MAX_ROWS, 3072, 768, None, True),
    (7, 384, 768, None, True),  # MLA r 32's composed output projection (nh r -> C)
    (5, 1000, 1031, "gelu", True),  # N and K off the tiles
]


def _case_id(c):
    M, K, N, activation, bias = c
    return f"M{M}-K{K}-N{N}-{activation or 'linear'}" + ("-bias" if bias else "")


@pytest.fixture
def poison(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(linear.torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bf16_within_torch_error(case, poison):
    M, K, N, activation, bias = case
    x = torch.randn(M, K, device=DEVICE, dtype=LOW)
    weight = torch.randn(N, K, device=DEVICE, dtype=LOW) / K ** 0.5
    b = torch.randn(N, device=DEVICE, dtype=LOW) if bias else None
    approximate = "tanh" if activation == "gelu_tanh" else "none"

    def act(y):
        return y if activation is None else F.gelu(y, approximate=approximate)

    out = decode_linear(x, weight, b, activation)
    ref = act(F.linear(x.double(), weight.double(), None if b is None else b.double()))
    torch_low = act(F.linear(x, weight, b))
    assert_within_torch_error({"out": (out, ref, torch_low, ERR_FLOOR[LOW])})
    assert not linear._ARRIVALS.get(x.device, torch.zeros(1, device=DEVICE)).any()


def test_autocast_float32_weights():
    """A float32 weight inside bf16 autocast: rounded in the kernel as autocast rounds it for F.linear."""
    x = torch.randn(32, 768, device=DEVICE)
    weight = torch.randn(3072, 768, device=DEVICE) / 768 ** 0.5
    b = torch.randn(3072, device=DEVICE)
    with torch.autocast("cuda", dtype=LOW):
        out = decode_linear(x, weight, b, "gelu")
        torch_low = F.gelu(F.linear(x, weight, b))
    ref = F.gelu(F.linear(x.to(LOW).double(), weight.to(LOW).double(), b.to(LOW).double()))
    assert out.dtype == LOW
    assert_within_torch_error({"out": (out, ref, torch_low, ERR_FLOOR[LOW])})


def test_graph_replays_give_the_eager_result():
    """Replayed from a CUDA graph, the split launch (its arrival counters reset by each reducer)
    gives the eager call's output bit for bit, replay after replay."""
    x = torch.randn(32, 3072, device=DEVICE, dtype=LOW)
    weight = torch.randn(768, 3072, device=DEVICE, dtype=LOW) / 3072 ** 0.5
    eager = decode_linear(x, weight)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_linear(x, weight)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.parametrize("variant", ["standard-kernels", "mla-kernels", "mla-g1-joint-kernels"])
def test_generation_on_decode_linear_equals_cublas(variant, monkeypatch):
    """Graphed greedy generation (float32 weights) with a decode step's linear layers on
    decode_linear gives cuBLAS's tokens."""
    from helpers import SMALL_GPT, SMALL_GPT_VARIANTS

    from mla_gpt.model import GPT, GPTConfig, core

    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL_GPT, **SMALL_GPT_VARIANTS[variant])).to(DEVICE).eval()
    prompt = torch.randint(0, SMALL_GPT["vocab_size"], (5, 9), device=DEVICE)
    new = SMALL_GPT["block_size"] - 9
    tokens = {}
    for rows in (0, MAX_ROWS):
        monkeypatch.setattr(core, "DECODE_LINEAR_ROWS", rows)
        tokens[rows] = model.generate(prompt, new, temperature=0, cuda_graph=True)
    assert torch.equal(tokens[MAX_ROWS], tokens[0]), f"{tokens[MAX_ROWS].tolist()} vs {tokens[0].tolist()}"
