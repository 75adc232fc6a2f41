"""Checkpoint conversion MHA -> MLA by randomized SVD: what it costs in val loss, and how long it takes.

    python bench/convert.py [--iters 1000] [--eval_iters 40] [--work_dir DIR] [--out PATH.json]
    python bench/convert.py --timing [--out PATH.json]

Quality (the default, a CPU job of ~15 minutes): on shakespeare_char (the family of
config/train_mla_test.py, use_mla=False) train a standard model for `iters` steps; convert it at r
in {hs, hs/2, hs/4} (plain weight SVD, and weighted by CALIB_BATCHES calibration batches); score val
loss right after conversion and after fine-tuning for 5% and 10% of `iters`; train an MLA model of
the same r from scratch for iters + 10% steps (the same total). Every model is scored by train's own
eval (eval_iters batches from the same seeded windows), so the numbers compare directly. Rows (key
`table`): quality, one per (r, calibration), and summary; <stem>.png the val losses.

--timing (target: < 2 s on the GPU): convert a random 12-layer, 768-wide, 12-head GPT (2 layers,
128 wide, 4 heads without a GPU) at r = hs/2 and hs, plain and calibrated: one warm-up conversion
(Triton compiles), then the median of TIMING_REPEATS synchronized ones, of `convert_state_dict`
(all the factorizations) and `convert_model` (plus building the MLA GPT). Checks beside the
timings: the randomized SVD's error against the exact truncated SVD's, and at r = hs the converted
model's logits against the original's. Rows (key `table`): timing.
"""

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import harness  # first: it puts the repository root on sys.path
import torch

from mla_gpt.cli import convert as convert_cli
from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, load_checkpoint
from mla_gpt.cli.configurator import load_config
from mla_gpt.cli.convert import attention_input_moments, convert_model, convert_state_dict
from mla_gpt.cli.keys import ModelKeys, TrainConfig
from mla_gpt.cli.train import train
from mla_gpt.model import GPT, GPTConfig

FINE_TUNE_FRACTIONS = (0.05, 0.10)
CALIB_BATCHES = 8
FINE_TUNE_LR = 1e-3  # half the base run's peak: the converted weights are already trained
TARGET = 0.03  # r = hs/2 within 3% of the original val loss after <= 10% of the steps
TIMING_REPEATS = 3
TIMING_GPU_MODEL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
TIMING_CPU_MODEL = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=65)
SPECTRUM_RANK = 64  # the decaying low-rank part added to each random layer, so spectra look trained
CALIBRATION_BATCHES_TIMING = 2  # random-token batches standing in for calibration data
UNITS = {  # quality and summary rows, then timing rows
    "kv_cache_saving": "", "rel_error_k": "", "rel_error_v": "", "optimal_rel_error": "", "convert_seconds": "s",
    "original_val_loss": "", "converted_val_loss": "", "scratch_val_loss": "", "scratch_seconds": "s",
    **{f"ft{round(frac * 100)}pct_val_loss": "" for frac in FINE_TUNE_FRACTIONS}, "gap_after_10pct": "",
    "target_met": "", "best_gap_r_half_after_10pct": "", "total_seconds": "s",
    "factor_seconds": "s", "factor_all": "s", "convert_model_seconds": "s", "convert_model_all": "s",
    "rel_error": "", "full_rank_max_logit_diff": "",
}


def base_args(out_dir, iters, eval_iters, **overrides):
    """Command-line arguments of one CPU training run of the quality report."""
    settings = dict(
        out_dir=out_dir, device="cpu", dtype="float32", compile=False, progress_bar=False,
        eval_interval=iters, eval_iters=eval_iters, log_interval=max(1, iters // 5), always_save_checkpoint=True,
        use_mla=False, max_iters=iters, lr_decay_iters=iters,
    )
    settings.update(overrides)
    return [str(harness.REPO / "config" / "train_mla_test.py")] + [f"--{k}={v}" for k, v in settings.items()]


def run_train(args):
    """Train (or only evaluate) through the trainer: (val loss, seconds)."""
    t0 = time.perf_counter()
    result = train(load_config(args, TrainConfig, ModelKeys))
    return result["val_loss"], time.perf_counter() - t0


def fine_tune(converted_dir, out_dir, steps, eval_iters):
    """Copy the converted checkpoint and resume it for `steps` iterations (short warmup, cosine to lr/10)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(converted_dir, out_dir)
    return run_train(base_args(out_dir, steps, eval_iters, init_from="resume", learning_rate=FINE_TUNE_LR,
                               min_lr=FINE_TUNE_LR / 10, warmup_iters=max(1, steps // 10), eval_interval=steps))


def finished_checkpoint(directory, steps):
    """The checkpoint of an earlier run in `directory` that trained `steps` steps, or None."""
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    return ckpt if ckpt["iter_num"] == steps else None


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


def quality_report(opts):
    """The quality rows and their summary (see __doc__)."""
    # one intra-op thread: on 2 shared cores, two threads stall batched CPU QR (the SVD) ~1000x and slow training
    torch.set_num_threads(1)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    iters, eval_iters = opts.iters, opts.eval_iters
    t_start = time.perf_counter()

    standard_dir = work / "standard"
    ckpt = finished_checkpoint(standard_dir, iters)
    if ckpt is not None:  # a finished earlier run
        base_loss, base_time = ckpt["best_val_loss"], float("nan")
    else:
        base_loss, base_time = run_train(base_args(str(standard_dir), iters, eval_iters))
        ckpt = load_checkpoint(standard_dir / CHECKPOINT_NAME)
    print(f"standard: val loss {base_loss:.4f} after {iters} steps ({base_time:.0f} s)", flush=True)
    hs = ckpt["model_args"]["n_embd"] // ckpt["model_args"]["n_head"]

    rows = []
    for r in (hs, hs // 2, hs // 4):
        scratch_dir = work / f"scratch_r{r}"
        scratch_steps = iters + round(max(FINE_TUNE_FRACTIONS) * iters)
        done = finished_checkpoint(scratch_dir, scratch_steps)
        if done is not None:
            scratch_loss, scratch_time = done["best_val_loss"], float("nan")
        else:
            scratch_loss, scratch_time = run_train(
                base_args(str(scratch_dir), scratch_steps, eval_iters, use_mla=True, mla_latent_dim=r))
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
            loss0, _ = run_train(base_args(str(eval_dir), iters, eval_iters, init_from="resume", eval_only=True))
            row = {
                "table": "quality", "provider": "convert", "latent_dim": r, "head_size": hs,
                "calibration_batches": calib,
                "kv_cache_saving": report["kv_cache_saving"],
                "rel_error_k": sum(layer["k"] for layer in report["layers"]) / len(report["layers"]),
                "rel_error_v": sum(layer["v"] for layer in report["layers"]) / len(report["layers"]),
                "optimal_rel_error": optimal_error(ckpt["model"], ckpt["model_args"], r),
                "convert_seconds": report["seconds"],
                "original_val_loss": base_loss, "converted_val_loss": loss0,
                "scratch_steps": scratch_steps, "scratch_val_loss": scratch_loss, "scratch_seconds": scratch_time,
            }
            for frac in FINE_TUNE_FRACTIONS:
                steps = max(1, round(frac * iters))
                loss, seconds = fine_tune(conv_dir, str(work / f"ft{steps}_r{r}_calib{calib}"), steps, eval_iters)
                row[f"ft{round(frac * 100)}pct_steps"] = steps
                row[f"ft{round(frac * 100)}pct_val_loss"] = loss
            row["gap_after_10pct"] = row["ft10pct_val_loss"] / base_loss - 1
            rows.append(row)
            print(json.dumps(row), flush=True)

    best_half = min(row["gap_after_10pct"] for row in rows if row["latent_dim"] == hs // 2)
    summary = {
        "table": "summary", "provider": "convert", "iters": iters, "original_val_loss": base_loss, "target": TARGET,
        "target_met": best_half <= TARGET, "best_gap_r_half_after_10pct": best_half,
        "total_seconds": time.perf_counter() - t_start,
        "machine": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
    }
    print(f"r = hs/2 after 10% steps: {best_half * 100:+.2f}% vs the original "
          f"(target {TARGET * 100:.0f}%: {'met' if best_half <= TARGET else 'missed'}); "
          f"{summary['total_seconds'] / 60:.1f} min", flush=True)
    return rows, summary


def plot(rows, path):
    """Val loss per r, converted and fine-tuned, against the standard model and MLA from scratch
    (nothing to draw for the timing rows)."""
    summary = next((row for row in rows if row["table"] == "summary"), None)
    if summary is None:
        return
    base_loss, iters = summary["original_val_loss"], summary["iters"]
    rows = [row for row in rows if row["table"] == "quality"]
    plt = harness.pyplot()

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
    fig.savefig(path)
    plt.close(fig)


def timed(fn):
    """Median wall seconds of TIMING_REPEATS synchronized calls after one warm-up, every time, the last result."""
    fn()
    times = []
    for _ in range(TIMING_REPEATS):
        harness.synchronize()
        start = time.perf_counter()
        result = fn()
        harness.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def timing_optimal_error(model, r):
    """Exact truncated-SVD relative error over all layers' per-head K and V matrices."""
    C, nh = model.config.n_embd, model.config.n_head
    w = torch.stack([b.attn.c_attn.weight[C:] for b in model.transformer.h]).double()  # (L, 2C, C)
    mats = w.mT.reshape(-1, C, 2 * nh, C // nh).permute(0, 2, 1, 3)  # (L, 2 nh, C, hs)
    s = torch.linalg.svdvals(mats).reshape(len(model.transformer.h), -1)  # (L, 2 nh hs)
    s = s.reshape(s.size(0), 2, nh, -1)
    return (((s[..., r:] ** 2).sum((-1, -2)) / (s ** 2).sum((-1, -2))).sqrt()).mean().item()


def random_trained_looking_gpt(config, device):
    """A random GPT whose attention weights get a decaying low-rank part, as trained spectra have."""
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            w = block.attn.c_attn.weight
            u = torch.randn(w.size(0), SPECTRUM_RANK, device=device)
            u *= torch.logspace(0, -2, SPECTRUM_RANK, device=device)
            w.add_(0.05 * u @ torch.randn(SPECTRUM_RANK, w.size(1), device=device))
    return model


def timing_report():
    """The timing rows (see __doc__)."""
    device = torch.device("cuda" if harness.on_gpu() else "cpu")
    config = GPTConfig(**(TIMING_GPU_MODEL if harness.on_gpu() else TIMING_CPU_MODEL))
    model = random_trained_looking_gpt(config, device)
    args = {f: getattr(config, f) for f in config.__dataclass_fields__}
    state = model.state_dict()
    hs = config.head_size
    x = torch.randint(0, config.vocab_size, (2, config.block_size), device=device)

    class RandomTokens:
        def next(self):
            return torch.randint(0, config.vocab_size, (4, config.block_size), device=device), None

    moments = attention_input_moments(model, RandomTokens(), CALIBRATION_BATCHES_TIMING)  # (L, C, C)
    rows = []
    for r in (hs // 2, hs):
        for calibrated in (False, True):
            m = moments if calibrated else None
            gen = torch.Generator(device=device)
            t_factor, all_factor, (_, _, report) = timed(
                lambda: convert_state_dict(state, args, r, moments=m, generator=gen.manual_seed(0)))
            t_model, all_model, (mla, _) = timed(
                lambda: convert_model(model, r, moments=m, generator=gen.manual_seed(0)))
            row = {
                "table": "timing", "provider": "convert", "repeats": TIMING_REPEATS, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_embd": config.n_embd,
                "latent_dim": r, "calibrated": calibrated, "factor_seconds": t_factor, "factor_all": all_factor,
                "convert_model_seconds": t_model, "convert_model_all": all_model,
                "kv_cache_saving": report["kv_cache_saving"],
                "rel_error": statistics.mean((layer["k"] + layer["v"]) / 2 for layer in report["layers"]),
            }
            if not calibrated:
                row["optimal_rel_error"] = timing_optimal_error(model, r)
            if r == hs and not calibrated:
                with torch.no_grad():
                    want, got = model(x, x)[0], mla.eval()(x, x)[0]
                row["full_rank_max_logit_diff"] = (want - got).abs().max().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", action="store_true", help="time the conversion instead of the quality report")
    parser.add_argument("--iters", type=int, default=1000, help="quality: steps of the standard run")
    parser.add_argument("--eval_iters", type=int, default=40, help="quality: batches of each val loss")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "mla_convert_bench",
                        help="quality: checkpoints (a finished standard or scratch run there is reused)")
    harness.add_out_argument(parser, "convert")
    opts = parser.parse_args()
    if opts.timing:
        rows = harness.result_rows("convert", timing_report(), UNITS, harness.environment(torch.float32))
        harness.write_results(harness.results_path(opts.out, "convert_timing"), rows)
        return
    if harness.on_gpu():
        print("the quality report trains on the CPU (its numbers were measured there)")
    env = harness.environment(torch.float32)
    rows, summary = quality_report(opts)
    harness.write_results(harness.results_path(opts.out, "convert_quality"),
                          harness.result_rows("convert", rows + [summary], UNITS, env), plot)


if __name__ == "__main__":
    main()
