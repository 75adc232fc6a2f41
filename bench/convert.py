"""Quality report of checkpoint conversion: what MHA -> MLA by randomized SVD costs in val loss.

    python bench/convert.py [--iters=1000] [--work_dir=/tmp/mla_convert_bench]

On shakespeare_char (the family of config/train_mla_test.py, use_mla=False): train a standard model for
`iters` steps; convert it at r in {hs, hs/2, hs/4} (plain weight SVD, and weighted by CALIB_BATCHES
calibration batches); score val loss right after conversion and after fine-tuning for 5% and 10% of
`iters`; train an MLA model of the same r from scratch for iters + 10% steps (the same total).
Writes bench/results/convert_quality.{csv,json,png}. Every model is scored by train's own eval
(eval_iters batches from the same seeded windows), so the numbers compare directly.
"""

import argparse
import csv
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mla_gpt.cli import convert as convert_cli  # noqa: E402
from mla_gpt.cli import train as train_cli  # noqa: E402
from mla_gpt.cli.configurator import load_config  # noqa: E402

RESULTS = REPO / "bench" / "results"
FINE_TUNE_FRACTIONS = (0.05, 0.10)
CALIB_BATCHES = 8
FINE_TUNE_LR = 1e-3  # half the base run's peak: the converted weights are already trained
TARGET = 0.03  # r = hs/2 within 3% of the original val loss after <= 10% of the steps


def base_args(out_dir, iters, **overrides):
    settings = dict(
        out_dir=out_dir, device="cpu", dtype="float32", compile=False, progress_bar=False,
        eval_interval=iters, eval_iters=40, log_interval=max(1, iters // 5), always_save_checkpoint=True,
        use_mla=False, max_iters=iters, lr_decay_iters=iters,
    )
    settings.update(overrides)
    return [str(REPO / "config" / "train_mla_test.py")] + [f"--{k}={v}" for k, v in settings.items()]


def run_train(args):
    t0 = time.perf_counter()
    result = train_cli.train(load_config(args, train_cli.TrainConfig, train_cli.ModelKeys))
    return result["val_loss"], time.perf_counter() - t0


def fine_tune(converted_dir, out_dir, steps):
    """Copy the converted checkpoint and resume it for `steps` iterations (short warmup, cosine to lr/10)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(converted_dir, out_dir)
    return run_train(base_args(out_dir, steps, init_from="resume", learning_rate=FINE_TUNE_LR,
                               min_lr=FINE_TUNE_LR / 10, warmup_iters=max(1, steps // 10), eval_interval=steps))


def optimal_error(state, model_args, r):
    """Exact truncated-SVD relative error of the K and V group matrices (per-head latents), all layers."""
    C, nh, L = model_args["n_embd"], model_args["n_head"], model_args["n_layer"]
    hs = C // nh
    errs = []
    for i in range(L):
        w = state[f"transformer.h.{i}.attn.c_attn.weight"].double()  # (3C, C)
        for part in (w[C:2 * C], w[2 * C:]):
            s = torch.linalg.svdvals(part.mT.reshape(C, nh, hs).permute(1, 0, 2))  # (nh, hs)
            errs.append(((s[:, r:] ** 2).sum() / (s ** 2).sum()).sqrt().item())
    return sum(errs) / len(errs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1000, help="steps of the standard run")
    parser.add_argument("--work_dir", default="/tmp/mla_convert_bench")
    opts = parser.parse_args()
    # one intra-op thread: on 2 shared cores, two threads stall batched CPU QR (the SVD) ~1000x and slow training
    torch.set_num_threads(1)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    iters = opts.iters
    t_start = time.perf_counter()

    standard_dir = work / "standard"
    if (standard_dir / train_cli.CHECKPOINT_NAME).exists():
        ckpt = train_cli.load_checkpoint(standard_dir / train_cli.CHECKPOINT_NAME)
        base_loss, base_time = ckpt["best_val_loss"], float("nan")
    else:
        base_loss, base_time = run_train(base_args(str(standard_dir), iters))
        ckpt = train_cli.load_checkpoint(standard_dir / train_cli.CHECKPOINT_NAME)
    print(f"standard: val loss {base_loss:.4f} after {iters} steps ({base_time:.0f} s)", flush=True)
    hs = ckpt["model_args"]["n_embd"] // ckpt["model_args"]["n_head"]

    rows = []
    for r in (hs, hs // 2, hs // 4):
        scratch_dir = work / f"scratch_r{r}"
        scratch_steps = iters + round(max(FINE_TUNE_FRACTIONS) * iters)
        done = scratch_dir / train_cli.CHECKPOINT_NAME
        if done.exists() and train_cli.load_checkpoint(done)["iter_num"] == scratch_steps:  # a finished earlier run
            scratch_loss, scratch_time = train_cli.load_checkpoint(done)["best_val_loss"], float("nan")
        else:
            scratch_loss, scratch_time = run_train(
                base_args(str(scratch_dir), scratch_steps, use_mla=True, mla_latent_dim=r))
        print(f"r={r}: MLA from scratch, {scratch_steps} steps: val loss {scratch_loss:.4f}", flush=True)
        for calib in (0, CALIB_BATCHES):
            conv_dir = work / f"converted_r{r}_calib{calib}"
            shutil.rmtree(conv_dir, ignore_errors=True)
            report = convert_cli.convert(load_config(
                [f"--in_dir={standard_dir}", f"--out_dir={conv_dir}", f"--mla_latent_dim={r}",
                 f"--calibration_batches={calib}", "--device=cpu"], convert_cli.ConvertConfig))
            eval_dir = work / f"eval_r{r}_calib{calib}"
            shutil.rmtree(eval_dir, ignore_errors=True)
            shutil.copytree(conv_dir, eval_dir)
            loss0, _ = run_train(base_args(str(eval_dir), iters, init_from="resume", eval_only=True))
            row = {
                "latent_dim": r, "head_size": hs, "calibration_batches": calib,
                "kv_cache_saving": report["kv_cache_saving"],
                "rel_error_k": sum(layer["k"] for layer in report["layers"]) / len(report["layers"]),
                "rel_error_v": sum(layer["v"] for layer in report["layers"]) / len(report["layers"]),
                "optimal_rel_error": optimal_error(ckpt["model"], ckpt["model_args"], r),
                "convert_seconds": report["seconds"],
                "original_val_loss": base_loss, "converted_val_loss": loss0,
                "scratch_steps": scratch_steps, "scratch_val_loss": scratch_loss, "scratch_seconds": scratch_time,
            }
            for frac in FINE_TUNE_FRACTIONS:
                steps = round(frac * iters)
                loss, seconds = fine_tune(conv_dir, str(work / f"ft{steps}_r{r}_calib{calib}"), steps)
                row[f"ft{round(frac * 100)}pct_steps"] = steps
                row[f"ft{round(frac * 100)}pct_val_loss"] = loss
            row["gap_after_10pct"] = row["ft10pct_val_loss"] / base_loss - 1
            rows.append(row)
            print(json.dumps(row), flush=True)

    half = [row for row in rows if row["latent_dim"] == hs // 2]
    best_half = min(row["gap_after_10pct"] for row in half)
    summary = {
        "iters": iters, "original_val_loss": base_loss, "target": TARGET,
        "target_met": best_half <= TARGET, "best_gap_r_half_after_10pct": best_half,
        "total_seconds": time.perf_counter() - t_start,
        "machine": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convert_quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(RESULTS / "convert_quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, base_loss, iters)
    print(f"r = hs/2 after 10% steps: {best_half * 100:+.2f}% vs the original "
          f"(target {TARGET * 100:.0f}%: {'met' if best_half <= TARGET else 'missed'}); "
          f"{summary['total_seconds'] / 60:.1f} min", flush=True)


def plot(rows, base_loss, iters):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, calib in zip(axes, sorted({row["calibration_batches"] for row in rows}), strict=True):
        sel = sorted((row for row in rows if row["calibration_batches"] == calib), key=lambda row: -row["latent_dim"])
        labels = [f"r={row['latent_dim']}\n({row['kv_cache_saving']:.0f}x cache)" for row in sel]
        series = [("converted, no fine-tune", "converted_val_loss"),
                  (f"+ {sel[0]['ft5pct_steps']} steps (5%)", "ft5pct_val_loss"),
                  (f"+ {sel[0]['ft10pct_steps']} steps (10%)", "ft10pct_val_loss"),
                  (f"MLA from scratch, {sel[0]['scratch_steps']} steps", "scratch_val_loss")]
        width = 0.8 / len(series)
        for k, (name, key) in enumerate(series):
            ax.bar([i + (k - 1.5) * width for i in range(len(sel))], [row[key] for row in sel], width, label=name)
        ax.axhline(base_loss, color="k", lw=1, label=f"standard, {iters} steps")
        ax.axhline(base_loss * (1 + TARGET), color="k", lw=1, ls="--", label="standard + 3%")
        ax.set_xticks(range(len(sel)), labels)
        ax.set_ylim(base_loss * 0.95, max(row["converted_val_loss"] for row in sel) * 1.02)
        ax.set_ylabel("val loss")
        ax.set_title(f"shakespeare_char, {'plain weight SVD' if not calib else f'{calib} calibration batches'}",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "convert_quality.png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
