"""Under torch.compile, Inductor launches the attention kernels from its own generated code.

    PYTHONPATH=. python -m pytest tests/gpu/test_compiled_launch.py

The ops are `torch.library.triton_op`s: the compiled forward and backward must hold the Triton
kernels themselves, not a call back into the `mla_kernels` op (whose Python launcher costs host
time on every step), and must compute what the eager path computes.
"""
import math

import torch
from torch._inductor.utils import run_and_get_code

from mla_kernels.attention import flash_attention, mla_attention_expanded


def _relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _check_inlined_and_equal(fn, inputs):
    def loss_and_grads(f):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        f(*leaves).backward()
        return [x.grad for x in leaves]

    eager = loss_and_grads(fn)
    torch._dynamo.reset()
    compiled, codes = run_and_get_code(loss_and_grads, torch.compile(fn))
    code = "\n".join(codes)
    assert "torch.ops.mla_kernels" not in code, "the compiled step calls back into the custom op"
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        assert kernel in code, f"{kernel} is not launched from Inductor's code"
    for got, want in zip(compiled, eager):
        assert _relative_error(got, want) < 1e-2


def test_flash_attention_kernels_launch_from_inductor_code():
    torch.manual_seed(0)
    B, T, nh, g, d = 2, 300, 6, 2, 32
    q = torch.randn(B, T, nh, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, g, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, g, d, device="cuda", dtype=torch.bfloat16)
    _check_inlined_and_equal(lambda q, k, v: flash_attention(q, k, v).float().square().mean(), [q, k, v])


def test_expanded_kernels_launch_from_inductor_code():
    torch.manual_seed(1)
    B, T, nh, g, hs, r = 2, 200, 4, 2, 32, 48
    q = torch.randn(B, T, nh, hs, device="cuda", dtype=torch.bfloat16)
    c_k = torch.randn(B, T, g, r, device="cuda", dtype=torch.bfloat16)
    c_v = torch.randn(B, T, g, r, device="cuda", dtype=torch.bfloat16)
    w_uk = torch.randn(nh, r, hs, device="cuda", dtype=torch.bfloat16) / math.sqrt(r)
    w_uv = torch.randn(nh, r, hs, device="cuda", dtype=torch.bfloat16) / math.sqrt(r)
    _check_inlined_and_equal(lambda *a: mla_attention_expanded(*a).float().square().mean(),
                             [q, c_k, c_v, w_uk, w_uv])
