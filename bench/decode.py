"""Decode over the latent KV cache: speed against its peers, bf16 correctness, and a memory report.

One decode step = one new token per row attending over L cached positions, per layer.
Providers:
  ours          mla_kernels.decode (Triton split-KV kernel over the latent cache), CUDA-graph replay
  ours_eager    the public `latent_decode` called eagerly (host length check: one device sync)
  sdpa_cudnn    SDPA over the equivalent expanded cache (B, nh, L, hs), cuDNN backend
  sdpa_flash    the same, flash backend
  torch_latent  the same latent decode in plain PyTorch: absorbed query, SDPA with enable_gqa over the
                latents stored (B, g, L, r) (its best layout, prepared outside the timing); every backend
                that runs is timed and the fastest is reported too
  reference     mla_kernels.reference.latent_decode_ref (per-row Python loop, fp32 math)
GB/s counts the cache bytes a provider must read (latent or expanded) over its step time;
tokens/s = B / step time (one layer). Timings: triton.testing do_bench(_cudagraph) medians.

On a machine without CUDA it runs the reference and the plain-PyTorch latent decode at small
sizes plus the analytic memory report, and says that kernel timings need a GPU.

Usage: python bench/decode.py [--shapes 64x4096,16x32768,1x131072] [--modes default,joint]
       [--budget-gb 80] [--layers 12] [--out bench/results]
"""
import argparse
import csv
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mla_kernels import decode as dec  # noqa: E402
from mla_kernels.cache import LatentKVCache  # noqa: E402
from mla_kernels.reference import latent_decode_ref  # noqa: E402

NH, HS = 12, 64  # GPT-2 small's attention: C = 768
MODES = {  # name -> (g, r, joint)
    "default": (12, 32, False),  # the defaults: g = nh, r = hs / 2, separate K and V latents
    "joint": (1, 256, True),  # DeepSeek-V2 regime: one group, one joint latent of width 256
}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SCALE = 1.0 / math.sqrt(HS)  # MLA keeps the head size's scale in the absorbed form
ELT = 2  # bf16 bytes


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="64x4096,16x32768,1x131072", help="BxL list, comma separated")
    p.add_argument("--modes", default="default,joint", help=f"subset of {list(MODES)}")
    p.add_argument("--splits", default="1,4,16,64", help="num_splits values swept for our kernel (+ the heuristic's)")
    p.add_argument("--budget-gb", type=float, default=80.0, help="KV-cache memory budget for the fit report")
    p.add_argument("--layers", type=int, default=12, help="layers whose caches share the budget")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    args.modes = args.modes.split(",")
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}, allowed {list(MODES)}")
    args.splits = [int(s) for s in args.splits.split(",")]
    return args


def env_info(device):
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "device": str(device), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(gpu=prop.name, sms=prop.multi_processor_count, memory_gb=round(prop.total_memory / 1e9, 1))
    return info


def bench(fn, graph):
    """Median ms of fn: on CUDA replayed from a graph when graph is true (no launch gaps), else
    eagerly with device events; on CPU by the host clock (one warm-up, five runs)."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[2]
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device):
    """Device-to-device copy of 2 GB: bytes read + written over time, the ceiling for a memory-bound kernel."""
    src = torch.randn(2**29, device=device, dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), graph=False)
    del src, dst
    return 2 * 2**29 * 4 / (ms * 1e-3) / 1e9


def make_caches(B, L, g, r, joint, device, lens=None, rv=None):
    """Random bf16 caches (B, L, g, r) and (B, L, g, rv) (rv defaults to r) in LatentKVCache's
    group-major storage (views of (B, g, L, .) tensors); slots beyond lens are NaN."""
    rv = r if rv is None else rv
    ck = torch.randn(B, g, L, r, device=device, dtype=torch.bfloat16).transpose(1, 2)  # (B, L, g, r)
    cv = None if joint else torch.randn(B, g, L, rv, device=device, dtype=torch.bfloat16).transpose(1, 2)
    if lens is not None:
        for b, n in enumerate(lens):
            ck[b, n:] = float("nan")
            if cv is not None:
                cv[b, n:] = float("nan")
    return ck, cv


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def correctness(device):
    """bf16 kernel vs the float64 reference; the bf16 reference path's own error alongside.

    Passes when the kernel's error is at most 2x the bf16 reference path's error + 1e-3
    (flash-attention's rule) and no NaN from unused slots reaches the output.
    """
    rows = []
    cases = [  # (B, L, lens, Tq, nh, g, r, rv, joint, num_splits)
        (4, 2048, [1, 17, 300, 2048], 1, NH, 12, 32, 32, False, None),
        (4, 2048, [4, 17, 300, 2048], 4, NH, 12, 32, 32, False, 8),
        (4, 2048, [1, 17, 300, 2048], 1, NH, 1, 256, 256, True, None),
        (4, 2048, [3, 17, 300, 2047], 3, NH, 1, 256, 256, True, 1),
        (3, 1024, [2, 500, 1000], 2, 8, 2, 96, 40, False, 5),
        (2, 1024, [1, 1000], 1, 16, 1, 576, 576, True, None),
    ]
    for B, L, lens, Tq, nh, g, r, rv, joint, S in cases:
        ck, cv = make_caches(B, L, g, r, joint, device, lens, rv)
        q = torch.randn(B, Tq, nh, r, device=device, dtype=torch.bfloat16)
        seqlens = torch.tensor(lens, device=device, dtype=torch.int32)
        out, lse = dec.latent_decode(q, ck, cv, seqlens, SCALE, num_splits=S)
        torch.cuda.synchronize()
        c64 = (lambda t: None if t is None else t.cpu().double())
        ref, ref_lse = latent_decode_ref(c64(q), c64(ck), c64(cv), seqlens.cpu(), SCALE)
        ref_bf16, _ = latent_decode_ref(q, ck, cv, seqlens, SCALE)
        err, err_bf16 = rel_err(out.cpu(), ref), rel_err(ref_bf16.cpu(), ref)
        lse_err = (lse.cpu().double() - ref_lse).abs().max().item()
        ok = bool(torch.isfinite(out).all()) and err <= 2 * err_bf16 + 1e-3 and lse_err < 1e-2
        rows.append(dict(case=f"B{B}-L{L}-T{Tq}-H{nh}-G{g}-D{r}" + ("-joint" if joint else f"-V{rv}") + f"-S{S}",
                         rel_err=err, rel_err_bf16_ref=err_bf16, lse_max_abs_err=lse_err, passed=ok))
        print(f"correctness {rows[-1]['case']}: rel err {err:.2e} (bf16 reference {err_bf16:.2e}), "
              f"lse {lse_err:.1e} -> {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def time_shape(B, L, mode, splits, device, graph):
    """Every provider at one (B, L, mode); returns rows of dicts."""
    g, r, joint = MODES[mode]
    rows = []
    latent_bytes = B * L * g * (r if joint else 2 * r) * ELT
    expanded_bytes = 2 * B * L * NH * HS * ELT

    def add(provider, ms, nbytes, **extra):
        rows.append(dict(B=B, L=L, mode=mode, g=g, r=r, joint=joint, provider=provider, us=ms * 1e3,
                         GBps=nbytes / (ms * 1e-3) / 1e9, tokens_per_s=B / (ms * 1e-3), **extra))
        print(f"  {mode:8s} B{B:<3d} L{L:<7d} {provider:22s} {ms * 1e3:9.1f} us  {rows[-1]['GBps']:7.0f} GB/s",
              flush=True)

    ck, cv = make_caches(B, L, g, r, joint, device)
    q = torch.randn(B, 1, NH, r, device=device, dtype=torch.bfloat16)  # (B, 1, nh, r)
    seqlens = torch.full((B,), L, device=device, dtype=torch.int32)
    op = torch.ops.mla_kernels.latent_decode
    heur = dec.num_splits_heuristic(B * g, L, (r if joint else 2 * r) * ELT, B * NH, r, dec._num_sms(device))
    if graph:
        for s in sorted({*[s for s in splits if s <= max(1, L // dec.SPLIT_OVERHEAD_TOKENS)], heur}):
            op(q, ck, cv, seqlens, SCALE, s)  # autotune outside the graph
            add(f"ours_S{s}", bench(lambda: op(q, ck, cv, seqlens, SCALE, s), graph), latent_bytes, num_splits=s)
        op(q, ck, cv, seqlens, SCALE, None)
        add("ours", bench(lambda: op(q, ck, cv, seqlens, SCALE, None), graph), latent_bytes, num_splits=heur)
        add("ours_eager", bench(lambda: dec.latent_decode(q, ck, cv, seqlens, SCALE), False), latent_bytes,
            num_splits=heur)
        # the first layout of the cache, token-major (B, L, g, r): each (row, group) program reads
        # r-wide pieces strided by g r; kept as a row to show what the group-major storage bought
        ck_tm, cv_tm = ck.contiguous(), None if cv is None else cv.contiguous()
        op(q, ck_tm, cv_tm, seqlens, SCALE, None)
        add("ours_token_major", bench(lambda: op(q, ck_tm, cv_tm, seqlens, SCALE, None), graph), latent_bytes,
            num_splits=heur)
        del ck_tm, cv_tm

    # plain PyTorch latent decode: SDPA with GQA over (B, g, L, r) latents
    qh = q.transpose(1, 2).contiguous()  # (B, nh, 1, r)
    kl = ck.transpose(1, 2).contiguous()  # (B, g, L, r)
    vl = kl if joint else cv.transpose(1, 2).contiguous()  # (B, g, L, r)
    best = None
    for name in (["cudnn", "flash", "efficient"] if graph else ["math"]):
        try:
            with sdpa_kernel(BACKENDS[name]):
                fn = lambda: F.scaled_dot_product_attention(qh, kl, vl, scale=SCALE, enable_gqa=g != NH)  # noqa: E731
                fn()  # unsupported inputs fail here, before any graph capture
                ms = bench(fn, graph)
        except Exception as e:  # noqa: BLE001 - a backend refusing these inputs is a result, not a crash
            print(f"  torch_latent_{name}: unavailable ({str(e).splitlines()[0][:80]})")
            continue
        add(f"torch_latent_{name}", ms, latent_bytes)
        best = ms if best is None else min(best, ms)
    if best is not None:
        add("torch_latent", best, latent_bytes)
    del kl, vl, qh

    if device.type == "cuda":  # the reference's per-row loop syncs on every length: eager, few runs
        ref_ms = triton.testing.do_bench(lambda: latent_decode_ref(q, ck, cv, seqlens, SCALE), warmup=1, rep=20,
                                         return_mode="median")
    else:
        ref_ms = bench(lambda: latent_decode_ref(q, ck, cv, seqlens, SCALE), False)
    add("reference", ref_ms, latent_bytes)
    del ck, cv

    if graph:  # SDPA over the equivalent expanded cache (B, nh, L, hs)
        qe = torch.randn(B, NH, 1, HS, device=device, dtype=torch.bfloat16)
        ke = torch.randn(B, NH, L, HS, device=device, dtype=torch.bfloat16)
        ve = torch.randn(B, NH, L, HS, device=device, dtype=torch.bfloat16)
        for name in ("cudnn", "flash"):
            try:
                with sdpa_kernel(BACKENDS[name]):
                    fn = lambda: F.scaled_dot_product_attention(qe, ke, ve)  # noqa: E731
                    fn()
                    add(f"sdpa_{name}", bench(fn, graph), expanded_bytes)
            except Exception as e:  # noqa: BLE001 - as above
                print(f"  sdpa_{name}: unavailable ({str(e).splitlines()[0][:80]})")
        del qe, ke, ve
    if graph:
        torch.cuda.empty_cache()
    return rows


def memory_report(device, budget_gb, layers):
    """Cache bytes per token per layer (analytic vs measured) and what fits in the budget."""
    layouts = {  # name -> (groups, key dim, value dim or None for joint)
        "MHA (expanded K, V)": (NH, HS, HS),
        "MLA default (g 12, r 32, K+V)": (12, 32, 32),
        "MLA joint (g 1, r 256)": (1, 256, None),
    }
    B, L = 8, 4096
    rows = []
    for name, (g, dk, dv) in layouts.items():
        analytic = g * (dk + (dv or 0)) * ELT
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
            cache = LatentKVCache(B, L, g, dk, dv, dtype=torch.bfloat16, device=device)
            measured = (torch.cuda.memory_allocated(device) - before) / (B * L)
            how = "torch.cuda.memory_allocated delta"
        else:
            cache = LatentKVCache(B, L, g, dk, dv, dtype=torch.bfloat16, device=device)
            measured = cache.bytes_per_token
            how = "LatentKVCache.bytes_per_token (CPU: no allocator counter)"
        del cache
        per_token_model = analytic * layers
        budget = budget_gb * 1e9
        rows.append(dict(layout=name, bytes_per_token_layer_analytic=analytic,
                         bytes_per_token_layer_measured=measured, measured_by=how,
                         max_context_B1=int(budget // per_token_model),
                         max_batch_L1024=int(budget // (per_token_model * 1024)),
                         max_batch_L4096=int(budget // (per_token_model * 4096)),
                         saving_vs_mha=None))
    for row in rows:
        row["saving_vs_mha"] = rows[0]["bytes_per_token_layer_analytic"] / row["bytes_per_token_layer_analytic"]
    return rows


def plot(timings, memory, budget_gb, layers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    providers = ["ours", "torch_latent", "sdpa_cudnn", "sdpa_flash"]
    keys = sorted({(t["mode"], t["B"], t["L"]) for t in timings}, key=lambda k: (k[0], -k[1]))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        vals = [next((t["us"] for t in timings if (t["mode"], t["B"], t["L"]) == k and t["provider"] == prov),
                     float("nan")) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=prov)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{m}\nB{b} L{l // 1024}k" for m, b, l in keys], fontsize=8)
    ax.set_ylabel("decode step time per layer (us, lower is better)")
    ax.set_title("Decode over the cache, bf16, nh 12 hs 64 (sdpa_*: expanded cache)")
    ax.legend()
    ax = axes[1]
    contexts = [2**k for k in range(8, 18)]
    for row in memory:
        per_seq = [row["bytes_per_token_layer_analytic"] * layers * c for c in contexts]
        ax.plot(contexts, [budget_gb * 1e9 // p for p in per_seq], marker="o", label=row["layout"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"largest batch fitting {budget_gb:g} GB of KV cache")
    ax.set_title(f"KV cache capacity, {layers} layers, bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    os.makedirs(args.out, exist_ok=True)
    info = env_info(device)
    print(json.dumps(info), flush=True)
    result = {"env": info, "args": {k: v for k, v in vars(args).items() if k != "out"}}
    if gpu:
        result["copy_GBps"] = copy_bandwidth(device)
        print(f"device copy: {result['copy_GBps']:.0f} GB/s", flush=True)
        shapes = args.shapes
    else:
        print("no CUDA device: kernel timings need a GPU; timing the reference and the plain-PyTorch latent "
              "decode (math backend) at small sizes", flush=True)
        shapes = [(4, 1024), (1, 4096)]
    timings = []
    for mode in args.modes:
        for B, L in shapes:
            timings += time_shape(B, L, mode, args.splits, device, gpu)
    result["timings"] = timings
    if gpu:  # after the timings, so the autotuner picks tiles on the benchmark shapes, not these small ones
        result["correctness"] = correctness(device)
        result["autotune"] = {str(k): str(v) for k, v in dec._decode_partial_tuned.cache.items()}
    result["memory"] = memory_report(device, args.budget_gb, args.layers)
    tag = torch.cuda.get_device_name(device).split()[-1].lower() if gpu else "cpu"  # "NVIDIA H200" -> h200
    with open(os.path.join(args.out, f"decode_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, f"decode_{tag}_timings.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(timings[0].keys()) + ["num_splits"], extrasaction="ignore")
        w.writeheader()
        w.writerows(timings)
    with open(os.path.join(args.out, f"decode_{tag}_memory.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result["memory"][0].keys()))
        w.writeheader()
        w.writerows(result["memory"])
    plot(timings, result["memory"], args.budget_gb, args.layers, os.path.join(args.out, f"decode_{tag}.png"))

    print("\nmemory (bytes per token per layer, bf16):")
    for m in result["memory"]:
        print(f"  {m['layout']:32s} analytic {m['bytes_per_token_layer_analytic']:6d}  measured "
              f"{m['bytes_per_token_layer_measured']:8.1f}  x{m['saving_vs_mha']:.1f} vs MHA  "
              f"max context (B1) {m['max_context_B1']:>10d}  max batch L4k {m['max_batch_L4096']}")
    if gpu:
        print(f"\nsummary (copy {result['copy_GBps']:.0f} GB/s):")
        for mode in args.modes:
            for B, L in shapes:
                t = {x["provider"]: x for x in timings if (x["mode"], x["B"], x["L"]) == (mode, B, L)}
                o = t["ours"]
                ratio = {p: o["us"] / t[p]["us"] for p in ("sdpa_cudnn", "torch_latent") if p in t}
                print(f"  {mode:8s} B{B:<3d} L{L:<7d} ours {o['us']:7.1f} us {o['GBps']:6.0f} GB/s "
                      f"({o['GBps'] / result['copy_GBps']:.0%} of copy), S={o['num_splits']}, "
                      + ", ".join(f"ours/{p} {v:.2f}" for p, v in ratio.items()))


if __name__ == "__main__":
    main()
