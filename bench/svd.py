"""Randomized SVD benchmark: mla_kernels.svd against torch.svd_lowrank and torch.linalg.svd.

For each (batch, m, n, rank): median time (ms) of each provider and the relative
reconstruction error ||A - U S Vh||_F / ||A||_F of the rank-`rank` result, next to the
optimal (known: A is built with prescribed singular values). Float32 correctness of the
kernels against the float64 reference comes first. Then, on a GPU, where the time of the
kernels goes (breakdown), and the MLA layer's forward+backward with use_svd in each mode
against none.

    python bench/svd.py [--out PATH.json]

Rows (key `table`): correctness, shape, breakdown (`part`: a piece of the kernels' time), model;
<stem>.png the times per shape. Without a GPU it runs small shapes (the kernels through
Triton's interpreter when TRITON_INTERPRET=1, else their reference) and no breakdown: the
numbers need a GPU.
"""
import argparse
import json
import time
import traceback

import harness  # first: it puts the repository root on sys.path
import torch

from mla_kernels import svd
from mla_kernels.reference import randomized_svd_ref

GPU_SHAPES = [(96, 1024, 64, 16), (12, 4096, 128, 32), (1, 4096, 4096, 256), (1, 4096, 4096, 32)]
CPU_SHAPES = [(4, 128, 32, 8), (1, 256, 256, 16)]
CHECK_ONLY_SHAPE = (3, 77, 48, 8)  # off the tile sizes, checked but not timed
BF16_MAX_ELEMENTS = 1 << 20  # bf16 inputs are checked on matrices up to this size
OVERSAMPLE, N_ITER = 8, 2
SLOW_MS = 250  # calls slower than this (torch.linalg.svd of 4096 x 4096) are timed once
GPU_MODEL_SHAPE, CPU_MODEL_SHAPE = (16, 1024, 768, 12), (2, 64, 128, 4)  # (B, T, C, nh) of the MLA layer
UNITS = {"finite": "", "s_rel_diff": "", "err": "", "err_ref": "", "u_orth": "", "v_orth": "", "ok": "",
         "ms": "ms", "rel_err": "", "optimal_rel_err": ""}


def make_matrix(batch, m, n, device, seed):
    """(batch, m, n) float32 with singular values 1 / (i + 1) (slow decay) and random vectors."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(batch, m, k, device=device, generator=g))[0]  # (b, m, k)
    V = torch.linalg.qr(torch.randn(batch, n, k, device=device, generator=g))[0]  # (b, n, k)
    s = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32)  # (k,)
    return (U * s) @ V.mT, s


def rel_error(A, U, S, Vh):
    approx = (U.double() * S.double()[..., None, :]) @ Vh.double()
    return float((torch.linalg.matrix_norm(A.double() - approx) / torch.linalg.matrix_norm(A.double())).max())


def bench_ms(fn, rep_ms=200):
    """Median ms over rep_ms of repeats (`harness.median_ms`); a call slower than SLOW_MS, or any
    call on a CPU, is timed once after one warm-up call instead."""
    fn()
    harness.synchronize()
    start = time.perf_counter()
    fn()
    harness.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    if once_ms > SLOW_MS or not harness.on_gpu():
        return once_ms
    return harness.median_ms(fn, rep=rep_ms)


def providers(rank):
    """name -> A -> (U, S, Vh) of rank `rank`."""
    q = rank + OVERSAMPLE
    return {
        "triton_rsvd": lambda A: svd.randomized_svd(A, rank, OVERSAMPLE, N_ITER),
        "torch_svd_lowrank": lambda A: (lambda u, s, v: (u[..., :rank], s[..., :rank], v[..., :rank].mT))(
            *torch.svd_lowrank(A, q=q, niter=N_ITER)),
        "torch_linalg_svd": lambda A: (lambda u, s, vh: (u[..., :rank], s[..., :rank], vh[..., :rank, :]))(
            *torch.linalg.svd(A, full_matrices=False)),
    }


def check_correctness(device, shapes):
    """Float32 and bf16 kernels against the reference (Householder QR, SVD of B) with the same Omega;
    errors are measured in float64."""
    rows = []
    for batch, m, n, rank in shapes + [CHECK_ONLY_SHAPE]:
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and m * n > BF16_MAX_ELEMENTS:
                continue
            A, _ = make_matrix(batch, m, n, device, seed=batch + m + n)
            A = A.to(dtype)
            U, S, Vh = svd.randomized_svd(A, rank, generator=torch.Generator(device=device).manual_seed(0))
            # float32 reference: the same Omega (a float64 draw from the same seed differs)
            Ur, Sr, Vhr = randomized_svd_ref(A.float(), rank, generator=torch.Generator(device=device).manual_seed(0))
            eye = torch.eye(rank, device=device, dtype=torch.float64)
            row = dict(
                table="correctness", provider="triton_rsvd", shape=f"{batch}x{m}x{n}", rank=rank,
                dtype=str(dtype).replace("torch.", ""),
                finite=bool(torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()),
                s_rel_diff=float(((S.double() - Sr) / Sr[..., :1]).abs().max()),
                err=rel_error(A, U, S, Vh), err_ref=rel_error(A, Ur, Sr, Vhr),
                u_orth=float((U.double().mT @ U.double() - eye).abs().max()),
                v_orth=float((Vh.double() @ Vh.double().mT - eye).abs().max()),
            )
            row["ok"] = bool(row["finite"] and row["s_rel_diff"] < 1e-3 and row["err"] <= 1.001 * row["err_ref"] + 1e-5
                             and row["u_orth"] < 1e-4 and row["v_orth"] < 1e-4)
            print("check", row, flush=True)
            rows.append(row)
    return rows


def bench_shapes(device, shapes):
    """Every provider at every shape: ms, error and the optimal error."""
    rows = []
    for batch, m, n, rank in shapes:
        A, s = make_matrix(batch, m, n, device, seed=1)
        optimal = float(s[rank:].norm() / s.norm())
        for name, fn in providers(rank).items():
            try:
                U, S, Vh = fn(A)
                err = rel_error(A, U, S, Vh)
                ms = bench_ms(lambda: fn(A), rep_ms=2000 if name == "torch_linalg_svd" else 300)
            except Exception:
                traceback.print_exc()
                continue
            row = dict(table="shape", shape=f"{batch}x{m}x{n}", batch=batch, m=m, n=n, rank=rank, provider=name, ms=ms,
                       rel_err=err, optimal_rel_err=optimal)
            print("bench", row, flush=True)
            rows.append(row)
    return rows


def bench_breakdown(device, shapes):
    """Where the time goes: (96, 1024, 64) rank 16 (fused range finder, eigh, the small SVD with
    its glue, the input check) and (1, 4096, 4096) rank 256 (one product, one torch Cholesky-QR2,
    the range finder, the small SVD, eigh)."""
    batch, m, n, rank = shapes[0]
    A, _ = make_matrix(batch, m, n, device, seed=2)
    l = rank + OVERSAMPLE
    omega = torch.nn.functional.pad(torch.randn(n, l, device=device), (0, svd.tile_dim(l) - l))
    Q, Z, gram, _ = svd._range_fused(A, omega, l, N_ITER)
    out = dict(
        fused_range_finder_ms=bench_ms(lambda: svd._range_fused(A, omega, l, N_ITER)),
        eigh_fp64_ms=bench_ms(lambda: torch.linalg.eigh(gram[:, :l, :l])),
        eigh_fp32_ms=bench_ms(lambda: torch.linalg.eigh(gram[:, :l, :l].float())),
        small_svd_ms=bench_ms(lambda: svd._small_svd(Q, Z, gram, l, rank)),
        isfinite_check_ms=bench_ms(lambda: bool(torch.isfinite(A).all())),
        total_ms=bench_ms(lambda: svd.randomized_svd(A, rank)),
    )
    defaults = svd._GRAM_FP64, svd._FACTOR_WARPS
    for gram64 in (True, False):  # variants of the fused kernel: Gram products' precision, warps
        for warps in (2, 4, 8):
            svd._GRAM_FP64, svd._FACTOR_WARPS = gram64, warps
            out[f"fused_gram{64 if gram64 else 32}_w{warps}_ms"] = bench_ms(
                lambda: svd._range_fused(A, omega, l, N_ITER))
    svd._GRAM_FP64, svd._FACTOR_WARPS = defaults
    batch, m, n, rank = shapes[1]  # 12 matrices: one program each (fused) or tiled launches
    A, _ = make_matrix(batch, m, n, device, seed=4)
    l = rank + OVERSAMPLE
    omega = torch.nn.functional.pad(torch.randn(n, l, device=device), (0, svd.tile_dim(l) - l))
    out.update(
        mid_fused_range_finder_ms=bench_ms(lambda: svd._range_fused(A, omega, l, N_ITER)),
        mid_tiled_range_finder_ms=bench_ms(lambda: svd._range_tiled(A, omega, l, N_ITER)),
        mid_cholqr2_kernel_ms=bench_ms(
            lambda: svd._orth_tiled(torch.randn(batch, m, omega.shape[1], device=device), l)),
    )
    batch, m, n, rank = shapes[2]
    A, _ = make_matrix(batch, m, n, device, seed=3)
    l = rank + OVERSAMPLE
    omega = torch.randn(n, l, device=device)
    Q, Z, gram, _ = svd._range_tiled(A, omega, l, N_ITER)
    out.update(
        big_products_ms=bench_ms(lambda: svd._bmm(A, omega[None], transpose_a=False)),
        big_torch_cholqr2_ms=bench_ms(lambda: svd._orth_tiled(Q, l)),
        big_range_finder_ms=bench_ms(lambda: svd._range_tiled(A, omega, l, N_ITER)),
        big_small_svd_ms=bench_ms(lambda: svd._small_svd(Q, Z, gram, l, rank)),
        big_eigh_fp64_ms=bench_ms(lambda: torch.linalg.eigh(gram)),
        big_eigh_fp32_ms=bench_ms(lambda: torch.linalg.eigh(gram.float())),
    )
    print("breakdown", out, flush=True)
    return [dict(table="breakdown", provider="triton_rsvd", part=name.removesuffix("_ms"), ms=ms)
            for name, ms in out.items()]


def bench_model(device, shape):
    """MLA layer forward+backward (bf16) at shape (B, T, C, nh) with use_svd in each mode."""
    from mla_gpt.model.attention import MultiHeadLatentAttention
    from mla_gpt.model.config import GPTConfig

    B, T, C, nh = shape
    rows = []
    for mode, rank in ((None, None), ("weight", 16), ("activation", 16)):
        try:
            config = GPTConfig(block_size=T, n_head=nh, n_embd=C, use_mla=True, use_svd=mode is not None,
                               svd_rank=rank, svd_mode=mode or "weight")
            layer = MultiHeadLatentAttention(config).to(device=device, dtype=torch.bfloat16)
            x = torch.randn(B, T, C, device=device, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(B, T, C, device=device, dtype=torch.bfloat16)

            def step():
                layer(x).backward(dy)

            ms = bench_ms(step, rep_ms=300)
        except Exception:
            traceback.print_exc()
            continue
        row = dict(table="model", shape=f"MLA B{B} T{T} C{C} nh{nh}", provider=f"svd_{mode}" if mode else "no_svd",
                   rank=rank, ms=ms)
        print("model", row, flush=True)
        rows.append(row)
    return rows


def plot(rows, path):
    """Median ms per provider and shape, log scale."""
    device = rows[0]["gpu"]
    rows = [r for r in rows if r["table"] == "shape"]
    if not rows:
        return
    plt = harness.pyplot()
    labels = list(dict.fromkeys(f"{r['shape']} r{r['rank']}" for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    ms = {(f"{r['shape']} r{r['rank']}", r["provider"]): r["ms"] for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j, label in enumerate(labels) if (label, name) in ms]
        ax.bar(xs, [ms[label, name] for label in labels if (label, name) in ms], width, label=name)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set_ylabel("ms (median, log scale)")
    ax.set_title(f"randomized SVD, float32, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(rows):
    """The shape and model tables, and whether every check passed."""
    print(f"{'shape':>16} {'rank':>4} {'provider':>18} {'ms':>10} {'rel_err':>9} {'optimal':>9}")
    for r in (r for r in rows if r["table"] == "shape"):
        print(f"{r['shape']:>16} {r['rank']:>4} {r['provider']:>18} {r['ms']:>10.4f} {r['rel_err']:>9.5f} "
              f"{r['optimal_rel_err']:>9.5f}")
    for r in (r for r in rows if r["table"] == "model"):
        print(f"{r['shape']:>24} {r['provider']:>16} {r['ms']:>9.3f} ms")
    checks = [r["ok"] for r in rows if r["table"] == "correctness"]
    print("checks ok:", all(checks) if checks else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_out_argument(parser, "svd")
    args = parser.parse_args()
    gpu = harness.on_gpu()
    device = "cuda" if gpu else "cpu"
    if not gpu:
        print("no GPU: small shapes, no breakdown; the numbers need a GPU")
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    env = harness.environment(torch.float32)
    print(json.dumps(env), flush=True)
    path = harness.results_path(args.out, "svd")
    settings = dict(oversample=OVERSAMPLE, n_iter=N_ITER)
    sections = [lambda: check_correctness(device, shapes), lambda: bench_shapes(device, shapes),
                lambda: bench_model(device, GPU_MODEL_SHAPE if gpu else CPU_MODEL_SHAPE)]
    if gpu:  # the breakdown calls the kernels' launchers directly
        sections.insert(2, lambda: bench_breakdown(device, shapes))
    rows = []
    for section in sections:
        try:
            rows += section()
        except Exception:  # a failed section is reported; the others still run and are written
            traceback.print_exc()
        harness.write_results(path, harness.result_rows("svd", rows, UNITS, env, settings))
    print_summary(rows)
    harness.write_results(path, harness.result_rows("svd", rows, UNITS, env, settings), plot)


if __name__ == "__main__":
    main()
