"""Speed and memory of causal attention for training: the MLA kernels against PyTorch's own.

    python bench/attention.py                 # GPU: the default sweep, about two minutes on an H200
    python bench/attention.py --full          # GPU: every length, shape, latent and FlexAttention row
    python bench/attention.py --seqlens 4096 --core_shapes d64 d32-kv1 --skip layer --out PATH.json

Two tables, every provider at the same shape, one progress line per row:
- core: bare causal attention, B = --batch_tokens // T, --core_heads query heads. A core shape is
  `d<D>` (q, k, v head dim D), `-dv<Dv>` for another value head dim, `-kv<g>` for g KV heads (GQA;
  `d32-kv1` is MLA's absorbed core at the defaults: 12 query heads on one latent of 32).
  Providers: `triton` (this project's `flash_attention`), `sdpa_cudnn` and `sdpa_flash` (SDPA on
  its cuDNN and flash backends) and `flex` (FlexAttention with its causal block mask under
  torch.compile, at --flex_shapes only: each shape costs a compile; a shape it cannot compile
  is an error, never an unfused fallback). FLOPs: 2 B nh T^2 (Dqk + Dv) / 2 forward, 2.5x that
  backward.
- layer: whole attention layers, x (B, T, C) -> (B, T, C), B = --layer_batch, C = heads x head
  size, each --latents spec `[g<G>-]r<R>[-joint]` an MLA latent (g defaults to the head count;
  `r192` is config/train_mla_custom.py's attention, `g1-r256-joint` one joint latent).
  Providers: `std_sdpa_<backend>` (standard attention on SDPA), `mla_plain_<backend>` (MLA in
  plain PyTorch: composed weights, SDPA at head dim r with GQA), `mla_<sdpa|triton>_<form>`
  (`MultiHeadLatentAttention` on that backend with each form of `GPTConfig.mla_path` forced),
  `mla_auto` (its defaults) and `mla_reference` (up to --reference_max_t).
Per row: `fwd_ms` (forward under no_grad), `bwd_ms` (backward alone), `fwd_bwd_ms` (a training
step), each timed eagerly (`triton.testing.do_bench`: what an uncompiled caller pays, launch gaps
included), `fwd_bwd_graph_ms` (the same step replayed from a CUDA graph: device time), peak MB
above the inputs (`fwd_mb`, `bwd_mb`, `fwd_bwd_mb`), core TFLOP/s (`*_tflops`), and the ratio to
the table's baseline, `sdpa_cudnn` or `std_sdpa_cudnn` (`fwd_bwd_vs_cudnn`, `fwd_bwd_vs_std` and
their `_graph_` twins: above 1 is faster). A provider that cannot run a shape gets an `error`.
Without a GPU it runs the reference paths at small sizes: kernel timings need a GPU.
"""
import argparse
import math
import re

import harness  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mla_gpt.model.attention import CausalSelfAttention, MultiHeadLatentAttention
from mla_gpt.model.config import MLA_PATHS, GPTConfig
from mla_kernels import reference
from mla_kernels.attention import flash_attention

BWD_FLOP_FACTOR = 2.5  # backward of attention: 5 matmuls of the 2 in the forward
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
BASELINES = {"core": ("sdpa_cudnn", "cudnn"), "layer": ("std_sdpa_cudnn", "std")}  # table -> (provider, ratio name)
ERROR_CHARS = 120  # a failed provider's row keeps the first line of its error, this long at most
WARMUP_MS, REP_MS = 10, 50  # do_bench per eager timing
GRAPH_REP_MS = 20  # do_bench_cudagraph replays a graph of about this many ms of calls 10 times
FLEX_RECOMPILE_LIMIT = 64  # compiled FlexAttention specializes on every shape and grad mode
SWEEPS = {  # --full or not on a GPU, and the CPU's small run; a flag given on the command line wins
    "default": dict(seqlens=[1024, 4096, 16384], core_shapes=["d16", "d32", "d64", "d128", "d32-kv1", "d192-dv128"],
                    flex_shapes=["d64"], batch_tokens=16384, layer_seqlens=[1024, 4096], heads=[12],
                    head_sizes=[64], latents=["r32", "r192", "g1-r256-joint"], layer_batch=4, reference_max_t=0),
    "full": dict(seqlens=[1024, 2048, 4096, 8192, 16384],
                 core_shapes=["d16", "d32", "d64", "d128", "d32-kv1", "d64-kv1", "d192-dv128", "d64-dv32"],
                 flex_shapes=["d16", "d32", "d64", "d128", "d32-kv1"], batch_tokens=16384,
                 layer_seqlens=[1024, 4096, 16384], heads=[12, 16], head_sizes=[64, 128],
                 latents=["r16", "r32", "r64", "r192", "g1-r256-joint"], layer_batch=4, reference_max_t=4096),
    "cpu": dict(seqlens=[64, 128], core_shapes=["d32", "d32-kv1", "d64-dv32"], flex_shapes=[], batch_tokens=256,
                layer_seqlens=[64], heads=[4], head_sizes=[32], latents=["r16", "g1-r64-joint"], layer_batch=2,
                reference_max_t=128),
}
CORE_SHAPE = re.compile(r"d(\d+)(?:-dv(\d+))?(?:-kv(\d+))?")
LATENT = re.compile(r"(?:g(\d+)-)?r(\d+)(-joint)?")
STEPS = ("fwd", "bwd", "fwd_bwd")
UNITS = {**{f"{step}_{metric}": unit for step in STEPS for metric, unit in (("ms", "ms"), ("mb", "MB"))},
         "fwd_bwd_graph_ms": "ms", **{f"{step}_tflops": "TFLOP/s" for step in (*STEPS, "fwd_bwd_graph")},
         **{f"fwd_bwd{graph}_vs_{name}": "" for graph in ("", "_graph") for _, name in BASELINES.values()},
         "error": "", "graph_error": ""}


# ----------------------------------------------------------------------------- timing


def _error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:ERROR_CHARS] if str(e) else ''}"


def _peak_mb(fn):
    """Peak device memory allocated while fn runs, above what was allocated before (MB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def randn(*shape, device, dtype, requires_grad=False):
    """A random tensor drawn on the host and moved: a capture that fails leaves the CUDA generator
    unusable for the rest of the process, and the rows after it still need inputs."""
    return torch.randn(*shape).to(device, dtype).requires_grad_(requires_grad)


def measure(forward, inputs, on_gpu):
    """forward(): output tensor from the leaves `inputs` (requires_grad). -> ms (and MB on a GPU) of
    the forward, the backward and both eagerly, and on a GPU both replayed from a CUDA graph.

    The capture comes first, after one eager step (autotuning and compiling stay outside it), with
    no other autograd graph of the inputs alive, as bench/tiles.py and bench/backends.py capture."""
    with torch.no_grad():
        like = forward()
    dout = randn(*like.shape, device=like.device, dtype=like.dtype)

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        forward().backward(dout)

    res = {}
    fwd_bwd()
    if on_gpu:
        try:  # a provider that runs eagerly but cannot be captured keeps its eager numbers
            res["fwd_bwd_graph_ms"] = harness.median_ms(fwd_bwd, graph=True, rep=GRAPH_REP_MS)
        except Exception as e:  # noqa: BLE001 - a capture failing is a result
            res["graph_error"] = _error(e)
    out = forward()

    def bwd():
        out.backward(dout, retain_graph=True)

    for name, fn in zip(STEPS, (fwd, bwd, fwd_bwd)):
        for x in inputs:
            x.grad = None
        res[f"{name}_ms"] = harness.median_ms(fn, warmup=WARMUP_MS, rep=REP_MS)
        if on_gpu:
            res[f"{name}_mb"] = _peak_mb(fn)
    return res


def measure_or_error(build, on_gpu):
    """build() -> (forward, inputs); measure() them, or {'error': ...} when the provider cannot run
    the shape (a peer backend refusing it, a form the model does not offer there)."""
    try:
        return measure(*build(), on_gpu)
    except Exception as e:  # noqa: BLE001 - a peer failing is a result: the sweep goes on
        return {"error": _error(e)}


# ----------------------------------------------------------------------------- core


def _sdpa_core(backend):
    """SDPA on one backend (a name of SDPA_BACKENDS), causal, GQA when k has fewer heads."""

    def run(q, k, v):  # (B, T, nh, D) layouts, like flash_attention
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)
    return run


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex_core():
    """FlexAttention with a causal block mask (one per length) under torch.compile. Past the
    recompile limit dynamo would run it uncompiled, materializing the scores; here that raises."""
    import torch._functorch.config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # the backward-alone timing replays one graph's backward (retain_graph): a compiled backward
    # may do so only without donated buffers (the H200 run failed every d64 row on them)
    functorch_config.donated_buffer = False
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v):
        T = q.shape[1]
        if T not in masks:
            masks[T] = create_block_mask(_causal, None, None, T, T, device=q.device)
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[T],
                         enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)
    return run


def core_providers(on_gpu):
    """name -> attention core (q, k, v) -> out, (B, T, nh, D) layouts; the baseline first (the
    ratios need it), reference paths on a CPU."""
    if not on_gpu:
        return {"reference": lambda q, k, v: reference.attention_ref(q, k, v)[0], "sdpa_math": _sdpa_core("math")}
    return {"sdpa_cudnn": _sdpa_core("cudnn"), "triton": flash_attention, "sdpa_flash": _sdpa_core("flash"),
            "flex": _flex_core()}


def parse_core_shape(spec, nh):
    """'d64' -> (d, dv, kv_heads) = (64, 64, nh); 'd192-dv128' and 'd32-kv1' as the docstring says."""
    m = CORE_SHAPE.fullmatch(spec)
    if m is None:
        raise ValueError(f"core shape {spec!r} is not d<D>[-dv<Dv>][-kv<g>] (e.g. d64, d192-dv128, d32-kv1)")
    d, dv, kv = int(m[1]), int(m[2] or m[1]), int(m[3] or nh)
    if nh % kv:
        raise ValueError(f"core shape {spec!r}: {kv} KV heads do not divide --core_heads {nh}")
    return d, dv, kv


def core_cases(args, on_gpu, device, dtype):
    """(table, provider, shape, build) per core row: each shape at each length, every provider."""
    cases, providers = [], core_providers(on_gpu)
    for spec in args.core_shapes:
        d, dv, kv = parse_core_shape(spec, args.core_heads)
        for T in args.seqlens:
            B = max(1, args.batch_tokens // T)
            shape = dict(B=B, T=T, nh=args.core_heads, kv_heads=kv, d=d, dv=dv)
            for name, fn in providers.items():
                if name == "flex" and spec not in args.flex_shapes:
                    continue

                def build(fn=fn, B=B, T=T, kv=kv, d=d, dv=dv):
                    q = randn(B, T, args.core_heads, d, device=device, dtype=dtype, requires_grad=True)
                    k = randn(B, T, kv, d, device=device, dtype=dtype, requires_grad=True)
                    v = randn(B, T, kv, dv, device=device, dtype=dtype, requires_grad=True)
                    return (lambda: fn(q, k, v)), (q, k, v)
                cases.append(("core", name, shape, build))
    return cases


def add_tflops(row):
    """Core TFLOP/s of every time in the row (causal FLOPs, see __doc__)."""
    fwd = 2 * row["B"] * row["nh"] * row["T"] ** 2 * (row["d"] + row["dv"]) / 2
    flops = {"fwd": fwd, "bwd": BWD_FLOP_FACTOR * fwd, "fwd_bwd": (1 + BWD_FLOP_FACTOR) * fwd,
             "fwd_bwd_graph": (1 + BWD_FLOP_FACTOR) * fwd}
    for step, n in flops.items():
        if f"{step}_ms" in row:
            row[f"{step}_tflops"] = n / row[f"{step}_ms"] / 1e9


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
        proj = F.linear(x, torch.cat([w_q, m.kv_latent_proj.weight]))  # (B, T, nh r + (2|1) g r)
        q_lat = proj[..., : nh * r].view(B, T, nh, r)
        lat = proj[..., nh * r:].view(B, T, -1, g, r)
        c_k, c_v = lat[:, :, 0], lat[:, :, -1]  # (B, T, g, r); the same latent when joint
        q_lat = q_lat * (math.sqrt(r) / math.sqrt(hs))  # SDPA scales by 1/sqrt(r); MLA's scale is 1/sqrt(hs)
        o_lat = self.core(q_lat, c_k, c_v)  # (B, T, nh, r)
        w_o = torch.einsum("chd,hkd->chk", m.c_proj.weight.view(C, nh, hs), w_uv).reshape(C, nh * r)
        return F.linear(o_lat.reshape(B, T, nh * r), w_o)


class OnSDPABackend(torch.nn.Module):
    """A layer whose SDPA calls are restricted to one backend (a name of SDPA_BACKENDS)."""

    def __init__(self, layer, backend):
        super().__init__()
        self.layer, self.backend = layer, backend

    def forward(self, x):
        with sdpa_kernel(SDPA_BACKENDS[self.backend]):
            return self.layer(x)


def parse_latent(spec, nh):
    """'r32' -> (g, r, joint) = (nh, 32, False); 'g1-r256-joint' -> (1, 256, True)."""
    m = LATENT.fullmatch(spec)
    if m is None:
        raise ValueError(f"latent {spec!r} is not [g<G>-]r<R>[-joint] (e.g. r32, r192, g1-r256-joint)")
    g, r, joint = int(m[1] or nh), int(m[2]), m[3] is not None
    if nh % g:
        raise ValueError(f"latent {spec!r}: {g} groups do not divide {nh} heads")
    return g, r, joint


def layer_factories(C, nh, g, r, joint, on_gpu):
    """name -> zero-argument factory of the layer module (x -> y); each form of GPTConfig.mla_path is a row."""
    base = dict(n_embd=C, n_head=nh, block_size=1 << 14, bias=False, dropout=0.0)
    mla = dict(base, use_mla=True, mla_latent_dim=r, mla_kv_groups=g, mla_joint_kv=joint)
    backends = ("cudnn", "flash") if on_gpu else ("math",)
    forms = [path for path in MLA_PATHS if path != "auto"]

    def std(backend):
        return OnSDPABackend(CausalSelfAttention(GPTConfig(**base)), backend)

    def model(**keys):
        return MultiHeadLatentAttention(GPTConfig(**mla, **keys))

    out = {f"std_sdpa_{b}": (lambda b=b: std(b)) for b in backends}
    out.update({f"mla_plain_{b}": (lambda b=b: PlainMLA(model(attn_backend="reference"), b)) for b in backends})
    for backend in ("sdpa", "triton") if on_gpu else ("sdpa",):
        out.update({f"mla_{backend}_{form}": (lambda backend=backend, form=form: model(attn_backend=backend,
                                                                                      mla_path=form))
                    for form in forms})
    if on_gpu:
        out["mla_auto"] = model
    out["mla_reference"] = lambda: model(attn_backend="reference", mla_path="absorbed")
    return out


def layer_cases(args, on_gpu, device, dtype):
    """(table, provider, shape, build) per layer row: every head shape, latent, length and provider."""
    cases = []
    for nh, hs in zip(args.heads, args.head_sizes):
        C = nh * hs
        for spec in args.latents:
            g, r, joint = parse_latent(spec, nh)
            for T in args.layer_seqlens:
                shape = dict(B=args.layer_batch, T=T, C=C, nh=nh, hs=hs, g=g, r=r, joint=joint)
                for name, factory in layer_factories(C, nh, g, r, joint, on_gpu).items():
                    if name == "mla_reference" and T > args.reference_max_t:
                        continue  # materializes (B, nh, T, T) scores in float32

                    def build(factory=factory, T=T, C=C):
                        layer = factory().to(device, dtype)
                        x = randn(args.layer_batch, T, C, device=device, dtype=dtype, requires_grad=True)
                        return (lambda: layer(x)), (x,)
                    cases.append(("layer", name, shape, build))
    return cases


# ----------------------------------------------------------------------------- the sweep


def add_ratios(row, rows):
    """The table's baseline provider's time over this row's, eager and graph (above 1: faster)."""
    baseline, name = BASELINES[row["table"]]
    shape = {k: v for k, v in row.items() if k not in UNITS and k != "provider"}
    base = next((r for r in rows if r["provider"] == baseline
                 and {k: v for k, v in r.items() if k not in UNITS and k != "provider"} == shape), None)
    for graph in ("", "_graph"):
        key = f"fwd_bwd{graph}_ms"
        if base is not None and key in base and key in row:
            row[f"fwd_bwd{graph}_vs_{name}"] = base[key] / row[key]


def dims(row):
    """A row's shape as its spec reads: core 'd64', 'd32-kv1', 'd192-dv128'; layer 'C768 g12 r32'."""
    if row["table"] == "core":
        return f"d{row['d']}" + (f"-dv{row['dv']}" if row["dv"] != row["d"] else "") + (
            f"-kv{row['kv_heads']}" if row["kv_heads"] != row["nh"] else "")
    return f"C{row['C']} g{row['g']} r{row['r']}" + (" joint" if row["joint"] else "")


def progress(i, n, row):
    """`[3/40] core triton d64 T4096 B4 ... fwd 0.41 ms bwd 1.02 ms fwd+bwd 1.50 ms graph 1.32 ms ...`"""
    head = f"[{i}/{n}] {row['table']} {row['provider']} {dims(row)} T{row['T']} B{row['B']} ..."
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    parts = [f"fwd {row['fwd_ms']:.3f} ms", f"bwd {row['bwd_ms']:.3f} ms", f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms"]
    if "fwd_bwd_graph_ms" in row:
        parts.append(f"graph {row['fwd_bwd_graph_ms']:.3f} ms")
    if "fwd_bwd_graph_tflops" in row:
        parts.append(f"{row['fwd_bwd_graph_tflops']:.0f} TF/s")
    _, name = BASELINES[row["table"]]
    if f"fwd_bwd_graph_vs_{name}" in row:
        parts.append(f"{row[f'fwd_bwd_graph_vs_{name}']:.2f}x {name}")
    if "graph_error" in row:
        parts.append(f"graph ERROR {row['graph_error']}")
    return f"{head} " + " ".join(parts)


def run_cases(cases, on_gpu, save):
    """Measure every case in order, printing a progress line per row; save(rows) after each table,
    so a sweep cut short keeps the tables it finished."""
    rows = []
    for i, (table, provider, shape, build) in enumerate(cases, 1):
        row = dict(table=table, provider=provider, **shape, **measure_or_error(build, on_gpu))
        if table == "core":
            add_tflops(row)
        add_ratios(row, rows)
        rows.append(row)
        print(progress(i, len(cases), row), flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
        if i < len(cases) and cases[i][0] != table:
            save(rows)
    return rows


def plot(rows, path):
    """Core fwd+bwd TFLOP/s and layer fwd+bwd ms against T, from CUDA-graph replay where the file
    has it (else eager; ms for both on a CPU)."""
    plt = harness.pyplot()
    first = rows[0]
    on_gpu = first["gpu"] != "cpu"
    step = "fwd_bwd_graph" if any("fwd_bwd_graph_ms" in r for r in rows) else "fwd_bwd"
    how = "CUDA-graph replay" if step == "fwd_bwd_graph" else "eager"
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    panels = [("core", f"{step}_tflops" if on_gpu else f"{step}_ms",
               f"core fwd+bwd, {how} ({'TFLOP/s' if on_gpu else 'ms'})"),
              ("layer", f"{step}_ms", f"layer fwd+bwd, {how} (ms)")]
    for ax, (table, metric, title) in zip(axes, panels):
        measured = [r for r in rows if r["table"] == table and metric in r]
        for label in dict.fromkeys(f"{r['provider']} {dims(r)}" for r in measured):
            pts = sorted((r["T"], r[metric]) for r in measured if f"{r['provider']} {dims(r)}" == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log" if table == "layer" else "linear", xlabel="T", title=title)
        if measured:
            ax.legend(fontsize=5, ncol=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{first['gpu']} {first['dtype']} torch {first['torch']} triton {first['triton']} "
                 f"at {first['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full sweep (SWEEPS['full']) instead of the default")
    p.add_argument("--seqlens", type=int, nargs="+", help="core lengths")
    p.add_argument("--batch_tokens", type=int, help="core: B = batch_tokens // T")
    p.add_argument("--core_heads", type=int, default=12, help="core: query heads")
    p.add_argument("--core_shapes", nargs="+", help="core: d<D>[-dv<Dv>][-kv<g>] each")
    p.add_argument("--flex_shapes", nargs="*", help="the core shapes FlexAttention runs at (each costs a compile)")
    p.add_argument("--heads", type=int, nargs="+", help="layer: heads, paired with --head_sizes")
    p.add_argument("--head_sizes", type=int, nargs="+")
    p.add_argument("--latents", nargs="+", help="layer: MLA latents, [g<G>-]r<R>[-joint] each")
    p.add_argument("--layer_seqlens", type=int, nargs="+")
    p.add_argument("--layer_batch", type=int)
    p.add_argument("--reference_max_t", type=int, help="skip the reference layer above this T")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="GPU dtype (CPU: float32)")
    p.add_argument("--skip", nargs="*", default=[], choices=["core", "layer"])
    harness.add_out_argument(p, "attention")
    args = p.parse_args(argv)
    sweep = "full" if args.full else "default"
    if not harness.on_gpu():
        print(f"No GPU: the small CPU run{' (--full needs a GPU)' if args.full else ''} on the reference paths; "
              "kernel timings need a GPU.", flush=True)
        sweep = "cpu"
    for key, value in SWEEPS[sweep].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.heads) != len(args.head_sizes):
        p.error(f"--heads {args.heads} and --head_sizes {args.head_sizes} must pair up")
    unknown = [s for s in args.flex_shapes if s not in args.core_shapes]
    if unknown:
        p.error(f"--flex_shapes {unknown} are not among --core_shapes {args.core_shapes}")
    try:
        for spec in args.core_shapes:
            parse_core_shape(spec, args.core_heads)
        for spec in args.latents:
            for nh in args.heads:
                parse_latent(spec, nh)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    on_gpu = harness.on_gpu()
    device = "cuda" if on_gpu else "cpu"
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32
    env = harness.environment(dtype)
    path = harness.results_path(args.out, "attention")
    torch.manual_seed(0)
    cases = []
    if "core" not in args.skip:
        cases += core_cases(args, on_gpu, device, dtype)
    if "layer" not in args.skip:
        cases += layer_cases(args, on_gpu, device, dtype)
    print(f"{len(cases)} rows on {env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}",
          flush=True)
    rows = run_cases(cases, on_gpu, lambda rows: harness.write_results(
        path, harness.result_rows("attention", rows, UNITS, env)))
    harness.write_results(path, harness.result_rows("attention", rows, UNITS, env), plot)


if __name__ == "__main__":
    main()
