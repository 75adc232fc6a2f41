"""Host time of one attention forward + backward, eager and inside a compiled function.

    python bench/launch_overhead.py [--calls 100] [--rounds 7] [--profile N] [--out PATH.json]

At a shape whose device work is a few microseconds (B 1, T 128, 6 heads, head dim 32, bf16),
back-to-back calls without a synchronization are limited by the host: the median wall time per
call is the host time of launching it. Rows: our flash attention eager (autograd.Function,
direct launches), compiled by Inductor (the triton_op: kernels launched from generated code),
and PyTorch's SDPA eager and compiled, for reference. --profile N prints the N functions with the
most host time (cProfile) over one round of eager calls of ours. Without a GPU it runs the eager rows in float32 on
the CPU, where the time is the computation's: the numbers need a GPU.
"""
import argparse
import json
import statistics
import time

import harness  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F

from mla_kernels.attention import flash_attention

B, T, H, D = 1, 128, 6, 32
WARMUP_CALLS = 10  # untimed calls first: compilation, autotuning, the allocator
UNITS = {"us_per_call": "us"}


def ours(q, k, v):
    return flash_attention(q, k, v)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def host_us_per_call(fn, inputs, grad, calls, rounds):
    """Median over rounds of the wall time per call of `calls` back-to-back forward + backward calls."""
    def call():
        out = fn(*inputs)
        out.backward(grad)

    for _ in range(WARMUP_CALLS):
        call()
    harness.synchronize()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        per_call.append((time.perf_counter() - start) / calls)
        harness.synchronize()
    return statistics.median(per_call) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="back-to-back calls per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions with the most host time in eager calls of ours (cProfile)")
    harness.add_out_argument(parser, "launch_overhead")
    args = parser.parse_args()
    gpu = harness.on_gpu()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    if not gpu:
        print("no GPU: eager rows on the CPU, where the time is the computation's; the numbers need a GPU")
    env = harness.environment(dtype)
    print(json.dumps(env), flush=True)
    torch.manual_seed(0)
    inputs = [torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    grad = torch.randn(B, T, H, D, device=device, dtype=dtype)
    providers = {"flash_attention eager": ours, "sdpa eager": sdpa}
    if gpu:
        providers.update({"flash_attention compiled": torch.compile(ours), "sdpa compiled": torch.compile(sdpa)})
    rows = [dict(provider=name, B=B, T=T, H=H, D=D,
                 us_per_call=host_us_per_call(fn, inputs, grad, args.calls, args.rounds))
            for name, fn in providers.items()]
    if args.profile:
        _, profiler = harness.profiled(host_us_per_call, ours, inputs, grad, args.calls, 1)  # tuned by the rows
        print(f"flash_attention eager, {args.calls + WARMUP_CALLS} calls after the rows', by own host time:\n"
              f"{harness.profile_table(profiler, args.profile)}")
    print(f"host time per forward + backward call, B {B} T {T} H {H} D {D} {env['dtype']}, {env['device']}")
    for row in rows:
        print(f"  {row['provider']:26} {row['us_per_call']:8.1f} us")
    harness.write_results(harness.results_path(args.out, "launch_overhead"),
                          harness.result_rows("launch_overhead", rows, UNITS, env))


if __name__ == "__main__":
    main()
