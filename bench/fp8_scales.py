"""Which fp8 scale granularity keeps a trained model's latent cache most accurate per byte.

    python bench/fp8_scales.py [--iters 300] [--out PATH.json]

Trains two MLA models on the bundled Shakespeare corpus through the trainer: the default layout
(g = nh groups, r = hs / 2, separate K and V latents) and a joint one (g = 1, one latent of r = 2 hs
for K and V). Then, on fixed val windows, every layer's latents (kv_latent_proj's output, what the
cache stores) are rounded to float8_e4m3fn with one float32 scale per
- position and group (`position-r`, LatentKVCache's layout), or per chunk of C latent columns
  within it (`position-C`: finer, more scale bytes);
- tile of P positions and group (`tile-P`: coarser, fewer bytes; a decode-time append would have
  to rescale a tile's older positions whenever a new one raised its amax),
and the val loss is measured teacher-forced with every attention reading the rounded latents
(the expanded path, whose latents pass through kv_latent_proj as a module: same math as the
absorbed path the cache serves). `bf16` rounds them to bfloat16 instead: the bf16 cache, the
reference each fp8 row is compared with. Per row (provider: the granularity): bytes per token and
layer, the latents' relative error, the val loss and its change against bf16. Without a GPU a small
model trains for a few hundred steps on the CPU (a couple of minutes); on a GPU, GPT-2 small's shape.
"""
import argparse
import tempfile
from pathlib import Path

import harness  # first: it puts the repository root on sys.path
import numpy as np
import torch

from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from mla_gpt.cli.configurator import load_config
from mla_gpt.cli.keys import ModelKeys, TrainConfig
from mla_gpt.cli.train import train
from mla_gpt.data import prepare
from mla_kernels.reference import FP8_DTYPE, FP8_MAX

GPU_SETTINGS = dict(model=dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=32, dropout=0.2,
                               compile=False),
                    iters=1500, windows=128)
CPU_SETTINGS = dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, dropout=0.0,
                               device="cpu", compile=False, dtype="float32"),
                    iters=300, windows=32)
CHUNKS = [32, 16]  # latent columns per scale, finer than a whole position's latent
TILES = [16, 64]  # positions per scale
SCALE_BYTES = 4  # one float32
UNITS = {"bytes_per_token_layer": "bytes", "latent_rel_err": "", "val_loss": "", "val_loss_change_vs_bf16": ""}


def layouts(n_head, head_size):
    """name -> the model keys of each cache layout measured."""
    return {"default": dict(mla_latent_dim=head_size // 2),
            "joint": dict(mla_latent_dim=2 * head_size, mla_kv_groups=1, mla_joint_kv=True)}


def granularities(latent_dim, block_size):
    """(name, kind, size): bf16, then fp8 per position (whole latent, then chunks), then per tile."""
    rows = [("bf16", "bf16", None), (f"position-{latent_dim}", "position", latent_dim)]
    rows += [(f"position-{c}", "position", c) for c in CHUNKS if c < latent_dim and latent_dim % c == 0]
    rows += [(f"tile-{p}", "tile", p) for p in TILES if block_size % p == 0]
    return rows


def round_latents(latent, n_latents, groups, latent_dim, kind, size):
    """kv_latent_proj's output (B, T, n_latents g r) as the cache would return it, same shape and dtype.

    bf16: rounded to bfloat16. position: fp8 with one scale per (position, latent, group, chunk of
    `size` columns). tile: one scale per (`size` positions, latent, group).
    """
    B, T = latent.shape[:2]
    x = latent.float().view(B, T, n_latents, groups, latent_dim)
    if kind == "bf16":
        return x.to(torch.bfloat16).to(latent.dtype).view_as(latent)
    if kind == "position":
        blocks = x.view(B, T, n_latents, groups, latent_dim // size, size)
        amax = blocks.abs().amax(dim=-1, keepdim=True)
    else:
        blocks = x.view(B, T // size, size, n_latents, groups, latent_dim)
        amax = blocks.abs().amax(dim=(2, 5), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    rounded = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale
    return rounded.to(latent.dtype).view_as(latent)


def bytes_per_token(n_latents, groups, latent_dim, kind, size):
    """Cache bytes per token and layer: values and their scales."""
    elements = n_latents * groups * latent_dim
    if kind == "bf16":
        return 2 * elements
    if kind == "position":
        return elements + SCALE_BYTES * n_latents * groups * (latent_dim // size)
    return elements + SCALE_BYTES * n_latents * groups / size


def val_windows(block_size, n_windows, device):
    """n_windows (x, y) pairs of block_size tokens from the val split (fixed seed)."""
    data = np.memmap(prepare.PACKAGE_DIR / "shakespeare_char" / "val.bin", dtype=np.uint16, mode="r")
    starts = np.random.default_rng(0).integers(0, len(data) - block_size - 1, n_windows)
    windows = torch.from_numpy(np.stack([data[s : s + block_size + 1].astype(np.int64) for s in starts]))
    return windows[:, :-1].to(device), windows[:, 1:].to(device)  # (n, T) each


@torch.no_grad()
def val_loss_with_rounding(model, x, y, granularity, batch, autocast):
    """Mean val loss with every layer's latents rounded as `granularity` says, and their relative error."""
    _, kind, size = granularity
    err2, norm2 = [0.0], [0.0]

    def hook(attn):
        n_latents = 1 if attn.joint_kv else 2

        def round_output(module, inputs, latent):
            rounded = round_latents(latent, n_latents, attn.n_groups, attn.latent_dim, kind, size)
            err2[0] += (rounded.double() - latent.double()).pow(2).sum().item()
            norm2[0] += latent.double().pow(2).sum().item()
            return rounded
        return round_output

    handles = [block.attn.kv_latent_proj.register_forward_hook(hook(block.attn)) for block in model.transformer.h]
    try:
        losses = []
        for i in range(0, x.size(0), batch):
            with autocast:
                _, loss = model(x[i : i + batch], y[i : i + batch])
            losses.append(loss.item())
    finally:
        for handle in handles:
            handle.remove()
    return float(np.mean(losses)), (err2[0] / norm2[0]) ** 0.5


def trained_model(layout_keys, settings, iters, work_dir, device):
    """Train one MLA model through the trainer; the plain module from its checkpoint, in eval mode."""
    out_dir = Path(work_dir)
    args = [str(harness.REPO / "config" / "train_shakespeare_char.py"), f"--out_dir={out_dir}",
            f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}", "--eval_iters=10",
            f"--log_interval={max(1, iters // 5)}", "--progress_bar=False", "--use_mla=True",
            "--mla_path=expanded", *[f"--{k}={v}" for k, v in {**settings, **layout_keys}.items()]]
    train(load_config(args, TrainConfig, ModelKeys))
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME, map_location="cpu")
    return model_from_checkpoint(checkpoint, dropout=0.0).to(device).eval()


def report(opts):
    on_gpu = harness.on_gpu()
    defaults = GPU_SETTINGS if on_gpu else CPU_SETTINGS
    settings = defaults["model"]
    device = "cuda" if on_gpu else "cpu"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu
                else torch.autocast("cpu", enabled=False))
    head_size = settings["n_embd"] // settings["n_head"]
    x, y = val_windows(settings["block_size"], opts.windows or defaults["windows"], device)
    rows = []
    for layout, keys in layouts(settings["n_head"], head_size).items():
        model = trained_model(keys, settings, opts.iters or defaults["iters"], Path(opts.work_dir) / layout, device)
        attn = model.transformer.h[0].attn
        n_latents = 1 if attn.joint_kv else 2
        bf16_loss = None
        for granularity in granularities(attn.latent_dim, settings["block_size"]):
            name, kind, size = granularity
            loss, latent_err = val_loss_with_rounding(model, x, y, granularity, settings["batch_size"], autocast)
            bf16_loss = loss if kind == "bf16" else bf16_loss
            row = dict(layout=layout, provider=name, latent_dim=attn.latent_dim, groups=attn.n_groups,
                       bytes_per_token_layer=bytes_per_token(n_latents, attn.n_groups, attn.latent_dim, kind, size),
                       latent_rel_err=latent_err, val_loss=loss, val_loss_change_vs_bf16=loss / bf16_loss - 1)
            rows.append(row)
            print(f"{layout:>8} {name:>12}: {row['bytes_per_token_layer']:7.1f} B/token/layer, latent error "
                  f"{latent_err:.2e}, val loss {loss:.4f} ({100 * row['val_loss_change_vs_bf16']:+.3f}% vs bf16)",
                  flush=True)
    return rows


def plot(rows, path):
    """Val-loss change against bf16 over cache bytes, one line per layout."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for layout in dict.fromkeys(row["layout"] for row in rows):
        fp8 = sorted((r for r in rows if r["layout"] == layout and r["provider"] != "bf16"),
                     key=lambda r: r["bytes_per_token_layer"])
        ax.plot([r["bytes_per_token_layer"] for r in fp8], [100 * r["val_loss_change_vs_bf16"] for r in fp8],
                "o-", label=layout)
        for r in fp8:
            ax.annotate(r["provider"], (r["bytes_per_token_layer"], 100 * r["val_loss_change_vs_bf16"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("cache bytes per token and layer (fp8 values + float32 scales)")
    ax.set_ylabel("val loss change vs the bf16 cache (%)")
    ax.set_title("fp8 latent cache: scale granularity", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=None, help="training steps per model (default: per device)")
    parser.add_argument("--windows", type=int, default=None, help="val windows scored (default: per device)")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "mla_fp8_scales",
                        help="checkpoints of the two models")
    harness.add_out_argument(parser, "fp8_scales")
    opts = parser.parse_args()
    env = harness.environment(torch.bfloat16 if harness.on_gpu() else torch.float32)
    harness.write_results(harness.results_path(opts.out, "fp8_scales"),
                          harness.result_rows("fp8_scales", report(opts), UNITS, env), plot)


if __name__ == "__main__":
    main()
