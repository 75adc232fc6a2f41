"""Speed and memory of causal attention for training: the MLA kernels against PyTorch's own.

    python bench/attention.py                      # default sweep (GPU) or a small CPU run
    python bench/attention.py --seqlens 1024 4096 --batch_tokens 16384 --heads 12 --head_sizes 64 \
        --latent_fracs 0.5 --out bench/results/attention_h200.json

Two tables:
- core: the bare causal attention at one head dim: our `flash_attention` (the latent-space
  core) against SDPA's cuDNN and flash (FA2) backends and FlexAttention, at the same shape.
  FLOPs: 2 B nh T^2 (Dqk + Dv) / 2 forward (causal halves), backward 2.5x forward.
- layer: whole attention layers (x (B, T, C) -> (B, T, C)): the standard layer on SDPA
  (cuDNN, flash), the MLA layer written in plain PyTorch (absorbed form: composed weights,
  SDPA at head dim r with GQA; the strongest peer that needs no custom kernel), and
  `MultiHeadLatentAttention` on the reference path and on the kernels (absorbed, expanded).
For each: forward, backward and forward+backward median ms (`harness.median_ms`), TFLOP/s
(core only) and peak MB allocated above the inputs. Writes the rows (key `table`: core or layer)
to the results JSON and <stem>.png beside it.
Without a GPU it runs the reference paths at small sizes: kernel timings need a GPU.
"""
import argparse
import json
import math

import harness  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mla_gpt.model.attention import CausalSelfAttention, MultiHeadLatentAttention
from mla_gpt.model.config import GPTConfig
from mla_kernels import reference
from mla_kernels.attention import flash_attention

BWD_FLOP_FACTOR = 2.5  # backward of attention: 5 matmuls of the 2 in the forward
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
ERROR_CHARS = 120  # a failed provider's row keeps the first line of its error, this long at most
UNITS = {**{f"{step}_{metric}": unit for step in ("fwd", "bwd", "fwd_bwd")
            for metric, unit in (("ms", "ms"), ("mb", "MB"), ("tflops", "TFLOP/s"))}, "error": ""}


# ----------------------------------------------------------------------------- timing


def _peak_mb(fn, on_gpu):
    """Peak device memory allocated while fn runs, above what was allocated before (MB)."""
    if not on_gpu:
        return None
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
        res[f"{name}_ms"] = harness.median_ms(fn)
        res[f"{name}_mb"] = _peak_mb(fn, on_gpu)
    return res


def measure_or_error(forward, inputs, on_gpu):
    """measure(), or {'error': its first line} when a peer backend does not support the shape."""
    try:
        return measure(forward, inputs, on_gpu)
    except Exception as e:  # a peer failing is a result: the sweep goes on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:ERROR_CHARS]}"}


# ----------------------------------------------------------------------------- core


def _sdpa_core(backend):
    """SDPA on one backend (a name of SDPA_BACKENDS), causal, GQA when k has fewer heads."""

    def run(q, k, v):  # (B, T, nh, D) layouts, like flash_attention
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)
    return run


def _flex_core():
    """FlexAttention with a causal block mask (one per length), compiled."""
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
    """name -> attention core (q, k, v) -> out, (B, T, nh, D) layouts; reference paths on a CPU."""
    if not on_gpu:
        return {"reference": lambda q, k, v: reference.attention_ref(q, k, v)[0],
                "sdpa_math": _sdpa_core("math")}
    return {"triton": flash_attention, "sdpa_cudnn": _sdpa_core("cudnn"),
            "sdpa_flash": _sdpa_core("flash"), "flex": _flex_core()}


FLEX_DIMS_HELP = "head dims at which FlexAttention runs (each shape costs a torch.compile)"


def core_row(name, fn, B, T, nh, d, on_gpu, device, dtype):
    """One provider at one core shape: ms, MB and TFLOP/s of forward, backward and both."""
    q, k, v = (torch.randn(B, T, nh, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    row = dict(table="core", provider=name, B=B, T=T, nh=nh, d=d)
    row.update(measure_or_error(lambda: fn(q, k, v), (q, k, v), on_gpu))
    fwd_flops = 2 * B * nh * T * T * (2 * d) / 2
    for key, flops in (("fwd", fwd_flops), ("bwd", BWD_FLOP_FACTOR * fwd_flops),
                       ("fwd_bwd", (1 + BWD_FLOP_FACTOR) * fwd_flops)):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
    return row


def bench_core(args, on_gpu, device, dtype):
    """Every core provider at every head dim and length (B = batch_tokens // T)."""
    rows = []
    providers = core_providers(on_gpu)
    for d in args.core_dims:
        for T in args.seqlens:
            B = max(1, args.batch_tokens // T)
            for name, fn in providers.items():
                if name == "flex" and d not in args.flex_dims:
                    continue
                rows.append(core_row(name, fn, B, T, args.core_heads, d, on_gpu, device, dtype))
                print(_fmt(rows[-1]), flush=True)
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
    """layer(x) with SDPA restricted to one backend."""

    def run(x):
        with sdpa_kernel(SDPA_BACKENDS[backend]):
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


def layer_row(name, layer, B, T, C, nh, hs, r, on_gpu, device, dtype):
    """One layer at one shape: ms and MB of forward, backward and both."""
    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    row = dict(table="layer", provider=name, B=B, T=T, C=C, nh=nh, hs=hs, r=r)
    row.update(measure_or_error(lambda: layer(x), (x,), on_gpu))
    return row


def bench_layers(args, on_gpu, device, dtype):
    """Every layer provider at every (heads, head size), latent fraction and length."""
    rows = []
    for nh, hs in zip(args.heads, args.head_sizes):
        C = nh * hs
        for frac in args.latent_fracs:
            r = max(1, int(round(frac * hs)))
            for T in args.layer_seqlens:
                for name, layer in layer_providers(C, nh, r, on_gpu, device, dtype).items():
                    if name == "mla_reference" and on_gpu and T > args.reference_max_t:
                        continue  # materializes (B, nh, T, T) scores in float32
                    rows.append(layer_row(name, layer, args.layer_batch, T, C, nh, hs, r, on_gpu, device, dtype))
                    print(_fmt(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- output


def _fmt(row):
    """One printed line per row."""
    dims = f"d {row['d']}" if row["table"] == "core" else f"C {row['C']} r {row['r']}"
    head = f"{row['table']:5s} {row['provider']:22s} B {row['B']:3d} T {row['T']:6d} nh {row['nh']:3d} {dims:12s}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    parts = []
    for key in ("fwd", "bwd", "fwd_bwd"):
        tf = row.get(f"{key}_tflops")
        mb = row[f"{key}_mb"]
        parts.append(f"{key} {row[f'{key}_ms']:8.3f} ms" + (f" {tf:6.1f} TF/s" if tf is not None else "")
                     + (f" {mb:8.1f} MB" if mb is not None else ""))
    return head + " | " + " | ".join(parts)


def plot(rows, path):
    """Core fwd+bwd TFLOP/s and layer fwd+bwd peak MB against T (ms for both on a CPU)."""
    plt = harness.pyplot()
    first = rows[0]
    on_gpu = first["gpu"] != "cpu"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    core = [r for r in rows if r["table"] == "core" and "error" not in r]
    for prov, d in sorted({(r["provider"], r["d"]) for r in core}):
        pts = sorted((r["T"], r["fwd_bwd_tflops"] if on_gpu else r["fwd_bwd_ms"]) for r in core
                     if r["provider"] == prov and r["d"] == d)
        axes[0].plot(*zip(*pts), marker="o", label=f"{prov} d{d}")
    axes[0].set(xscale="log", xlabel="T", title="core fwd+bwd (TFLOP/s; ms on CPU)")
    layer = [r for r in rows if r["table"] == "layer" and "error" not in r]
    for prov, C, r_ in sorted({(r["provider"], r["C"], r["r"]) for r in layer}):
        pts = sorted((r["T"], r["fwd_bwd_mb"] if on_gpu else r["fwd_bwd_ms"]) for r in layer
                     if r["provider"] == prov and r["C"] == C and r["r"] == r_)
        axes[1].plot(*zip(*pts), marker="o", label=f"{prov} C{C} r{r_}")
    axes[1].set(xscale="log", xlabel="T", title="layer fwd+bwd peak MB (ms on CPU)")
    for ax in axes:
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{first['gpu']} {first['dtype']} torch {first['torch']} triton {first['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="core sweep lengths")
    p.add_argument("--batch_tokens", type=int, default=16384, help="core: B = batch_tokens // T")
    p.add_argument("--core_heads", type=int, default=12)
    p.add_argument("--core_dims", type=int, nargs="+", default=None, help="core head dims")
    p.add_argument("--flex_dims", type=int, nargs="*", default=[64], help=FLEX_DIMS_HELP)
    p.add_argument("--heads", type=int, nargs="+", default=[12, 16], help="layer: heads, paired with --head_sizes")
    p.add_argument("--head_sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--latent_fracs", type=float, nargs="+", default=[0.25, 0.5, 1.0, 3.0], help="r = frac * hs")
    p.add_argument("--layer_seqlens", type=int, nargs="+", default=None)
    p.add_argument("--layer_batch", type=int, default=4)
    p.add_argument("--reference_max_t", type=int, default=4096, help="skip the reference layer above this T")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--skip", nargs="*", default=[], choices=["core", "layer"])
    harness.add_out_argument(p, "attention")
    args = p.parse_args(argv)
    if len(args.heads) != len(args.head_sizes):
        p.error(f"--heads {args.heads} and --head_sizes {args.head_sizes} must pair up")
    return args


def small_cpu_settings(args):
    """Without a GPU: float32 reference paths at lengths 64 and 128, the first layer shape and
    latent fraction only."""
    print("No GPU: running the reference paths at small sizes; kernel timings need a GPU.")
    args.seqlens = args.seqlens or [64, 128]
    args.layer_seqlens = args.layer_seqlens or [64, 128]
    args.core_dims = args.core_dims or [32]
    args.batch_tokens = min(args.batch_tokens, 256)
    args.layer_batch = min(args.layer_batch, 2)
    args.heads, args.head_sizes = args.heads[:1], args.head_sizes[:1]
    args.latent_fracs = args.latent_fracs[:1]
    return torch.float32


def main(argv=None):
    args = parse_args(argv)
    on_gpu = harness.on_gpu()
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        dtype = getattr(torch, args.dtype)
        args.seqlens = args.seqlens or [1024, 2048, 4096, 8192, 16384]
        args.layer_seqlens = args.layer_seqlens or [1024, 4096, 16384]
        args.core_dims = args.core_dims or [16, 32, 64, 128]
    else:
        dtype = small_cpu_settings(args)
    env = harness.environment(dtype)
    print(json.dumps(env), flush=True)
    path = harness.results_path(args.out, "attention")
    torch.manual_seed(0)
    rows = []
    if "core" not in args.skip:
        rows += bench_core(args, on_gpu, device, dtype)
        harness.write_results(path, harness.result_rows("attention", rows, UNITS, env))  # kept if layers fail
    if "layer" not in args.skip:
        rows += bench_layers(args, on_gpu, device, dtype)
    harness.write_results(path, harness.result_rows("attention", rows, UNITS, env), plot)

if __name__ == "__main__":
    main()
