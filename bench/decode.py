"""Decode over the latent KV cache: speed against its peers, bf16 correctness, and a memory report.

One decode step = one new token per row attending over L cached positions, per layer.
Providers:
  ours          mla_kernels.decode (Triton split-KV kernel over the latent cache), CUDA-graph replay;
                ours_S<n> the same with num_splits pinned to n (--splits)
  ours_dot      where the single-row kernel runs (one query row per group), the dot kernel it replaced
  ours_eager    the public `latent_decode` called eagerly (host length check: one device sync)
  ours_tile     (--tiles) one fixed tile (BLOCK_N, warps, stages) and split count launched directly
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

--tiles, instead of the providers: for each mode, shape (default TILE_SHAPES) and cache dtype
(bf16, fp8), the kernel the decode runs (single-row for the default latent, dot for the joint one)
at every tile of ROW_TILES / DOT_TILES and at half, once and twice the heuristic's split count,
each checked against the shipped launch's output (table `tiles`, `max_abs_diff`), then for each
(mode, cache) the (tile, split factor) whose worst time over the shapes is nearest the fastest.

Rows (key `table`): copy (the device's copy bandwidth), timing, correctness (bf16 kernel against
the float64 reference), autotune (the tiles the autotuner chose), memory (bytes per token and what
fits --budget_gb; provider: the cache layout). Writes the results JSON and <stem>.png.

On a machine without CUDA it runs the reference and the plain-PyTorch latent decode at small
sizes plus the analytic memory report, and says that kernel timings need a GPU.

Usage: python bench/decode.py [--shapes 64x4096 16x32768 1x131072] [--modes default joint]
       [--splits 1 4 16 64] [--budget_gb 80] [--layers 12] [--out PATH.json]
       python bench/decode.py --tiles [--shapes 32x8192] [--modes joint] [--out PATH.json]
"""
import argparse
import json
import math
from unittest import mock

import harness  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F
import triton
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
# --tiles: every tile the autotuner may pick, and larger ones for the fp8 cache's half-size rows
ROW_TILES = [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in dec._ROW_CONFIGS] + [
    (256, 4, 4), (256, 8, 4), (256, 8, 2), (512, 8, 2), (512, 8, 3), (512, 16, 2)]
DOT_TILES = [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in dec._PARTIAL_CONFIGS] + [
    (128, 4, 4), (32, 4, 4), (16, 4, 4), (128, 8, 4), (256, 8, 2)]
TILE_SHAPES = [(32, 8192), (32, 32768), (1, 131072)]  # (B, L): the generation table's batch 32, and one long row
MEMORY_SHAPE = (8, 4096)  # (B, L) of the caches allocated for the measured bytes per token
ERROR_CHARS = 80  # an unavailable backend is reported with its error's first line, this long at most
UNITS = {"copy_GBps": "GB/s", "us": "us", "GBps": "GB/s", "tokens_per_s": "tokens/s", "num_splits": "",
         "frac_copy": "", "max_abs_diff": "", "split_factor": "",
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
    p.add_argument("--tiles", action="store_true", help="the tile and split sweep instead (GPU only)")
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


class FixedTile:
    """Stands in for an autotuned kernel, `tuned[grid](*args, **meta)`, launching one tile."""

    def __init__(self, kernel, block_n, warps, stages):
        self.kernel, self.block_n, self.warps, self.stages = kernel, block_n, warps, stages

    def __getitem__(self, grid):
        return lambda *args, **meta: self.kernel[grid](*args, **meta, BLOCK_N=self.block_n, num_warps=self.warps,
                                                       num_stages=self.stages)


def tile_sweep(device, shapes, modes, copy_gbps):
    """Every tile of the kernel each mode runs, at three split counts around the heuristic's, over
    the bf16 and the fp8 cache (rows: table `tiles`; GBps counts the bytes stored, scales included)."""
    op = torch.ops.mla_kernels.latent_decode
    rows = []
    for mode in modes:
        g, r, joint = MODES[mode]
        row_kernel = dec.uses_row_kernel(NH // g, 1)
        tuned_name, kernel, tiles = (("_decode_row_tuned", dec._decode_row_kernel, ROW_TILES) if row_kernel
                                     else ("_decode_partial_tuned", dec._decode_partial_kernel, DOT_TILES))
        for B, L in shapes:
            ck, cv = make_caches(B, L, g, r, joint, device)
            q = torch.randn(B, 1, NH, r, device=device, dtype=torch.bfloat16)  # (B, 1, nh, r)
            seqlens = torch.full((B,), L, device=device, dtype=torch.int32)
            (k8, k_scale), fp8_values = fp8_caches(ck, cv)
            v8, v_scale = (None, None) if fp8_values is None else fp8_values
            for cache, (k, v, ks, vs) in (("bf16", (ck, cv, None, None)), ("fp8", (k8, v8, k_scale, v_scale))):
                nbytes = sum(t.numel() * t.element_size() for t in (k, v, ks, vs) if t is not None)
                heuristic = dec.default_num_splits(q, k, v, ks is not None)
                call = lambda splits: op(q, k, v, seqlens, SCALE, splits, ks, vs)  # noqa: E731
                shipped = call(None)[0].float()  # autotunes outside the graph

                def add(provider, ms, **extra):
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    rows.append(dict(table="tiles", mode=mode, cache=cache, B=B, L=L, provider=provider,
                                     kernel="row" if row_kernel else "dot", us=ms * 1e3, GBps=gbps,
                                     frac_copy=gbps / copy_gbps, **extra))
                    tile = "" if "block_n" not in extra else \
                        f"N{extra['block_n']:<4d} w{extra['warps']:<2d} s{extra['stages']} S{extra['num_splits']:<4d}"
                    print(f"  {mode:8s} {cache:5s} B{B:<3d} L{L:<7d} {provider:10s} {tile:22s} {ms * 1e3:8.1f} us "
                          f"{gbps / copy_gbps:6.1%} of copy", flush=True)

                add("ours", harness.median_ms(lambda: call(None), graph=True), num_splits=heuristic)
                for splits in sorted({max(1, heuristic // 2), heuristic, min(2 * heuristic, dec.MAX_SPLITS)}):
                    for block_n, warps, stages in tiles:
                        with mock.patch.object(dec, tuned_name, FixedTile(kernel, block_n, warps, stages)):
                            try:
                                diff = (call(splits)[0].float() - shipped).abs().max().item()
                                ms = harness.median_ms(lambda: call(splits), graph=True)
                            except triton.runtime.errors.OutOfResources as e:
                                print(f"  N{block_n} w{warps} s{stages}: does not fit ({str(e)[:ERROR_CHARS]})")
                                continue
                        add("ours_tile", ms, block_n=block_n, warps=warps, stages=stages, num_splits=splits,
                            split_factor=splits / heuristic, max_abs_diff=diff)
            del ck, cv, k8, v8, k_scale, v_scale
            torch.cuda.empty_cache()
    return rows


def autotune_rows():
    """The tile the autotuner chose for each key it met, for both decode kernels (table `autotune`)."""
    return [dict(table="autotune", provider="ours", kernel=kernel, key=str(k), config=str(v))
            for kernel, tuned in (("dot", dec._decode_partial_tuned), ("row", dec._decode_row_tuned))
            for k, v in tuned.cache.items()]


def print_tile_summary(rows):
    """Per (mode, cache): each shape's fastest tile against the shipped launch, then the (tile,
    split factor) whose worst time over the shapes, relative to each shape's fastest, is least."""
    for mode, cache in sorted({(r["mode"], r["cache"]) for r in rows}):
        by_shape = {}  # (B, L) -> (the shipped row, the tile rows)
        for r in rows:
            if (r["mode"], r["cache"]) == (mode, cache):
                entry = by_shape.setdefault((r["B"], r["L"]), [None, []])
                if r["provider"] == "ours":
                    entry[0] = r
                else:
                    entry[1].append(r)
        worst = {}  # (tile, split factor) -> its time over the shape's fastest, per shape
        for (B, L), (shipped, tiles) in sorted(by_shape.items()):
            top = min(tiles, key=lambda r: r["us"])
            print(f"{mode:8s} {cache:5s} B{B:<3d} L{L:<7d} shipped {shipped['us']:7.1f} us "
                  f"({shipped['frac_copy']:.0%})  best {top['us']:7.1f} us ({top['frac_copy']:.0%}) "
                  f"N{top['block_n']} w{top['warps']} s{top['stages']} S{top['num_splits']}")
            for r in tiles:
                key = (r["block_n"], r["warps"], r["stages"], r["split_factor"])
                worst.setdefault(key, []).append(r["us"] / top["us"])
        ranked = sorted((max(v), k) for k, v in worst.items() if len(v) == len(by_shape))
        for ratio, (block_n, warps, stages, factor) in ranked[:5]:
            print(f"{mode:8s} {cache:5s}   N{block_n} w{warps} s{stages} splits x{factor:g}: "
                  f"worst {ratio:.3f}x the fastest")


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


def plot_tiles(rows, path):
    """The tile sweep: per mode and cache dtype, each tile's share of copy bandwidth per shape, the
    shipped launch marked."""
    tiles = [r for r in rows if r["table"] == "tiles"]
    groups = sorted({(r["mode"], r["cache"]) for r in tiles})
    shapes = sorted({(r["B"], r["L"]) for r in tiles}, key=lambda s: (-s[0], s[1]))
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.5), sharey=True, squeeze=False)
    for ax, (mode, cache) in zip(axes[0], groups):
        for x, shape in enumerate(shapes):
            here = [r for r in tiles if (r["mode"], r["cache"], r["B"], r["L"]) == (mode, cache, *shape)]
            swept = [r["frac_copy"] for r in here if r["provider"] == "ours_tile"]
            ax.scatter([x] * len(swept), swept, s=12, color="grey", alpha=0.5,
                       label="a swept tile and split count" if x == 0 else None)
            shipped = [r["frac_copy"] for r in here if r["provider"] == "ours"]
            ax.scatter([x] * len(shipped), shipped, s=90, marker="*", color="tab:red",
                       label="shipped (autotuned)" if x == 0 else None)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"B{b} L{n // 1024}k" for b, n in shapes])
        ax.set_title(f"{mode} latent, {cache} cache")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("share of device copy bandwidth (higher is better)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows, path):
    """Step time per provider and shape; the largest batch that fits the budget per context length.
    A tile sweep's rows (--tiles) get `plot_tiles`."""
    if any(r["table"] == "tiles" for r in rows):
        return plot_tiles(rows, path)
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
    if args.tiles:
        if not gpu:
            raise SystemExit("--tiles times tiles on the GPU: no CUDA device here")
        rows += tile_sweep(device, args.shapes or TILE_SHAPES, args.modes, copy_gbps)
        print_tile_summary(rows[1:])
        rows += autotune_rows()
        harness.write_results(harness.results_path(args.out, "decode_tiles"),
                              harness.result_rows("decode", rows, UNITS, env), plot)
        return
    for mode in args.modes:
        for B, L in args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES):
            rows += time_shape(B, L, mode, args.splits, device, gpu)
            if gpu:
                torch.cuda.empty_cache()
    if gpu:  # after the timings, so the autotuner picks tiles on the benchmark shapes, not these small ones
        rows += correctness(device)
        rows += autotune_rows()
    rows += memory_report(device, args.budget_gb, args.layers)
    print_summary(rows, copy_gbps)
    harness.write_results(harness.results_path(args.out, "decode"), harness.result_rows("decode", rows, UNITS, env),
                          plot)


if __name__ == "__main__":
    main()
