"""Host time of one attention forward + backward, eager and inside a compiled function.

    PYTHONPATH=. python bench/launch_overhead.py

At a shape whose device work is a few microseconds (B 1, T 128, 6 heads, head dim 32, bf16),
back-to-back calls without a synchronization are limited by the host: the median wall time per
call is the host time of launching it. Rows: our flash attention eager (autograd.Function,
direct launches), compiled by Inductor (the triton_op: kernels launched from generated code),
and PyTorch's SDPA compiled, for reference. Needs a GPU.
"""
import statistics
import time

import torch
import torch.nn.functional as F

from mla_kernels.attention import flash_attention

B, T, H, D = 1, 128, 6, 32
CALLS, ROUNDS = 100, 7


def ours(q, k, v):
    return flash_attention(q, k, v)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def host_us_per_call(fn, inputs, grad):
    def call():
        out = fn(*inputs)
        out.backward(grad)

    for _ in range(10):
        call()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        rounds.append((time.perf_counter() - start) / CALLS)
        torch.cuda.synchronize()
    return statistics.median(rounds) * 1e6


def main():
    torch.manual_seed(0)
    inputs = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    rows = {
        "flash_attention eager": host_us_per_call(ours, inputs, grad),
        "flash_attention compiled": host_us_per_call(torch.compile(ours), inputs, grad),
        "sdpa compiled": host_us_per_call(torch.compile(sdpa), inputs, grad),
    }
    print(f"host time per forward + backward call, B {B} T {T} H {H} D {D} bf16, {torch.cuda.get_device_name()}")
    for name, us in rows.items():
        print(f"  {name:26} {us:8.1f} us")


if __name__ == "__main__":
    main()
