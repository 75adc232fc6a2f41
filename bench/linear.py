"""The decode step's linear layers: mla_kernels.linear.decode_linear against cuBLAS, bf16 check and speed.

    python bench/linear.py [--rows 1 8 32 64] [--out PATH.json]
    python bench/linear.py --tiles [--rows 1 32] [--out PATH.json]

Shapes (GPT-2 small, C 768, B rows of one new token): the MLP's c_fc with its GELU (768 -> 3072),
its c_proj (3072 -> 768; MLA's joint-latent output projection, nh r 3072 -> 768, has this shape
too) and MLA r 32's composed output projection (nh r 384 -> 768). Providers:
  ours     decode_linear: one kernel, GELU in its epilogue, K split with the reduce in the kernel
  cublas   F.linear, then F.gelu where the layer has one: what the model ran before
Timed on a GPU replayed from a CUDA graph with the weights cold, as in a model's step: each graph
runs the layer over ROTATION_BYTES of weight copies, more than the L2 holds, so every launch reads
its weight from HBM. GB/s = weight bytes over time (the rows' bytes are under 1% of it). The
check compares both with float64 (pass: ours within 2x cuBLAS's own error + ERR_FLOOR). Rows (key
`table`): correctness, timing. --tiles (GPU only): every tile of TILE_CANDIDATES and programs per
multiprocessor of PROGRAMS_CANDIDATES, against the shipped ones (table `tiles`). Without a GPU it
runs in float32 at one row (the kernel through Triton's interpreter when TRITON_INTERPRET=1,
else its reference): the timings need a GPU.
"""
import argparse
import json

import harness  # first: it puts the repository root on sys.path
import torch
import torch.nn.functional as F

from mla_kernels import linear
from mla_kernels.linear import decode_linear

SHAPES = {"c_fc": (768, 3072, "gelu"), "c_proj": (3072, 768, None), "mla_out_r32": (384, 768, None)}  # (K, N, act)
GPU_ROWS, CPU_ROWS = [1, 8, 32, 64], [1]
ROTATION_BYTES = 160 * 2**20  # weight copies per timed graph: over 3x the H200's 50 MB L2
TILE_CANDIDATES = [(bn, bk, w, s) for bn in (16, 32, 64) for bk in (128, 256) for w, s in ((4, 3), (4, 4))]
PROGRAMS_CANDIDATES = (1, 2, 4)
TILE_REP_MS = 20  # do_bench_cudagraph's budget per candidate
ERR_FACTOR, ERR_FLOOR = 2, 1e-3
UNITS = {"rel_err": "", "rel_err_cublas": "", "passed": "", "us": "us", "GBps": "GB/s", "vs_cublas": ""}


def make(K, N, rows, device, dtype):
    x = torch.randn(rows, K, device=device, dtype=dtype)  # (rows, K)
    weight = torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5  # (N, K)
    return x, weight, torch.randn(N, device=device, dtype=dtype)


def cublas(x, weight, bias, activation):
    y = F.linear(x, weight, bias)
    return y if activation is None else F.gelu(y)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def correctness(device, dtype, rows):
    out = []
    for name, (K, N, activation) in SHAPES.items():
        for M in rows:
            x, weight, bias = make(K, N, M, device, dtype)
            ref = cublas(x.double(), weight.double(), bias.double(), activation)
            err, err_cublas = rel(decode_linear(x, weight, bias, activation), ref), rel(cublas(x, weight, bias,
                                                                                              activation), ref)
            out.append(dict(table="correctness", shape=name, rows=M, provider="ours", rel_err=err,
                            rel_err_cublas=err_cublas, passed=err <= ERR_FACTOR * err_cublas + ERR_FLOOR))
            print(f"  check {name:12s} M{M:<3d} ours {err:.2e}  cuBLAS {err_cublas:.2e}", flush=True)
    return out


def per_launch_us(launch, weight):
    """Microseconds per launch, replayed from a CUDA graph over cold weight copies (one on a CPU)."""
    if not harness.on_gpu():
        return harness.median_ms(lambda: launch(weight)) * 1e3
    copies = [weight.clone() for _ in range(max(2, ROTATION_BYTES // (weight.numel() * weight.element_size())))]
    launch(copies[0])  # compile before capture

    def rotation():
        for w in copies:
            launch(w)
    return harness.median_ms(rotation, graph=True, rep=TILE_REP_MS) * 1e3 / len(copies)


def timings(device, dtype, rows, tiles):
    out = []
    for name, (K, N, activation) in SHAPES.items():
        for M in rows:
            x, weight, bias = make(K, N, M, device, dtype)
            timed = {"ours": per_launch_us(lambda w: decode_linear(x, w, bias, activation), weight),
                     "cublas": per_launch_us(lambda w: cublas(x, w, bias, activation), weight)}
            for tile in TILE_CANDIDATES if tiles else ():
                for programs in PROGRAMS_CANDIDATES:
                    timed[f"{tile[0]}x{tile[1]}-w{tile[2]}-s{tile[3]}-p{programs}"] = per_launch_us(
                        lambda w, t=tile, p=programs: linear._linear_triton(x, w, bias, activation, t, p), weight)
            gb = weight.numel() * weight.element_size() / 1e9
            for provider, us in timed.items():
                out.append(dict(table="tiles" if tiles else "timing", shape=name, rows=M, provider=provider, us=us,
                                GBps=gb / (us * 1e-6), vs_cublas=timed["cublas"] / us))
            ranked = sorted(timed.items(), key=lambda kv: kv[1])
            print(f"  {name:12s} M{M:<3d} ours {timed['ours']:6.2f} us ({timed['cublas'] / timed['ours']:.2f}x "
                  f"cuBLAS {timed['cublas']:6.2f})" + ("; top 5: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked[:5])
                                                    if tiles else ""), flush=True)
    return out


def plot(rows, path):
    """Ours over cuBLAS's time per shape, by rows (timing rows only)."""
    rows = [r for r in rows if r["table"] == "timing" and r["provider"] == "ours"]
    if not rows:
        return
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        points = sorted((r["rows"], r["vs_cublas"]) for r in rows if r["shape"] == shape)
        ax.plot(*zip(*points), marker="o", label=shape)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (batch x new tokens)")
    ax.set_ylabel("speed vs cuBLAS (F.linear [+ F.gelu]), cold weights")
    ax.set_title(f"decode_linear, {rows[0]['gpu']}, {rows[0]['dtype']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help=f"rows per call (default {GPU_ROWS} on a GPU, {CPU_ROWS} on a CPU)")
    parser.add_argument("--tiles", action="store_true", help="the tile sweep instead (GPU only)")
    harness.add_out_argument(parser, "linear")
    args = parser.parse_args()
    gpu = harness.on_gpu()
    if args.tiles and not gpu:
        raise SystemExit("--tiles times tile candidates on the GPU: no CUDA device here")
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        print("no GPU: float32 on the CPU; the timings need a GPU (tests/test_linear_kernel.py checks the kernel)")
    env = harness.environment(dtype)
    print(json.dumps(env), flush=True)
    rows = args.rows or (([1, 32] if args.tiles else GPU_ROWS) if gpu else CPU_ROWS)
    measured = timings(device, dtype, rows, tiles=True) if args.tiles else (
        correctness(device, dtype, rows) + timings(device, dtype, rows, tiles=False))
    harness.write_results(harness.results_path(args.out, "linear"), harness.result_rows("linear", measured, UNITS, env),
                          plot=plot)


if __name__ == "__main__":
    main()
