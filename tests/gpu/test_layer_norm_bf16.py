"""bf16 accuracy of the fused residual add + layer norm (generation's) on the GPU.

    PYTHONPATH=. python -m pytest tests/gpu/test_layer_norm_bf16.py

`mla_kernels.layer_norm.add_layer_norm(x, y, w, b)` returns (x + y, layer_norm(x + y)). The sum
must equal PyTorch's bf16 `x + y` bit for bit (both round the float32 sum once); the norm is
compared with the float64 layer norm of the float64 sum, within flash-attention's criterion
(tests/helpers.py) of PyTorch's own bf16 path, `F.layer_norm(x + y)`, the unfused pair it
replaces. Outputs start as NaN (the op's allocations are poisoned), so an unwritten element fails.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import ERR_FLOOR, assert_within_torch_error

from mla_kernels import layer_norm
from mla_kernels.layer_norm import add_layer_norm

DEVICE = "cuda"
LOW = torch.bfloat16
ROWS_PAST_2_31 = 2**31 // 768 + 3  # (rows, 768) bf16 tensors whose last rows sit past int32 offsets

# (leading dims, C, bias)
CASES = [
    ((32, 1), 768, False),  # a decode step of GPT-2 small, B 32 (nanoGPT's bias=False)
    ((1, 1), 768, True),
    ((2, 1031), 768, True),  # a prefill
    ((5, 3), 1000, True),  # C off the power-of-two tile
    ((4, 2), 4096, False),
    ((3,), 16384, True),  # MAX_WIDTH
]


def _case_id(c):
    lead, C, bias = c
    return "x".join(map(str, lead)) + f"-C{C}" + ("-bias" if bias else "")


@pytest.fixture
def poison(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(layer_norm.torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bf16_sum_exact_norm_within_torch_error(case, poison):
    lead, C, bias = case
    x = torch.randn(*lead, C, device=DEVICE, dtype=LOW) * 4 + 1  # (..., C): a residual stream, off-zero mean
    y = torch.randn(*lead, C, device=DEVICE, dtype=LOW)
    weight = torch.randn(C, device=DEVICE, dtype=LOW)
    b = torch.randn(C, device=DEVICE, dtype=LOW) if bias else None
    total, normed = add_layer_norm(x, y, weight, b)
    assert torch.equal(total, x + y)
    ref = F.layer_norm(x.double() + y.double(), (C,), weight.double(), None if b is None else b.double(), 1e-5)
    torch_low = F.layer_norm(x + y, (C,), weight, b, 1e-5)
    assert_within_torch_error({"norm": (normed, ref, torch_low, ERR_FLOOR[LOW])})


def test_rows_past_2_31_elements(poison):
    """Rows whose offsets pass int32 (the kernel's row offsets are int64): the last rows are right."""
    C = 768
    x = torch.randn(ROWS_PAST_2_31, C, device=DEVICE, dtype=LOW)  # 2^31 elements, 4.3 GB
    y = torch.randn(ROWS_PAST_2_31, C, device=DEVICE, dtype=LOW)
    weight = torch.randn(C, device=DEVICE, dtype=LOW)
    total, normed = add_layer_norm(x, y, weight)
    tail_x, tail_y = x[-4:], y[-4:]
    assert torch.equal(total[-4:], tail_x + tail_y)
    ref = F.layer_norm(tail_x.double() + tail_y.double(), (C,), weight.double(), None, 1e-5)
    assert_within_torch_error({"norm": (normed[-4:], ref, F.layer_norm(tail_x + tail_y, (C,), weight, None, 1e-5),
                                        ERR_FLOOR[LOW])})
