"""The decode step's latent projection written straight into the cache: bf16 check and speed.

    python bench/append.py [--out bench/results/append_<gpu>.json]

Providers, per decode-step shape (GPT-2-small attention, C 768, nh 12; B rows of one new token):
  fused     mla_kernels.append.project_append: one kernel, x W^T + b, latents stored into the cache
  unfused   F.linear (cuBLAS) then LatentKVCache.update (a copy / index_put kernel), what the model
            ran before
Both are timed replayed from a CUDA graph with the position in a device tensor, as generation runs
them. Bytes: the weight (read once per step) dominates at these batch sizes; GB/s = (weight + x +
outputs) bytes over time. The bf16 check compares the kernel and the bf16 cuBLAS path with the
float64 reference (rows of the cache it should not touch are NaN and must stay NaN).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mla_kernels.append import project_append  # noqa: E402
from mla_kernels.cache import LatentKVCache  # noqa: E402
from mla_kernels.reference import project_append_ref  # noqa: E402

C, NH = 768, 12
MODES = {"default": (12, 32, 32), "joint": (1, 256, 0)}  # name -> (g, r, rv); rv 0 = joint latent
MAX_SEQ = 1024
ELT = 2  # bf16 bytes


def make(B, mode, device, T=1):
    g, r, rv = MODES[mode]
    qd = NH * r
    weight = torch.randn(qd + g * (r + rv), C, device=device, dtype=torch.bfloat16) / C ** 0.5  # (N, C)
    bias = torch.randn(weight.shape[0], device=device, dtype=torch.bfloat16)
    x = torch.randn(B, T, C, device=device, dtype=torch.bfloat16)  # (B, T, C)
    cache = LatentKVCache(B, MAX_SEQ, g, r, rv or None, dtype=torch.bfloat16, device=device)
    return x, weight, bias, qd, cache, (g, r, rv)


def correctness(device):
    rows = []
    for mode in MODES:
        for B, T, pos in [(1, 1, 17), (32, 1, 1000), (7, 5, 300)]:
            x, weight, bias, qd, cache, (g, r, rv) = make(B, mode, device, T)
            cache.k_cache.fill_(float("nan"))
            cache.v_cache.fill_(float("nan"))
            k64, v64 = cache.k_cache.cpu().double(), cache.v_cache.cpu().double()
            q64 = project_append_ref(x.cpu().double(), weight.cpu().double(), bias.cpu().double(), qd, k64, v64, pos)
            q = project_append(x, weight, bias, qd, cache.k_cache, cache.v_cache, torch.tensor(pos, device=device))
            y = F.linear(x, weight, bias)  # the bf16 cuBLAS path, for its own error
            new = slice(pos, pos + T)

            def rel(a, b):
                return ((a.cpu().double() - b).norm() / b.norm()).item()

            err_q, err_k = rel(q, q64), rel(cache.k_cache[:, :, new], k64[:, :, new])
            err_cublas = rel(y[..., :qd], q64)
            untouched = int(cache.k_cache.isnan().sum()) == cache.k_cache.numel() - B * g * T * r
            ok = err_q <= 2 * err_cublas + 1e-3 and err_k <= 2 * err_cublas + 1e-3 and untouched
            if rv:
                ok = ok and rel(cache.v_cache[:, :, new], v64[:, :, new]) <= 2 * err_cublas + 1e-3
            rows.append(dict(case=f"{mode}-B{B}-T{T}-P{pos}", rel_err_q=err_q, rel_err_k=err_k,
                             rel_err_cublas=err_cublas, untouched_slots_nan=untouched, passed=ok))
            print(f"correctness {rows[-1]['case']}: q {err_q:.2e} k {err_k:.2e} (cuBLAS bf16 {err_cublas:.2e}), "
                  f"other slots untouched {untouched} -> {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def timings(device):
    rows = []
    for mode in MODES:
        for B in (1, 32, 64):
            x, weight, bias, qd, cache, (g, r, rv) = make(B, mode, device)
            pos = torch.tensor(MAX_SEQ - 1, device=device)
            nbytes = (weight.numel() + bias.numel() + x.numel() + B * weight.shape[0]) * ELT
            T = 1

            def fused():
                project_append(x, weight, bias, qd, cache.k_cache, cache.v_cache, pos)

            def unfused():
                y = F.linear(x, weight, bias)
                c_k = y[..., qd : qd + g * r].view(B, T, g, r)
                c_v = y[..., qd + g * r :].view(B, T, g, rv) if rv else None
                cache.update(pos, c_k, c_v)

            for name, fn in (("fused", fused), ("unfused", unfused)):
                fn()  # autotune before capture
                us = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
                rows.append(dict(mode=mode, B=B, provider=name, us=us, GBps=nbytes / (us * 1e-6) / 1e9))
                print(f"  {mode:8s} B{B:<3d} {name:8s} {us:7.2f} us  {rows[-1]['GBps']:6.0f} GB/s", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/append_<gpu>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/append.py needs a CUDA GPU; the CPU tests (tests/test_append_kernel.py) check correctness")
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    info = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__)
    print(json.dumps(info), flush=True)
    result = dict(env=info, correctness=correctness(device), timings=timings(device))
    tag = gpu.split()[-1].lower()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"append_{tag}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
