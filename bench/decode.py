"""Decode over the latent KV cache: speed against its peers, bf16 correctness, and a memory report.

One decode step = one new token per row attending over L cached positions, per layer.
Providers:
  ours          mla_kernels.decode (Triton split-KV kernel over the latent cache), CUDA-graph replay;
                ours_S<n> the same with num_splits pinned to n (--splits)
  ours_dot      where the single-row kernel runs (one query row per group), the dot kernel it replaced
  ours_eager    the public `latent_decode` called eagerly (host length check: one device sync)
  ours_token_major  the kernel over the cache's first layout, token-major (B, L, g, r)
  ours_fp8      the kernel over the same cache in fp8 (e4m3) with a float32 scale per position and
                group, read as stored (its GB/s counts the fp8 bytes and the scales); ours_fp8_dot as ours_dot
  sdpa_cudnn    SDPA over the equivalent expanded cache (B, nh, L, hs), cuDNN backend
  sdpa_flash    the same, flash backend
  torch_latent  the same latent decode in plain PyTorch: absorbed query, SDPA with enable_gqa over the
                latents stored (B, g, L, r) (its best layout, prepared outside the timing); every backend
                that runs is timed and the fastest is reported too
  reference     mla_kernels.reference.latent_decode_ref (per-row Python loop, fp32 math)
GB/s counts the cache bytes a provider must read (latent or expanded) over its step time;
tokens/s = B / step time (one layer). Timings: `harness.median_ms` (do_bench or do_bench_cudagraph).

Rows (key `table`): copy (the device's copy bandwidth), timing, correctness (bf16 kernel against
the float64 reference), autotune (the tiles the autotuner chose), memory (bytes per token and what
fits --budget_gb; provider: the cache layout). Writes the results JSON and <stem>.png.

On a machine without CUDA it runs the reference and the plain-PyTorch latent decode at small
sizes plus the analytic memory report, and says that kernel timings need a GPU.

Usage: python bench/decode.py [--shapes 64x4096 16x32768 1x131072] [--modes default joint]
       [--splits 1 4 16 64] [--budget_gb 80] [--layers 12] [--out PATH.json]
"""
import argparse
import json
import math
from unittest import mock

import harness  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mla_kernels import decode as dec
from mla_kernels.cache import LatentKVCache
from mla_kernels.reference import latent_decode_ref, quantize_fp8

NH, HS = 12, 64  # GPT-2 small's attention: C = 768
MODES = {  # name -> (g, r, joint)
    "default": (12, 32, False),  # the defaults: g = nh, r = hs / 2, separate K and V latents
    "joint": (1, 256, True),  # DeepSeek-V2 regime: one group, one joint latent of width 256
}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SCALE = 1.0 / math.sqrt(HS)  # MLA keeps the head size's scale in the absorbed form
ELT = 2  # bf16 bytes
GPU_SHAPES = [(64, 4096), (16, 32768), (1, 131072)]  # (B, L)
CPU_SHAPES = [(4, 1024), (1, 4096)]  # (B, L) without a GPU: the reference loop stays quick
COPY_ELEMENTS = 2**29  # float32: a 2 GiB copy, far beyond L2
MEMORY_SHAPE = (8, 4096)  # (B, L) of the caches allocated for the measured bytes per token
ERROR_CHARS = 80  # an unavailable backend is reported with its error's first line, this long at most
UNITS = {"copy_GBps": "GB/s", "us": "us", "GBps": "GB/s", "tokens_per_s": "tokens/s", "num_splits": "",
         "rel_err": "", "rel_err_bf16_ref": "", "lse_max_abs_err": "", "passed": "", "config": "",
         "bytes_per_token_layer_analytic": "bytes", "bytes_per_token_layer_measured": "bytes",
         "max_context_B1": "tokens", "max_batch_L1024": "", "max_batch_L4096": "", "saving_vs_mha": ""}


def parse_shape(text):
    """'64x4096' -> (64, 4096): B rows of L cached positions."""
    B, L = text.split("x")
    return int(B), int(L)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                   help=f"BxL shapes (default {GPU_SHAPES} on a GPU, {CPU_SHAPES} on a CPU)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--splits", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="num_splits values swept for our kernel (+ the heuristic's)")
    p.add_argument("--budget_gb", type=float, default=80.0, help="KV-cache memory budget for the fit report")
    p.add_argument("--layers", type=int, default=12, help="layers whose caches share the budget")
    harness.add_out_argument(p, "decode")
    return p.parse_args()


def copy_bandwidth(device):
    """Device-to-device copy of 2 GiB: bytes read + written over time, the ceiling for a memory-bound kernel."""
    src = torch.randn(COPY_ELEMENTS, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = harness.median_ms(lambda: dst.copy_(src))
    return 2 * COPY_ELEMENTS * 4 / (ms * 1e-3) / 1e9


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
    """||out - ref|| / ||ref||, in float64."""
    return ((out.double() - ref).norm() / ref.norm()).item()


def _cpu64(t):
    """t on the CPU in float64 (None stays None: a joint cache has no separate values)."""
    return None if t is None else t.cpu().double()


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
        ref, ref_lse = latent_decode_ref(_cpu64(q), _cpu64(ck), _cpu64(cv), seqlens.cpu(), SCALE)
        ref_bf16, _ = latent_decode_ref(q, ck, cv, seqlens, SCALE)
        err, err_bf16 = rel_err(out.cpu(), ref), rel_err(ref_bf16.cpu(), ref)
        lse_err = (lse.cpu().double() - ref_lse).abs().max().item()
        ok = bool(torch.isfinite(out).all()) and err <= 2 * err_bf16 + 1e-3 and lse_err < 1e-2
        case = f"B{B}-L{L}-T{Tq}-H{nh}-G{g}-D{r}" + ("-joint" if joint else f"-V{rv}") + f"-S{S}"
        rows.append(dict(table="correctness", provider="ours", case=case, rel_err=err, rel_err_bf16_ref=err_bf16,
                         lse_max_abs_err=lse_err, passed=ok))
        print(f"correctness {rows[-1]['case']}: rel err {err:.2e} (bf16 reference {err_bf16:.2e}), "
              f"lse {lse_err:.1e} -> {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def dot_kernel_only():
    """A context in which the decode runs its dot kernel even with one query row per group, where
    it otherwise runs the single-row kernel (`mla_kernels.decode.uses_row_kernel`)."""
    return mock.patch.object(dec, "uses_row_kernel", lambda heads_per_group, new_tokens: False)


def time_ours(q, ck, cv, seqlens, splits, heuristic, add):
    """Our kernel: each pinned split count, the heuristic's (graph replay), eager, token-major."""
    op = torch.ops.mla_kernels.latent_decode
    L = ck.shape[1]
    for s in sorted({*[s for s in splits if s <= max(1, L // dec.SPLIT_OVERHEAD_TOKENS)], heuristic}):
        op(q, ck, cv, seqlens, SCALE, s, None, None)  # autotune outside the graph
        add(f"ours_S{s}", harness.median_ms(lambda: op(q, ck, cv, seqlens, SCALE, s, None, None), graph=True),
            num_splits=s)
    op(q, ck, cv, seqlens, SCALE, None, None, None)
    add("ours", harness.median_ms(lambda: op(q, ck, cv, seqlens, SCALE, None, None, None), graph=True),
        num_splits=heuristic)
    if dec.uses_row_kernel(q.shape[2] // ck.shape[2], q.shape[1]):  # the dot kernel it replaces, for comparison
        with dot_kernel_only():
            op(q, ck, cv, seqlens, SCALE, None, None, None)
            add("ours_dot", harness.median_ms(lambda: op(q, ck, cv, seqlens, SCALE, None, None, None), graph=True),
                num_splits=heuristic)
    add("ours_eager", harness.median_ms(lambda: dec.latent_decode(q, ck, cv, seqlens, SCALE)), num_splits=heuristic)
    # the first layout of the cache, token-major (B, L, g, r): each (row, group) program reads
    # r-wide pieces strided by g r; kept as a row to show what the group-major storage bought
    ck_tm, cv_tm = ck.contiguous(), None if cv is None else cv.contiguous()
    op(q, ck_tm, cv_tm, seqlens, SCALE, None, None, None)
    add("ours_token_major", harness.median_ms(lambda: op(q, ck_tm, cv_tm, seqlens, SCALE, None, None, None),
                                              graph=True), num_splits=heuristic)


def fp8_caches(ck, cv):
    """ck, cv quantized to fp8 in the same group-major storage: ((values, scales) per latent), the
    values (B, L, g, r) and scales (B, L, g) as views of (B, g, L, .) buffers; cv's None when joint."""
    def quantize(c):
        values, scales = quantize_fp8(c.transpose(1, 2))  # (B, g, L, r), (B, g, L): the storage order
        return values.transpose(1, 2), scales.transpose(1, 2)

    return quantize(ck), None if cv is None else quantize(cv)


def time_ours_fp8(q, ck, cv, seqlens, heuristic, add):
    """Our kernel over the same caches in fp8 with a float32 scale per position and group."""
    op = torch.ops.mla_kernels.latent_decode
    (k8, k_scale), v = fp8_caches(ck, cv)
    v8, v_scale = (None, None) if v is None else v
    nbytes = sum(t.numel() * t.element_size() for t in (k8, k_scale, v8, v_scale) if t is not None)
    op(q, k8, v8, seqlens, SCALE, None, k_scale, v_scale)  # autotune outside the graph
    ms = harness.median_ms(lambda: op(q, k8, v8, seqlens, SCALE, None, k_scale, v_scale), graph=True)
    add("ours_fp8", ms, nbytes=nbytes, num_splits=heuristic)
    if dec.uses_row_kernel(q.shape[2] // k8.shape[2], q.shape[1]):
        with dot_kernel_only():
            op(q, k8, v8, seqlens, SCALE, None, k_scale, v_scale)
            ms = harness.median_ms(lambda: op(q, k8, v8, seqlens, SCALE, None, k_scale, v_scale), graph=True)
        add("ours_fp8_dot", ms, nbytes=nbytes, num_splits=heuristic)


def time_torch_latent(q, ck, cv, backends, graph, add):
    """Plain PyTorch latent decode: SDPA with GQA over (B, g, L, r) latents, every backend that
    runs, then the fastest as torch_latent."""
    g = ck.shape[2]
    qh = q.transpose(1, 2).contiguous()  # (B, nh, 1, r)
    kl = ck.transpose(1, 2).contiguous()  # (B, g, L, r)
    vl = kl if cv is None else cv.transpose(1, 2).contiguous()  # (B, g, L, r)

    def step():
        return F.scaled_dot_product_attention(qh, kl, vl, scale=SCALE, enable_gqa=g != NH)

    best = None
    for name in backends:
        try:
            with sdpa_kernel(BACKENDS[name]):
                step()  # unsupported inputs fail here, before any graph capture
                ms = harness.median_ms(step, graph=graph)
        except Exception as e:  # noqa: BLE001 - a backend refusing these inputs is a result, not a crash
            print(f"  torch_latent_{name}: unavailable ({str(e).splitlines()[0][:ERROR_CHARS]})")
            continue
        add(f"torch_latent_{name}", ms)
        best = ms if best is None else min(best, ms)
    if best is not None:
        add("torch_latent", best)


def time_expanded(B, L, device, add):
    """SDPA (cuDNN, flash) over the equivalent expanded cache (B, nh, L, hs)."""
    qe = torch.randn(B, NH, 1, HS, device=device, dtype=torch.bfloat16)
    ke = torch.randn(B, NH, L, HS, device=device, dtype=torch.bfloat16)
    ve = torch.randn(B, NH, L, HS, device=device, dtype=torch.bfloat16)

    def step():
        return F.scaled_dot_product_attention(qe, ke, ve)

    for name in ("cudnn", "flash"):
        try:
            with sdpa_kernel(BACKENDS[name]):
                step()
                add(f"sdpa_{name}", harness.median_ms(step, graph=True), expanded=True)
        except Exception as e:  # noqa: BLE001 - as above
            print(f"  sdpa_{name}: unavailable ({str(e).splitlines()[0][:ERROR_CHARS]})")


def time_shape(B, L, mode, splits, device, gpu):
    """Every provider at one (B, L, mode); returns timing rows. Without a GPU only the plain
    PyTorch latent decode (math backend) and the reference."""
    g, r, joint = MODES[mode]
    rows = []
    latent_bytes = B * L * g * (r if joint else 2 * r) * ELT
    expanded_bytes = 2 * B * L * NH * HS * ELT

    def add(provider, ms, expanded=False, nbytes=None, **extra):
        nbytes = nbytes or (expanded_bytes if expanded else latent_bytes)
        rows.append(dict(table="timing", B=B, L=L, mode=mode, g=g, r=r, joint=joint, provider=provider,
                         us=ms * 1e3, GBps=nbytes / (ms * 1e-3) / 1e9, tokens_per_s=B / (ms * 1e-3), **extra))
        print(f"  {mode:8s} B{B:<3d} L{L:<7d} {provider:22s} {ms * 1e3:9.1f} us  {rows[-1]['GBps']:7.0f} GB/s",
              flush=True)

    ck, cv = make_caches(B, L, g, r, joint, device)
    q = torch.randn(B, 1, NH, r, device=device, dtype=torch.bfloat16)  # (B, 1, nh, r)
    seqlens = torch.full((B,), L, device=device, dtype=torch.int32)
    if gpu:
        heuristic = dec.num_splits_heuristic(B * g, L, (r if joint else 2 * r) * ELT, B * NH, r,
                                             dec.num_sms(device))
        time_ours(q, ck, cv, seqlens, splits, heuristic, add)
        time_ours_fp8(q, ck, cv, seqlens, heuristic, add)
    time_torch_latent(q, ck, cv, ["cudnn", "flash", "efficient"] if gpu else ["math"], gpu, add)
    # the reference's per-row loop syncs on every length: eager, few runs
    add("reference", harness.median_ms(lambda: latent_decode_ref(q, ck, cv, seqlens, SCALE), warmup=1, rep=20))
    if gpu:
        time_expanded(B, L, device, add)
    return rows


def measured_bytes_per_token(g, dk, dv, dtype, device):
    """Bytes per cached token of a LatentKVCache of MEMORY_SHAPE, and how they were measured."""
    B, L = MEMORY_SHAPE
    if device.type != "cuda":
        cache = LatentKVCache(B, L, g, dk, dv, dtype=dtype, device=device)
        return cache.bytes_per_token, "LatentKVCache.bytes_per_token (CPU: no allocator counter)"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    cache = LatentKVCache(B, L, g, dk, dv, dtype=dtype, device=device)  # noqa: F841 - held while measured
    return (torch.cuda.memory_allocated(device) - before) / (B * L), "torch.cuda.memory_allocated delta"


def memory_report(device, budget_gb, layers):
    """Cache bytes per token per layer (analytic vs measured) and what fits in the budget."""
    fp8 = torch.float8_e4m3fn
    layouts = {  # name -> (groups, key dim, value dim or None for joint, dtype)
        "MHA (expanded K, V)": (NH, HS, HS, torch.bfloat16),
        "MLA default (g 12, r 32, K+V)": (12, 32, 32, torch.bfloat16),
        "MLA joint (g 1, r 256)": (1, 256, None, torch.bfloat16),
        "MLA default, fp8": (12, 32, 32, fp8),
        "MLA joint, fp8": (1, 256, None, fp8),
    }
    budget = budget_gb * 1e9
    rows = []
    for name, (g, dk, dv, dtype) in layouts.items():
        scale_bytes = 4 * g * (1 if dv is None else 2) if dtype == fp8 else 0  # a float32 scale per group and latent
        analytic = g * (dk + (dv or 0)) * torch.empty((), dtype=dtype).element_size() + scale_bytes
        measured, how = measured_bytes_per_token(g, dk, dv, dtype, device)
        per_token_model = analytic * layers
        rows.append(dict(table="memory", provider=name, budget_gb=budget_gb, layers=layers,
                         bytes_per_token_layer_analytic=analytic,
                         bytes_per_token_layer_measured=measured, measured_by=how,
                         max_context_B1=int(budget // per_token_model),
                         max_batch_L1024=int(budget // (per_token_model * 1024)),
                         max_batch_L4096=int(budget // (per_token_model * 4096)),
                         saving_vs_mha=rows[0]["bytes_per_token_layer_analytic"] / analytic if rows else 1.0))
    return rows


def plot(rows, path):
    """Step time per provider and shape; the largest batch that fits the budget per context length."""
    timings = [r for r in rows if r["table"] == "timing"]
    memory = [r for r in rows if r["table"] == "memory"]
    budget_gb, layers = memory[0]["budget_gb"], memory[0]["layers"]
    plt = harness.pyplot()
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
    ax.set_xticklabels([f"{m}\nB{b} L{n // 1024}k" for m, b, n in keys], fontsize=8)
    ax.set_ylabel("decode step time per layer (us, lower is better)")
    ax.set_title("Decode over the cache, bf16, nh 12 hs 64 (sdpa_*: expanded cache)")
    ax.legend()
    ax = axes[1]
    contexts = [2**k for k in range(8, 18)]  # 256 .. 128k tokens
    for row in memory:
        per_seq = [row["bytes_per_token_layer_analytic"] * layers * c for c in contexts]
        ax.plot(contexts, [budget_gb * 1e9 // p for p in per_seq], marker="o", label=row["provider"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"largest batch fitting {budget_gb:g} GB of KV cache")
    ax.set_title(f"KV cache capacity, {layers} layers, bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(rows, copy_gbps):
    """Memory per layout; on a GPU ours against its peers per shape."""
    print("\nmemory (bytes per token per layer, bf16):")
    for m in (r for r in rows if r["table"] == "memory"):
        print(f"  {m['provider']:32s} analytic {m['bytes_per_token_layer_analytic']:6d}  measured "
              f"{m['bytes_per_token_layer_measured']:8.1f}  x{m['saving_vs_mha']:.1f} vs MHA  "
              f"max context (B1) {m['max_context_B1']:>10d}  max batch L4k {m['max_batch_L4096']}")
    if copy_gbps is None:
        return
    print(f"\nsummary (copy {copy_gbps:.0f} GB/s):")
    timings = [r for r in rows if r["table"] == "timing"]
    for mode, B, L in dict.fromkeys((t["mode"], t["B"], t["L"]) for t in timings):
        t = {x["provider"]: x for x in timings if (x["mode"], x["B"], x["L"]) == (mode, B, L)}
        o = t["ours"]
        ratio = {p: o["us"] / t[p]["us"] for p in ("sdpa_cudnn", "torch_latent") if p in t}
        print(f"  {mode:8s} B{B:<3d} L{L:<7d} ours {o['us']:7.1f} us {o['GBps']:6.0f} GB/s "
              f"({o['GBps'] / copy_gbps:.0%} of copy), S={o['num_splits']}, "
              + ", ".join(f"ours/{p} {v:.2f}" for p, v in ratio.items()))


def main():
    args = parse_args()
    gpu = harness.on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    env = harness.environment(torch.bfloat16)
    print(json.dumps(env), flush=True)
    rows, copy_gbps = [], None
    if gpu:
        copy_gbps = copy_bandwidth(device)
        rows.append(dict(table="copy", provider="torch", copy_GBps=copy_gbps))
        print(f"device copy: {copy_gbps:.0f} GB/s", flush=True)
    else:
        print("no CUDA device: kernel timings need a GPU; timing the reference and the plain-PyTorch latent "
              "decode (math backend) at small sizes", flush=True)
    for mode in args.modes:
        for B, L in args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES):
            rows += time_shape(B, L, mode, args.splits, device, gpu)
            if gpu:
                torch.cuda.empty_cache()
    if gpu:  # after the timings, so the autotuner picks tiles on the benchmark shapes, not these small ones
        rows += correctness(device)
        rows += [dict(table="autotune", provider="ours", key=str(k), config=str(v))
                 for k, v in dec._decode_partial_tuned.cache.items()]
    rows += memory_report(device, args.budget_gb, args.layers)
    print_summary(rows, copy_gbps)
    harness.write_results(harness.results_path(args.out, "decode"), harness.result_rows("decode", rows, UNITS, env),
                          plot)


if __name__ == "__main__":
    main()
