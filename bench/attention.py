"""Speed and memory of causal attention for training: the MLA kernels against PyTorch's own.

    python bench/attention.py                      # default sweep (GPU) or a small CPU run
    python bench/attention.py --seqlens 1024 4096 --batch-tokens 16384 --heads 12 --head-sizes 64 \
        --latent-fracs 0.5 --out bench/results/attention

Two tables:
- core: the bare causal attention at one head dim: our `flash_attention` (the latent-space
  core) against SDPA's cuDNN and flash (FA2) backends and FlexAttention, at the same shape.
  FLOPs: 2 B nh T^2 (Dqk + Dv) / 2 forward (causal halves), backward 2.5x forward.
- layer: whole attention layers (x (B, T, C) -> (B, T, C)): the standard layer on SDPA
  (cuDNN, flash), the MLA layer written in plain PyTorch (absorbed form: composed weights,
  SDPA at head dim r with GQA; the strongest peer that needs no custom kernel), and
  `MultiHeadLatentAttention` on the reference path and on the kernels (absorbed, expanded).
For each: forward, backward and forward+backward median ms (`triton.testing.do_bench`),
TFLOP/s (core only) and peak MB allocated above the inputs. Writes <out>_core.csv,
<out>_layer.csv, <out>.json (GPU name, torch and triton versions) and <out>.png.
Without a GPU it runs the reference paths at small sizes: kernel timings need a GPU.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mla_gpt.model.attention import CausalSelfAttention, MultiHeadLatentAttention  # noqa: E402
from mla_gpt.model.config import GPTConfig  # noqa: E402
from mla_kernels import reference  # noqa: E402
from mla_kernels.attention import flash_attention  # noqa: E402

BWD_FLOP_FACTOR = 2.5  # backward of attention: 5 matmuls of the 2 in the forward


# ----------------------------------------------------------------------------- timing


def _bench_ms(fn, on_gpu):
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _peak_mb(fn, on_gpu):
    """Peak device memory allocated while fn runs, above what was allocated before (MB)."""
    if not on_gpu:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(forward, inputs, on_gpu):
    """forward(): output tensor from the leaves `inputs` (requires_grad). -> dict of ms and MB."""
    out = forward()
    dout = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        forward().backward(dout)

    def bwd():
        out.backward(dout, retain_graph=True)

    res = {}
    for name, fn in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", fwd_bwd)):
        for x in inputs:
            x.grad = None
        res[f"{name}_ms"] = _bench_ms(fn, on_gpu)
        res[f"{name}_mb"] = _peak_mb(fn, on_gpu)
    return res


# ----------------------------------------------------------------------------- core


def _sdpa_core(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "math": SDPBackend.MATH}[backend]

    def run(q, k, v):  # (B, T, nh, D) layouts, like flash_attention
        with sdpa_kernel(chosen):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)
    return run


def _flex_core():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v):
        T = q.shape[1]
        if T not in masks:
            masks[T] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=q.device)
        o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[T],
                     enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)
    return run


def core_providers(on_gpu):
    if not on_gpu:
        return {"reference": lambda q, k, v: reference.attention_ref(q, k, v)[0],
                "sdpa_math": _sdpa_core("math")}
    return {"triton": flash_attention, "sdpa_cudnn": _sdpa_core("cudnn"),
            "sdpa_flash": _sdpa_core("flash"), "flex": _flex_core()}


FLEX_DIMS_HELP = "head dims at which FlexAttention runs (each shape costs a torch.compile)"


def bench_core(args, on_gpu, device, dtype):
    rows = []
    providers = core_providers(on_gpu)
    for d in args.core_dims:
        for T in args.seqlens:
            B = max(1, args.batch_tokens // T)
            nh = args.core_heads
            fwd_flops = 2 * B * nh * T * T * (2 * d) / 2
            for name, fn in providers.items():
                if name == "flex" and d not in args.flex_dims:
                    continue
                q, k, v = (torch.randn(B, T, nh, d, device=device, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                row = dict(table="core", provider=name, B=B, T=T, nh=nh, d=d)
                try:
                    row.update(measure(lambda: fn(q, k, v), (q, k, v), on_gpu))
                except Exception as e:  # a peer backend may not support a shape: record, go on
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                for key, flops in (("fwd", fwd_flops), ("bwd", BWD_FLOP_FACTOR * fwd_flops),
                                   ("fwd_bwd", (1 + BWD_FLOP_FACTOR) * fwd_flops)):
                    if f"{key}_ms" in row:
                        row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
                rows.append(row)
                print(_fmt(row), flush=True)
                del q, k, v
    return rows


# ----------------------------------------------------------------------------- layers


class PlainMLA(torch.nn.Module):
    """The MLA layer in plain PyTorch, absorbed form: the peer that needs no custom kernel.

    Shares the weights of a MultiHeadLatentAttention. One GEMM makes the absorbed queries
    (q_proj composed with W_uk, C -> nh r) and the latents; SDPA runs at head dim r over
    the latents with GQA; one GEMM applies W_uv composed with c_proj (nh r -> C).
    """

    def __init__(self, mla, sdpa_backend):
        super().__init__()
        self.mla = mla
        self.core = _sdpa_core(sdpa_backend)

    def forward(self, x):
        m = self.mla
        B, T, C = x.shape
        nh, hs, r, g = m.n_head, m.head_size, m.latent_dim, m.n_groups
        w_uk, w_uv = m.k_expand.weight, m.v_expand.weight  # (nh, r, hs)
        w_q = torch.einsum("hrd,hdc->hrc", w_uk, m.q_proj.weight.view(nh, hs, C)).reshape(nh * r, C)
        proj = F.linear(x, torch.cat([w_q, m.kv_latent_proj.weight]))  # (B, T, nh r + 2 g r)
        q_lat = proj[..., : nh * r].view(B, T, nh, r)
        lat = proj[..., nh * r:].view(B, T, -1, g, r)
        c_k, c_v = lat[:, :, 0], lat[:, :, -1]  # (B, T, g, r)
        q_lat = q_lat * (math.sqrt(r) / math.sqrt(hs))  # SDPA scales by 1/sqrt(r); MLA's scale is 1/sqrt(hs)
        o_lat = self.core(q_lat, c_k, c_v)  # (B, T, nh, r)
        w_o = torch.einsum("chd,hkd->chk", m.c_proj.weight.view(C, nh, hs), w_uv).reshape(C, nh * r)
        return F.linear(o_lat.reshape(B, T, nh * r), w_o)


def _sdpa_layer(layer, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "math": SDPBackend.MATH}[backend]

    def run(x):
        with sdpa_kernel(chosen):
            return layer(x)
    return run


def layer_providers(C, nh, r, on_gpu, device, dtype):
    """name -> callable x -> y, each a freshly initialised layer (weights in dtype)."""
    base = dict(n_embd=C, n_head=nh, block_size=1 << 14, bias=False, dropout=0.0)
    std = CausalSelfAttention(GPTConfig(**base, attn_backend="auto")).to(device, dtype)
    mla_cfg = dict(base, use_mla=True, mla_latent_dim=r)
    ref_mla = MultiHeadLatentAttention(GPTConfig(**mla_cfg, attn_backend="reference", mla_path="absorbed"))
    ref_mla = ref_mla.to(device, dtype)
    sdpa_backends = ("cudnn", "flash") if on_gpu else ("math",)
    out = {f"std_sdpa_{b}": _sdpa_layer(std, b) for b in sdpa_backends}
    out.update({f"mla_plain_{b}": PlainMLA(ref_mla, b) for b in sdpa_backends})
    out["mla_reference"] = ref_mla
    if on_gpu:
        for path in ("absorbed", "expanded"):
            layer = MultiHeadLatentAttention(GPTConfig(**mla_cfg, attn_backend="triton", mla_path=path))
            out[f"mla_triton_{path}"] = layer.to(device, dtype)
    return out


def bench_layers(args, on_gpu, device, dtype):
    rows = []
    for nh, hs in zip(args.heads, args.head_sizes):
        C = nh * hs
        for frac in args.latent_fracs:
            r = max(1, int(round(frac * hs)))
            for T in args.layer_seqlens:
                B = args.layer_batch
                for name, layer in layer_providers(C, nh, r, on_gpu, device, dtype).items():
                    if name == "mla_reference" and on_gpu and T > args.reference_max_t:
                        continue  # materializes (B, nh, T, T) scores in float32
                    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
                    row = dict(table="layer", provider=name, B=B, T=T, C=C, nh=nh, hs=hs, r=r)
                    try:
                        row.update(measure(lambda: layer(x), (x,), on_gpu))
                    except Exception as e:  # record and go on: one peer failing must not end the sweep
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    rows.append(row)
                    print(_fmt(row), flush=True)
                    del x
    return rows


# ----------------------------------------------------------------------------- output


def _fmt(row):
    dims = f"d {row['d']}" if row["table"] == "core" else f"C {row['C']} r {row['r']}"
    head = f"{row['table']:5s} {row['provider']:22s} B {row['B']:3d} T {row['T']:6d} nh {row['nh']:3d} {dims:12s}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    parts = []
    for key in ("fwd", "bwd", "fwd_bwd"):
        tf = row.get(f"{key}_tflops")
        parts.append(f"{key} {row[f'{key}_ms']:8.3f} ms" + (f" {tf:6.1f} TF/s" if tf is not None else "")
                     + f" {row[f'{key}_mb']:8.1f} MB")
    return head + " | " + " | ".join(parts)


def write_results(rows, meta, out):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    import csv

    for table in ("core", "layer"):
        sel = [r for r in rows if r["table"] == table]
        if not sel:
            continue
        keys = sorted({k for r in sel for k in r}, key=lambda k: (k not in sel[0], k))
        with open(f"{out}_{table}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(sel)
    with open(f"{out}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    core = [r for r in rows if r["table"] == "core" and "error" not in r]
    for prov, d in sorted({(r["provider"], r["d"]) for r in core}):
        pts = sorted((r["T"], r.get("fwd_bwd_tflops", r["fwd_bwd_ms"])) for r in core
                     if r["provider"] == prov and r["d"] == d)
        axes[0].plot(*zip(*pts), marker="o", label=f"{prov} d{d}")
    axes[0].set(xscale="log", xlabel="T", title="core fwd+bwd (TFLOP/s; ms on CPU)")
    layer = [r for r in rows if r["table"] == "layer" and "error" not in r]
    for prov, C, r_ in sorted({(r["provider"], r["C"], r["r"]) for r in layer}):
        pts = sorted((r["T"], r["fwd_bwd_mb"] if meta["gpu"] else r["fwd_bwd_ms"]) for r in layer
                     if r["provider"] == prov and r["C"] == C and r["r"] == r_)
        axes[1].plot(*zip(*pts), marker="o", label=f"{prov} C{C} r{r_}")
    axes[1].set(xscale="log", xlabel="T", title="layer fwd+bwd peak MB (ms on CPU)")
    for ax in axes:
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{meta['device']} {meta['dtype']} torch {meta['torch']} triton {meta['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="core sweep lengths")
    p.add_argument("--batch-tokens", type=int, default=16384, help="core: B = batch_tokens // T")
    p.add_argument("--core-heads", type=int, default=12)
    p.add_argument("--core-dims", type=int, nargs="+", default=None, help="core head dims")
    p.add_argument("--flex-dims", type=int, nargs="*", default=[64], help=FLEX_DIMS_HELP)
    p.add_argument("--heads", type=int, nargs="+", default=[12, 16], help="layer: heads, paired with --head-sizes")
    p.add_argument("--head-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--latent-fracs", type=float, nargs="+", default=[0.25, 0.5, 1.0, 3.0], help="r = frac * hs")
    p.add_argument("--layer-seqlens", type=int, nargs="+", default=None)
    p.add_argument("--layer-batch", type=int, default=4)
    p.add_argument("--reference-max-t", type=int, default=4096, help="skip the reference layer above this T")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--skip", nargs="*", default=[], choices=["core", "layer"])
    p.add_argument("--out", default=os.path.join("bench", "results", "attention"))
    args = p.parse_args(argv)
    if len(args.heads) != len(args.head_sizes):
        p.error(f"--heads {args.heads} and --head-sizes {args.head_sizes} must pair up")
    return args


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = getattr(torch, args.dtype)
    if not on_gpu:
        print("No GPU: running the reference paths at small sizes; kernel timings need a GPU.")
        dtype = torch.float32
        args.seqlens = args.seqlens or [128, 256]
        args.layer_seqlens = args.layer_seqlens or [128, 256]
        args.core_dims = args.core_dims or [32]
        args.batch_tokens = min(args.batch_tokens, 512)
        args.layer_batch = min(args.layer_batch, 2)
        args.latent_fracs = args.latent_fracs[:2]
    else:
        args.seqlens = args.seqlens or [1024, 2048, 4096, 8192, 16384]
        args.layer_seqlens = args.layer_seqlens or [1024, 4096, 16384]
        args.core_dims = args.core_dims or [16, 32, 64, 128]
    import triton

    meta = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", gpu=on_gpu,
                torch=torch.__version__, triton=triton.__version__, dtype=str(dtype), args=vars(args))
    print(json.dumps(meta))
    torch.manual_seed(0)
    rows = []
    if "core" not in args.skip:
        rows += bench_core(args, on_gpu, device, dtype)
        write_results(rows, meta, args.out)  # keep the core table should the layer sweep be cut short
    if "layer" not in args.skip:
        rows += bench_layers(args, on_gpu, device, dtype)
    write_results(rows, meta, args.out)
    print(f"wrote {args.out}_core.csv, {args.out}_layer.csv, {args.out}.json, {args.out}.png")


if __name__ == "__main__":
    main()
