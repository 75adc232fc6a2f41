"""The decode step's latent projection written straight into the cache: bf16 check and speed.

    python bench/append.py [--batch_sizes 1 32 64] [--out PATH.json]
    python bench/append.py --tiles [--batch_sizes 1 32] [--out PATH.json]

Providers, per decode-step shape (GPT-2-small attention, C 768, nh 12; B rows of one new token):
  fused     mla_kernels.append.project_append: one kernel, x W^T + b, latents stored into the cache
  unfused   F.linear (cuBLAS) then LatentKVCache.update (a copy / index_put kernel), what the model
            ran before
On a GPU both are timed replayed from a CUDA graph with the position in a device tensor, as
generation runs them. Bytes: the weight (read once per step) dominates at these batch sizes; GB/s =
(weight + x + outputs) bytes over time. The check compares the kernel and the cuBLAS path with the
float64 reference (rows of the cache it should not touch are NaN and must stay NaN). Rows (key
`table`): correctness, timing. Without a GPU it runs in float32 (the kernel through Triton's
interpreter when TRITON_INTERPRET=1, else its reference) at B 1: the timings need a GPU.

--tiles (GPU only): every tile candidate of TILE_CANDIDATES launched directly, against the
op as it runs (`ours`: its decode tile) and cuBLAS, for each mode (and the default's fp8 cache) and batch size, with the
weights cold as in a model's step: each timed graph runs the op over ROTATION_BYTES of weight
copies, more than the L2 holds, so every launch reads its weight from HBM (rows: table `tiles`).
"""
import argparse
import json

import harness  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F

from mla_kernels import append as append_kernels
from mla_kernels.append import project_append
from mla_kernels.cache import LatentKVCache
from mla_kernels.reference import project_append_ref

C, NH = 768, 12
MODES = {"default": (12, 32, 32), "joint": (1, 256, 0)}  # name -> (g, r, rv); rv 0 = joint latent
MAX_SEQ = 1024
CHECK_CASES = [(1, 1, 17), (32, 1, 1000), (7, 5, 300)]  # (B, new tokens T, cache position)
GPU_BATCH_SIZES, CPU_BATCH_SIZES = [1, 32, 64], [1]
ERR_FACTOR, ERR_FLOOR = 2, 1e-3  # pass: error <= 2x the cuBLAS path's own + 1e-3 (flash-attention's rule)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the sweep launches; an fp8 cache takes those whose
# BLOCK_N holds whole groups of r columns
TILE_CANDIDATES = [(bm, bn, bk, w, s) for bm in (16, 32) for bn in (16, 32, 64, 128) for bk in (64, 128, 256)
                   for w, s in ((2, 3), (4, 3), (4, 4))]
ROTATION_BYTES = 160 * 2**20  # weight copies per timed graph: over 3x the H200's 50 MB L2
TILE_REP_MS = 20  # do_bench_cudagraph's budget per candidate
UNITS = {"rel_err_q": "", "rel_err_k": "", "rel_err_cublas": "", "untouched_slots_nan": "", "passed": "",
         "us": "us", "GBps": "GB/s"}


def make(B, mode, device, dtype, T=1):
    """Inputs of one projection + append: x, weight, bias, query width, an empty cache, (g, r, rv)."""
    g, r, rv = MODES[mode]
    qd = NH * r
    weight = torch.randn(qd + g * (r + rv), C, device=device, dtype=dtype) / C ** 0.5  # (N, C)
    bias = torch.randn(weight.shape[0], device=device, dtype=dtype)
    x = torch.randn(B, T, C, device=device, dtype=dtype)  # (B, T, C)
    cache = LatentKVCache(B, MAX_SEQ, g, r, rv or None, dtype=dtype, device=device)
    return x, weight, bias, qd, cache, (g, r, rv)


def rel(a, b):
    """||a - b|| / ||b|| with b the float64 reference, on the CPU."""
    return ((a.cpu().double() - b).norm() / b.norm()).item()


def correctness(device, dtype):
    """Kernel and cuBLAS path (same dtype) against float64; cache slots outside the new tokens untouched."""
    rows = []
    for mode in MODES:
        for B, T, pos in CHECK_CASES:
            x, weight, bias, qd, cache, (g, r, rv) = make(B, mode, device, dtype, T)
            cache.k_cache.fill_(float("nan"))
            cache.v_cache.fill_(float("nan"))
            k64, v64 = cache.k.cpu().double(), cache.v.cpu().double()  # (B, max_seq, g, dim) views
            q64 = project_append_ref(x.cpu().double(), weight.cpu().double(), bias.cpu().double(), qd, k64, v64, pos)
            q = project_append(x, weight, bias, qd, cache.k, cache.v, torch.tensor(pos, device=device))
            y = F.linear(x, weight, bias)  # the cuBLAS path in the same dtype, for its own error
            new = slice(pos, pos + T)
            err_q, err_k = rel(q, q64), rel(cache.k[:, new], k64[:, new])
            err_cublas = rel(y[..., :qd], q64)
            allowed = ERR_FACTOR * err_cublas + ERR_FLOOR
            untouched = int(cache.k_cache.isnan().sum()) == cache.k_cache.numel() - B * g * T * r
            ok = err_q <= allowed and err_k <= allowed and untouched
            if rv:
                ok = ok and rel(cache.v[:, new], v64[:, new]) <= allowed
            rows.append(dict(table="correctness", provider="fused", case=f"{mode}-B{B}-T{T}-P{pos}", rel_err_q=err_q,
                             rel_err_k=err_k, rel_err_cublas=err_cublas, untouched_slots_nan=untouched, passed=ok))
            print(f"correctness {rows[-1]['case']}: q {err_q:.2e} k {err_k:.2e} (cuBLAS {err_cublas:.2e}), "
                  f"other slots untouched {untouched} -> {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def timings(device, dtype, batch_sizes):
    """Fused against unfused per mode and batch size (graph replay on a GPU)."""
    rows = []
    for mode in MODES:
        for B in batch_sizes:
            x, weight, bias, qd, cache, (g, r, rv) = make(B, mode, device, dtype)
            pos = torch.tensor(MAX_SEQ - 1, device=device)
            nbytes = (weight.numel() + bias.numel() + x.numel() + B * weight.shape[0]) * weight.element_size()
            T = 1

            def fused():
                project_append(x, weight, bias, qd, cache.k, cache.v, pos)

            def unfused():
                y = F.linear(x, weight, bias)
                c_k = y[..., qd : qd + g * r].view(B, T, g, r)
                c_v = y[..., qd + g * r :].view(B, T, g, rv) if rv else None
                cache.update(pos, c_k, c_v)

            for name, fn in (("fused", fused), ("unfused", unfused)):
                fn()  # autotune before capture
                us = harness.median_ms(fn, graph=harness.on_gpu()) * 1e3
                rows.append(dict(table="timing", mode=mode, B=B, provider=name, us=us,
                                 GBps=nbytes / (us * 1e-6) / 1e9))
                print(f"  {mode:8s} B{B:<3d} {name:8s} {us:7.2f} us  {rows[-1]['GBps']:6.0f} GB/s", flush=True)
    return rows


def tile_sweep(device, dtype, batch_sizes):
    """Each tile candidate's microseconds per launch with cold weights, beside the op as it runs
    and cuBLAS (F.linear alone, no cache write), per mode and batch size."""
    import triton

    rows = []
    for mode, fp8 in (("default", False), ("default", True), ("joint", False)):
        for B in batch_sizes:
            x, weight, _, qd, _, (g, r, rv) = make(B, mode, device, dtype)
            cache = LatentKVCache(B, MAX_SEQ, g, r, rv or None, dtype=torch.float8_e4m3fn if fp8 else dtype,
                                  device=device)
            copies = [weight.clone() for _ in range(max(2, ROTATION_BYTES // (weight.numel() * weight.element_size())))]
            pos = torch.full((B,), MAX_SEQ - 1, dtype=torch.int32, device=device)
            cache_args = (cache.k, cache.v, pos, cache.k_scales, cache.v_scales)
            name = f"{mode}{'-fp8' if fp8 else ''}"

            def per_launch_us(launch):
                launch(copies[0])  # compile before capture

                def rotation():
                    for w in copies:
                        launch(w)
                return harness.median_ms(rotation, graph=True, rep=TILE_REP_MS) * 1e3 / len(copies)

            def raw(bm, bn, bk, warps, stages):
                def launch(w):
                    _, args, meta, (M, N) = append_kernels.kernel_inputs(x, w, None, qd, *cache_args)
                    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
                    append_kernels._project_append_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                                num_warps=warps, num_stages=stages)
                return launch

            timed = {"ours": per_launch_us(lambda w: project_append(x, w, None, qd, *cache_args)),
                     "cublas": per_launch_us(lambda w: F.linear(x, w))}
            for bm, bn, bk, warps, stages in TILE_CANDIDATES:
                if fp8 and (bn < r or bn % r):
                    continue
                try:
                    timed[f"{bm}x{bn}x{bk}-w{warps}-s{stages}"] = per_launch_us(raw(bm, bn, bk, warps, stages))
                except triton.runtime.errors.OutOfResources:  # more shared memory than an SM holds
                    continue
            fastest = min(timed, key=timed.get)
            for provider, us in timed.items():
                rows.append(dict(table="tiles", mode=name, B=B, provider=provider, us=us,
                                 GBps=weight.numel() * weight.element_size() / (us * 1e-6) / 1e9))
            ranked = sorted(timed.items(), key=lambda kv: kv[1])
            print(f"  {name:12s} B{B:<3d} ours {timed['ours']:6.2f} us, cuBLAS {timed['cublas']:6.2f}, "
                  f"fastest {fastest} {timed[fastest]:6.2f}; top 5: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ranked[:5]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                        help=f"timed batch sizes (default {GPU_BATCH_SIZES} on a GPU, {CPU_BATCH_SIZES} on a CPU)")
    parser.add_argument("--tiles", action="store_true", help="the tile sweep with cold weights instead (GPU only)")
    harness.add_out_argument(parser, "append")
    args = parser.parse_args()
    gpu = harness.on_gpu()
    if args.tiles and not gpu:
        raise SystemExit("--tiles times tile candidates on the GPU: no CUDA device here")
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        print("no GPU: float32 on the CPU; the timings need a GPU (tests/test_append_kernel.py checks the kernel)")
    env = harness.environment(dtype)
    print(json.dumps(env), flush=True)
    if args.tiles:
        rows = tile_sweep(device, dtype, args.batch_sizes or [1, 32])
    else:
        rows = correctness(device, dtype) + timings(device, dtype, args.batch_sizes or
                                                     (GPU_BATCH_SIZES if gpu else CPU_BATCH_SIZES))
    harness.write_results(harness.results_path(args.out, "append"), harness.result_rows("append", rows, UNITS, env))


if __name__ == "__main__":
    main()
