"""Randomized SVD benchmark: mla_kernels.svd against torch.svd_lowrank and torch.linalg.svd.

For each (batch, m, n, rank): median time (ms) of each provider and the relative
reconstruction error ||A - U S Vh||_F / ||A||_F of the rank-`rank` result, next to the
optimal (known: A is built with prescribed singular values). Float32 correctness of the
kernels against the float64 reference comes first. Then the MLA layer's forward+backward
with use_svd in each mode against none, if mla_gpt's MultiHeadLatentAttention is there.

    PYTHONPATH=. python bench/svd.py --out bench/results
writes svd_results.json, svd_results.csv and svd_results.png (GPU name, torch and
triton versions inside).
"""
import argparse
import csv
import json
import os
import time
import traceback

import torch
import triton

from mla_kernels import svd
from mla_kernels.reference import randomized_svd_ref

SHAPES = [(96, 1024, 64, 16), (12, 4096, 128, 32), (1, 4096, 4096, 256), (1, 4096, 4096, 32)]
OVERSAMPLE, N_ITER = 8, 2
SLOW_MS = 250  # calls slower than this (torch.linalg.svd of 4096 x 4096) are timed once


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


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, rep_ms=200):
    """Median ms over rep_ms of repeats (triton.testing.do_bench, L2 flushed between runs);
    a call slower than SLOW_MS is timed once after one warm-up call instead."""
    fn()
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    once_ms = (time.perf_counter() - start) * 1e3
    if once_ms > SLOW_MS or not torch.cuda.is_available():
        return once_ms
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def providers(rank):
    q = rank + OVERSAMPLE
    return {
        "triton_rsvd": lambda A: svd.randomized_svd(A, rank, OVERSAMPLE, N_ITER),
        "torch_svd_lowrank": lambda A: (lambda u, s, v: (u[..., :rank], s[..., :rank], v[..., :rank].mT))(
            *torch.svd_lowrank(A, q=q, niter=N_ITER)),
        "torch_linalg_svd": lambda A: (lambda u, s, vh: (u[..., :rank], s[..., :rank], vh[..., :rank, :]))(
            *torch.linalg.svd(A, full_matrices=False)),
    }


def check_correctness(device):
    """Float32 and bf16 kernels against the reference (Householder QR, SVD of B) with the same Omega;
    errors are measured in float64."""
    rows = []
    for batch, m, n, rank in SHAPES + [(3, 77, 48, 8)]:
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and m * n > (1 << 20):
                continue
            A, _ = make_matrix(batch, m, n, device, seed=batch + m + n)
            A = A.to(dtype)
            U, S, Vh = svd.randomized_svd(A, rank, generator=torch.Generator(device=device).manual_seed(0))
            # float32 reference: the same Omega (a float64 draw from the same seed differs)
            Ur, Sr, Vhr = randomized_svd_ref(A.float(), rank, generator=torch.Generator(device=device).manual_seed(0))
            eye = torch.eye(rank, device=device, dtype=torch.float64)
            row = dict(
                shape=f"{batch}x{m}x{n}", rank=rank, dtype=str(dtype).replace("torch.", ""),
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


def bench_shapes(device):
    rows = []
    for batch, m, n, rank in SHAPES:
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
            row = dict(shape=f"{batch}x{m}x{n}", batch=batch, m=m, n=n, rank=rank, provider=name, ms=ms,
                       rel_err=err, optimal_rel_err=optimal)
            print("bench", row, flush=True)
            rows.append(row)
    return rows


def bench_breakdown(device):
    """Where the time goes: (96, 1024, 64) rank 16 (fused range finder, eigh, the small SVD with
    its glue, the input check) and (1, 4096, 4096) rank 256 (one product, one torch Cholesky-QR2,
    the range finder, the small SVD, eigh)."""
    batch, m, n, rank = SHAPES[0]
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
    batch, m, n, rank = SHAPES[1]  # 12 matrices: one program each (fused) or tiled launches
    A, _ = make_matrix(batch, m, n, device, seed=4)
    l = rank + OVERSAMPLE
    omega = torch.nn.functional.pad(torch.randn(n, l, device=device), (0, svd.tile_dim(l) - l))
    out.update(
        mid_fused_range_finder_ms=bench_ms(lambda: svd._range_fused(A, omega, l, N_ITER)),
        mid_tiled_range_finder_ms=bench_ms(lambda: svd._range_tiled(A, omega, l, N_ITER)),
        mid_cholqr2_kernel_ms=bench_ms(lambda: svd._orth_tiled(torch.randn(batch, m, omega.shape[1], device=device), l)),
    )
    batch, m, n, rank = SHAPES[2]
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
    return out


def bench_model(device):
    """MLA layer forward+backward (bf16, B 16, T 1024, nh 12, C 768) with use_svd in each mode."""
    try:
        from mla_gpt.model.attention import MultiHeadLatentAttention
        from mla_gpt.model.config import GPTConfig
    except ImportError as exc:
        print("model bench skipped:", exc)
        return []
    B, T, C, nh = 16, 1024, 768, 12
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
        row = dict(shape=f"MLA B{B} T{T} C{C} nh{nh}", provider=f"svd_{mode}" if mode else "no_svd", rank=rank, ms=ms)
        print("model", row, flush=True)
        rows.append(row)
    return rows


def plot(rows, path, gpu):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_title(f"randomized SVD, float32, {gpu}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__, triton=triton.__version__,
                oversample=OVERSAMPLE, n_iter=N_ITER, dtype="float32")
    result = dict(meta=meta)
    for key, fn in (("correctness", check_correctness), ("shapes", bench_shapes),
                    ("breakdown", bench_breakdown), ("model", bench_model)):
        try:
            result[key] = fn(device)
        except Exception:
            traceback.print_exc()
        with open(os.path.join(args.out, "svd_results.json"), "w") as f:
            json.dump(result, f, indent=1)
    rows = result.get("shapes", [])
    with open(os.path.join(args.out, "svd_results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["gpu", "torch", "triton", "shape", "rank", "provider", "ms", "rel_err",
                                               "optimal_rel_err"], extrasaction="ignore")
        writer.writeheader()
        for r in rows + result.get("model", []):
            writer.writerow({**meta, **r})
    if rows:
        plot(rows, os.path.join(args.out, "svd_results.png"), meta["gpu"])
    print(meta)
    print(f"{'shape':>16} {'rank':>4} {'provider':>18} {'ms':>10} {'rel_err':>9} {'optimal':>9}")
    for r in rows:
        print(f"{r['shape']:>16} {r['rank']:>4} {r['provider']:>18} {r['ms']:>10.4f} {r['rel_err']:>9.5f} "
              f"{r['optimal_rel_err']:>9.5f}")
    for r in result.get("model", []):
        print(f"{r['shape']:>24} {r['provider']:>16} {r['ms']:>9.3f} ms")
    print("checks ok:", all(r["ok"] for r in result.get("correctness", [])) if result.get("correctness") else None)


if __name__ == "__main__":
    main()
