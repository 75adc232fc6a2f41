"""Bring your own model: what converting a trained standard GPT to MLA costs, before and after fine-tuning.

    python bench/finetune_converted.py [--iters 2000] [--ft_steps 300] [--out PATH.json]

On a GPU: a GPT-2-small-shaped model (12 layers, 12 heads, 768 wide, context 256) trains on the
bundled Shakespeare corpus for --iters steps (bf16, the whole step captured as a CUDA graph, not
compiled: the report makes ten short runs, and compiling each would take longer than it trains).
GPT-2's own weights cannot be downloaded on the machines this project runs on, and neither can
tiktoken's GPT-2 encoding, so the corpus is the character-level one.
Each run measures its val loss EVALS_PER_RUN times and keeps the checkpoint of the best one
(early stopping), so the model converted is the standard run's best. It is converted
(`mla_gpt.cli.convert`, plain weight SVD) at r = hs, hs/2, hs/4 and to one joint latent of r 256
(g 1, DeepSeek-V2's layout), each scored right after conversion and over --ft_steps steps of
fine-tuning (the last val loss and the best, the start included); the unconverted model
fine-tuned alike is the baseline. Without a GPU a 2-layer model runs a few steps: the numbers then say nothing.
Rows (key `table`): finetune, one per variant (the provider); the PNG beside the JSON plots the val losses.
"""
import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import harness  # first: it puts the repository root on sys.path
import torch

from mla_gpt.cli import convert as convert_cli
from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint, save_checkpoint
from mla_gpt.cli.configurator import load_config
from mla_gpt.cli.keys import ModelKeys, TrainConfig
from mla_gpt.cli.train import train

# dropout 0.2 as nanoGPT's character config: without it this 85M model memorizes the 1M-character
# corpus within 2000 steps (train loss 1.07, val 1.90), and fine-tuning then only raises val loss
GPU_MODEL = dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=32, dropout=0.2,
                 compile=False)
CPU_MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=4, dropout=0.0, device="cpu",
                 compile=False, dtype="float32")
GPU_SETTINGS = dict(iters=2000, ft_steps=300, eval_iters=40)
UNITS = {"kv_cache_saving": "", "original_val_loss": "", "standard_finetuned_val_loss": "",
         "standard_finetuned_best_val_loss": "", "converted_val_loss": "", "finetuned_val_loss": "",
         "finetuned_best_val_loss": "", "gap_to_standard_finetuned": ""}
CPU_SETTINGS = dict(iters=20, ft_steps=4, eval_iters=2)
FINE_TUNE_LR_FACTOR = 0.5  # of the base run's peak: the converted weights are already trained
JOINT_LATENT = 256
EVALS_PER_RUN = 8  # val loss measured this many times per run (and at its start)


def train_args(out_dir, model, steps, eval_iters, **overrides):
    """Arguments of one run on config/train_shakespeare_char.py with this report's model."""
    settings = dict(out_dir=out_dir, max_iters=steps, lr_decay_iters=steps,
                    eval_interval=max(1, steps // EVALS_PER_RUN), eval_iters=eval_iters,
                    log_interval=max(1, steps // 5), always_save_checkpoint=False,
                    progress_bar=False, **model)
    settings.update(overrides)
    return [str(harness.REPO / "config" / "train_shakespeare_char.py")] + [f"--{k}={v}" for k, v in settings.items()]


def run(args):
    """Train (or evaluate) through the trainer: its summary ('val_loss' last, 'best_val_loss').

    Its checkpoint is saved only when the val loss improves, so it holds the run's best model.
    """
    return train(load_config(args, TrainConfig, ModelKeys))


def fine_tune(start_dir, out_dir, model, steps, eval_iters, base_lr):
    """Copy a checkpoint and resume it for `steps` steps (short warmup, cosine to a tenth): its summary."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(start_dir, out_dir)
    lr = base_lr * FINE_TUNE_LR_FACTOR
    return run(train_args(str(out_dir), model, steps, eval_iters, init_from="resume", learning_rate=lr,
                          min_lr=lr / 10, warmup_iters=max(1, steps // 10)))


def restarted(standard_dir, out_dir):
    """The standard checkpoint as conversion leaves a converted one (iteration 0, an AdamW without
    moments, no RNG states), so the baseline fine-tunes on the same terms."""
    checkpoint = load_checkpoint(standard_dir / CHECKPOINT_NAME)
    cfg = checkpoint["config"]
    optimizer = model_from_checkpoint(checkpoint).configure_optimizers(
        cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), "cpu")
    checkpoint.update(iter_num=0, best_val_loss=math.inf, optimizer=optimizer.state_dict(), rng=[])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / CHECKPOINT_NAME, checkpoint)
    return out_dir


def evaluate(checkpoint_dir, work, model, eval_iters):
    """Val loss of a checkpoint as it is (the trainer's eval on a copy)."""
    eval_dir = work / f"eval_{checkpoint_dir.name}"
    shutil.rmtree(eval_dir, ignore_errors=True)
    shutil.copytree(checkpoint_dir, eval_dir)
    return run(train_args(str(eval_dir), model, 1, eval_iters, init_from="resume", eval_only=True))["val_loss"]


def report(opts):
    """The finetune rows (see __doc__)."""
    model = GPU_MODEL if harness.on_gpu() else CPU_MODEL
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    standard = work / "standard"
    shutil.rmtree(standard, ignore_errors=True)  # its checkpoint must be this run's best, not an older run's
    t0 = time.perf_counter()
    base = run(train_args(str(standard), model, opts.iters, opts.eval_iters, warmup_iters=max(1, opts.iters // 20)))
    base_loss = base["best_val_loss"]  # the checkpoint converted below is the one with this loss
    print(f"standard: best val loss {base_loss:.4f} within {opts.iters} steps, {base['val_loss']:.4f} at the end "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    checkpoint = load_checkpoint(standard / CHECKPOINT_NAME)
    hs = checkpoint["model_args"]["n_embd"] // checkpoint["model_args"]["n_head"]
    base_lr = checkpoint["config"]["learning_rate"]
    baseline = fine_tune(restarted(standard, work / "standard_restarted"), work / "ft_standard", model,
                         opts.ft_steps, opts.eval_iters, base_lr)
    joint = min(JOINT_LATENT, checkpoint["model_args"]["n_embd"])  # the CPU model is narrower than 256
    variants = {f"r{hs}": [f"--mla_latent_dim={hs}"], f"r{hs // 2}": [f"--mla_latent_dim={hs // 2}"],
                f"r{hs // 4}": [f"--mla_latent_dim={hs // 4}"],
                f"g1-joint-r{joint}": [f"--mla_latent_dim={joint}", "--mla_kv_groups=1", "--mla_joint_kv=True"]}
    rows = []
    for name, flags in variants.items():
        converted = work / f"converted_{name}"
        shutil.rmtree(converted, ignore_errors=True)
        conversion = convert_cli.convert(load_config(
            [f"--in_dir={standard}", f"--out_dir={converted}", *flags], convert_cli.ConvertConfig))
        row = dict(table="finetune", provider=name, latent_dim=conversion["latent_dim"],
                   kv_cache_saving=conversion["kv_cache_saving"], iters=opts.iters, ft_steps=opts.ft_steps,
                   original_val_loss=base_loss, standard_finetuned_val_loss=baseline["val_loss"],
                   standard_finetuned_best_val_loss=baseline["best_val_loss"],
                   converted_val_loss=evaluate(converted, work, model, opts.eval_iters))
        tuned = fine_tune(converted, work / f"ft_{name}", model, opts.ft_steps, opts.eval_iters, base_lr)
        row.update(finetuned_val_loss=tuned["val_loss"], finetuned_best_val_loss=tuned["best_val_loss"],
                   gap_to_standard_finetuned=tuned["val_loss"] / baseline["val_loss"] - 1)
        rows.append(row)
        print(f"{name:>16}: cache {row['kv_cache_saving']:.1f}x smaller, val loss {row['converted_val_loss']:.4f} "
              f"converted, {row['finetuned_val_loss']:.4f} after {opts.ft_steps} steps "
              f"(best {row['finetuned_best_val_loss']:.4f}) "
              f"({100 * row['gap_to_standard_finetuned']:+.2f}% vs the standard model fine-tuned alike)", flush=True)
    return rows


def plot(rows, path):
    """Val loss per variant, converted and fine-tuned, against the standard model fine-tuned alike."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    names = [row["provider"] for row in rows]
    width = 0.4
    ax.bar([i - width / 2 for i in range(len(rows))], [row["converted_val_loss"] for row in rows], width,
           label="converted, no fine-tuning")
    ax.bar([i + width / 2 for i in range(len(rows))], [row["finetuned_val_loss"] for row in rows], width,
           label=f"+ {rows[0]['ft_steps']} steps")
    ax.axhline(rows[0]["standard_finetuned_val_loss"], color="k", lw=1,
               label=f"standard, fine-tuned {rows[0]['ft_steps']} steps")
    ax.set_xticks(range(len(rows)), [f"{n}\n({row['kv_cache_saving']:.1f}x cache)" for n, row in zip(names, rows)])
    ax.set_ylabel("val loss (shakespeare_char)")
    ax.set_title(f"converted to MLA after {rows[0]['iters']} steps of standard training", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = GPU_SETTINGS if harness.on_gpu() else CPU_SETTINGS
    parser.add_argument("--iters", type=int, default=defaults["iters"], help="steps of the standard run")
    parser.add_argument("--ft_steps", type=int, default=defaults["ft_steps"], help="fine-tuning steps per model")
    parser.add_argument("--eval_iters", type=int, default=defaults["eval_iters"], help="batches of each val loss")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "mla_finetune_bench",
                        help="checkpoints of the runs")
    harness.add_out_argument(parser, "finetune_converted")
    opts = parser.parse_args()
    if not harness.on_gpu():
        print("no GPU: a 2-layer model for a few steps; these numbers say nothing")
    rows = report(opts)
    env = harness.environment(torch.bfloat16 if harness.on_gpu() else torch.float32)
    harness.write_results(harness.results_path(opts.out, "finetune_converted"),
                          harness.result_rows("finetune_converted", rows, UNITS, env), plot)


if __name__ == "__main__":
    main()
