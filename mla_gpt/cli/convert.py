"""Convert a standard-attention checkpoint into Multi-Head Latent Attention by randomized SVD.

    python -m mla_gpt.cli.convert --in_dir=out-standard --out_dir=out-converted --mla_latent_dim=16
    python -m mla_gpt.cli.convert --in_dir=out-standard --out_dir=out-mla-g1 --mla_latent_dim=64 \
        --mla_kv_groups=1 --mla_joint_kv=True --calibration_batches=8

The result is a normal checkpoint: `sample` reads it, and `train --init_from=resume --out_dir=<out_dir>`
fine-tunes it (iteration 0, a fresh AdamW state, RNG drawn afresh from the seed).

The math (docs/design.md, section 2). Per layer, c_attn holds W_q | W_k | W_v; nn.Linear stores (out, in), so the
(C, C) maps x -> k are W_k = c_attn.weight[C:2C]^T, and head h owns columns h hs .. (h + 1) hs - 1.
Group j of the g latent groups holds heads j nh/g .. (j + 1) nh/g - 1 (their columns are adjacent):

- Separate latents: M_k^j = [W_k^h for h in group j] (C, nh/g hs), and M_v^j likewise.
  Each is factored by its best rank-r approximation M ~ A B with A (C, r), B (r, nh/g hs):
  A^T becomes the group's rows of kv_latent_proj (K latent first, then V; layout (latent, group, r)),
  and the (r, hs) column blocks of B become k_expand / v_expand of the group's heads.
- Joint latent: M^j = [M_k^j | M_v^j] (C, 2 nh/g hs), one A for both, B split into K and V blocks.
- The split of the SVD M_r = U_r S_r Vh_r is balanced: A = U_r S_r^1/2, B = S_r^1/2 Vh_r.
- Objective without calibration: min ||M - A B||_F (Eckart-Young, truncated SVD).
  With K calibration batches: X (N, C) the inputs of the layer's attention (ln_1 outputs) on
  training windows, G = X^T X / N + lambda I = L L^T (Cholesky, float64; lambda = RIDGE times the
  mean diagonal of G keeps L invertible), and the objective is the error on those activations,
      min ||X (M - A B)||_F^2 / N  ~  min ||L^T (M - A B)||_F^2,
  solved exactly by the truncated SVD of the whitened matrix: L^T M ~ U_r S_r Vh_r, then
  A = L^-T U_r S_r^1/2, B = S_r^1/2 Vh_r.
- Biases are carried exactly at every rank, so the latent itself has none (kv_latent_proj.bias = 0):
  the key bias adds q_h . b_k^h to every score of a query, a constant that softmax removes, so it is
  dropped; the value bias passes through attention unchanged (probabilities sum to 1), so
  c_proj.bias = b_o + W_o b_v. q_proj = W_q (and b_q), c_proj's weight is copied; every other
  parameter (embeddings, LayerNorms, MLPs) is copied as is.
- Hence with separate latents and r = nh/g hs (r = hs for g = nh), A B = M and the converted model
  computes the same logits as the original up to rounding.

Factorizations run batched over all layers and groups through `mla_kernels.svd.randomized_svd`
(the Triton kernels on CUDA; float32 math) with `svd_oversample` extra sketch columns (default 16)
and `svd_n_iter` power iterations (default 4): on the bench model (bench/convert.py) the error equals
the exact truncated SVD's to four digits, and tests/test_convert.py holds it within 1% of it.
float64 weights go to the float64 reference `randomized_svd_ref` instead, since the kernels
compute in float32.
"""

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mla_gpt.cli.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, CheckpointError, save_checkpoint
from mla_gpt.cli.configurator import ConfigError, help_text, load_config
from mla_gpt.cli.keys import TrainConfig
from mla_gpt.cli.sources import read_source
from mla_gpt.data.prepare import ensure_prepared
from mla_gpt.model import GPT, GPTConfig
from mla_gpt.train.batches import Batches
from mla_gpt.train.runtime import resolve_device
from mla_kernels.reference import randomized_svd_ref
from mla_kernels.svd import randomized_svd

RIDGE = 1e-6  # ridge of the calibration Gram matrix, relative to its mean diagonal
ERROR_LABELS = {"k": "K", "v": "V", "kv": "KV", "weighted_k": "weighted K", "weighted_v": "weighted V",
                "weighted_kv": "weighted KV"}


@dataclass
class ConvertConfig:
    in_dir: str = field(
        default="out",
        metadata={"help": "standard-attention model: this project's or nanoGPT's out_dir, or a saved GPT-2 folder"},
    )
    out_dir: str = field(
        default="out-converted", metadata={"help": "folder the MLA ckpt.pt is written to"}
    )
    mla_latent_dim: Optional[int] = field(
        default=None, metadata={"help": "latent width r; None -> head size // 2"}
    )
    mla_kv_groups: Optional[int] = field(default=None, metadata={"help": "latent groups g; None -> n_head"})
    mla_joint_kv: bool = field(default=False, metadata={"help": "one latent for K and V (DeepSeek-V2 style)"})
    calibration_batches: int = field(
        default=0, metadata={"help": "training batches whose activations weight the SVD; 0 -> plain weight SVD"}
    )
    dataset: str = field(default="", metadata={"help": "calibration dataset; '' -> the checkpoint's"})
    data_dir: str = field(default="", metadata={"help": "calibration data folder; '' -> the checkpoint's"})
    svd_oversample: int = field(default=16, metadata={"help": "extra sketch columns of the randomized SVD"})
    svd_n_iter: int = field(default=4, metadata={"help": "power iterations of the randomized SVD"})
    seed: int = field(default=1337, metadata={"help": "seed of the SVD sketches and the calibration batches"})
    device: str = field(
        default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'"}
    )


# ----------------------------------------------------------------------------- the factorization


def _check_int(name, value, low, high, why):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] ({why}), got {value}")


def max_latent_dim(n_embd, n_head, kv_groups, joint_kv):
    """Largest r the weights allow: min(C, columns of one factored matrix)."""
    columns = (n_embd // n_head) * (n_head // kv_groups) * (2 if joint_kv else 1)
    return min(n_embd, columns)


def _svd(M, rank, oversample, n_iter, generator):
    """Randomized SVD of each matrix of M (b, m, n); float64 stays float64 through the reference."""
    if M.dtype == torch.float64:
        return randomized_svd_ref(M, rank, oversample, n_iter, generator)
    U, S, Vh = randomized_svd(M.float(), rank, oversample, n_iter, generator)
    return U.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype)


def whitening_factors(moments):
    """Lower Cholesky factors L (..., C, C) of G + lambda I for second moments G (..., C, C), float64."""
    G = moments.double()
    ridge = RIDGE * G.diagonal(dim1=-2, dim2=-1).mean(-1)  # (...,)
    eye = torch.eye(G.size(-1), dtype=G.dtype, device=G.device)
    return torch.linalg.cholesky(G + ridge[..., None, None] * eye)


def factor(M, rank, whiten=None, oversample=16, n_iter=4, generator=None):
    """Best rank-`rank` factorization M ~ A B of each matrix of M (..., C, n).

    whiten: None (minimize ||M - A B||_F) or lower-triangular L (..., C, C) float64, broadcast
    against M's batch dims (minimize ||L^T (M - A B)||_F). Returns A (..., C, rank), B (..., rank, n)
    in M's dtype.
    """
    target = M if whiten is None else (whiten.mT @ M.double()).to(M.dtype)  # (..., C, n)
    U, S, Vh = _svd(target, rank, oversample, n_iter, generator)
    root = S.clamp_min(0).sqrt()  # (..., rank)
    A = U * root[..., None, :]  # (..., C, rank)
    B = root[..., :, None] * Vh  # (..., rank, n)
    if whiten is not None:
        A = torch.linalg.solve_triangular(whiten.mT, A.double(), upper=True).to(M.dtype)
    return A, B


def _relative_error(M, A, B, whiten):
    """sqrt(sum_j ||W (M_j - A_j B_j)||^2 / sum_j ||W M_j||^2) over the groups j; W = L^T or I.

    M (L, n_latents, g, C, n), A (..., C, r), B (..., r, n), whiten None or (L, 1, 1, C, C).
    Returns (L, n_latents) float64.
    """
    E = M - A @ B  # (L, n_latents, g, C, n)
    if whiten is not None:
        E, M = whiten.mT @ E.double(), whiten.mT @ M.double()
    err = E.double().square().sum((-3, -2, -1))
    ref = M.double().square().sum((-3, -2, -1))
    return (err / ref).sqrt()


def convert_state_dict(state_dict, model_args, latent_dim=None, kv_groups=None, joint_kv=False, moments=None,
                       oversample=16, n_iter=4, generator=None):
    """MLA weights from a standard GPT's state_dict, by per-group rank-r factorizations (module docstring).

    state_dict: a standard GPT's (tensors on one device, any float dtype); model_args: its GPTConfig
    keys. latent_dim: r, None -> head size // 2. kv_groups: g, None -> n_head. moments: None, or
    per-layer second moments X^T X / N (n_layer, C, C) of the attention inputs, to weight the SVD.
    Returns (state_dict, model_args, report) of the MLA model; report holds per-layer relative errors
    ('k' and 'v', or 'kv' when joint; 'weighted_*' too with moments) and the KV cache sizes.
    """
    if model_args.get("use_mla"):
        raise ValueError(
            f"model_args describe an MLA model already (use_mla=True, mla_latent_dim="
            f"{model_args.get('mla_latent_dim')}); conversion takes a standard-attention model"
        )
    L, nh, C = model_args["n_layer"], model_args["n_head"], model_args["n_embd"]
    hs = C // nh
    g = nh if kv_groups is None else kv_groups
    _check_int("mla_kv_groups", g, 1, nh, f"a divisor of n_head={nh}")
    if nh % g:
        raise ValueError(f"mla_kv_groups must divide n_head={nh}, got {g}")
    r = max(1, hs // 2) if latent_dim is None else latent_dim
    limit = max_latent_dim(C, nh, g, joint_kv)
    _check_int("mla_latent_dim", r, 1, limit,
               f"min(n_embd, {'2 ' if joint_kv else ''}head_size * n_head / mla_kv_groups) for this model")
    if moments is not None and tuple(moments.shape) != (L, C, C):
        raise ValueError(f"moments must have shape (n_layer, C, C) = {(L, C, C)}, got {tuple(moments.shape)}")
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    n = (nh // g) * hs  # columns of one group's K (or V) matrix

    def attn(i, name):
        return sd[f"transformer.h.{i}.attn.{name}"]

    W = torch.stack([attn(i, "c_attn.weight") for i in range(L)])  # (L, 3C, C)
    Wk = W[:, C:2 * C].mT.reshape(L, C, g, n).permute(0, 2, 1, 3)  # (L, g, C, n)
    Wv = W[:, 2 * C:].mT.reshape(L, C, g, n).permute(0, 2, 1, 3)  # (L, g, C, n)
    if joint_kv:
        M = torch.cat([Wk, Wv], dim=-1)[:, None]  # (L, 1, g, C, 2n)
        names = ("kv",)
    else:
        M = torch.stack([Wk, Wv], dim=1)  # (L, 2, g, C, n): the (latent, group) layout of kv_latent_proj
        names = ("k", "v")
    whiten = None
    if moments is not None:
        whiten = whitening_factors(moments.to(M.device))[:, None, None]  # (L, 1, 1, C, C)
    A, B = factor(M, r, whiten, oversample, n_iter, generator)  # (L, nl, g, C, r), (L, nl, g, r, n or 2n)

    errors = _relative_error(M, A, B, None)  # (L, nl)
    report = {"layers": [dict(zip(names, map(float, row), strict=True)) for row in errors]}
    if whiten is not None:
        weighted = _relative_error(M, A, B, whiten)
        for layer, row in zip(report["layers"], weighted, strict=True):
            layer.update({f"weighted_{k}": float(v) for k, v in zip(names, row, strict=True)})

    n_latents = 1 if joint_kv else 2
    out = {k: v for k, v in sd.items() if ".attn." not in k}
    for i in range(L):
        if joint_kv:
            Bk, Bv = B[i, 0, ..., :n], B[i, 0, ..., n:]  # (g, r, n) each
        else:
            Bk, Bv = B[i, 0], B[i, 1]
        prefix = f"transformer.h.{i}.attn."
        w_qkv = attn(i, "c_attn.weight")  # (3C, C)
        out[prefix + "q_proj.weight"] = w_qkv[:C].clone()
        out[prefix + "kv_latent_proj.weight"] = A[i].mT.reshape(n_latents * g * r, C).contiguous()
        out[prefix + "k_expand.weight"] = _per_head(Bk, nh, hs)
        out[prefix + "v_expand.weight"] = _per_head(Bv, nh, hs)
        out[prefix + "c_proj.weight"] = attn(i, "c_proj.weight").clone()
        if model_args["bias"]:
            b_qkv = attn(i, "c_attn.bias")  # (3C,)
            out[prefix + "q_proj.bias"] = b_qkv[:C].clone()
            out[prefix + "kv_latent_proj.bias"] = b_qkv.new_zeros(n_latents * g * r)
            out[prefix + "c_proj.bias"] = attn(i, "c_proj.bias") + attn(i, "c_proj.weight") @ b_qkv[2 * C:]

    new_args = {**model_args, "use_mla": True, "mla_latent_dim": r, "mla_kv_groups": g, "mla_joint_kv": joint_kv,
                "use_svd": False, "svd_rank": None}
    standard, mla = 2 * C, n_latents * g * r
    report.update({"kv_elements_per_token_layer": {"standard": standard, "mla": mla},
                   "kv_cache_saving": standard / mla, "latent_dim": r, "kv_groups": g, "joint_kv": joint_kv,
                   "calibrated": moments is not None})
    return out, new_args, report


def _per_head(Bg, nh, hs):
    """(g, r, nh/g hs) group factors -> (nh, r, hs) per-head expansions, head h = j nh/g + p."""
    g, r, _ = Bg.shape
    return Bg.reshape(g, r, nh // g, hs).permute(0, 2, 1, 3).reshape(nh, r, hs).contiguous()


def convert_model(model, latent_dim=None, kv_groups=None, joint_kv=False, moments=None, oversample=16, n_iter=4,
                  generator=None):
    """A standard GPT -> (MLA GPT on the same device and dtype, report); see convert_state_dict."""
    args = {f: getattr(model.config, f) for f in model.config.__dataclass_fields__}
    state, new_args, report = convert_state_dict(model.state_dict(), args, latent_dim, kv_groups, joint_kv, moments,
                                                 oversample, n_iter, generator)
    weight = model.lm_head.weight
    with torch.device(weight.device):  # initialized where it will live: a CPU init of GPT-2 small takes ~1.5 s
        mla = GPT(GPTConfig(**new_args)).to(dtype=weight.dtype)
    mla.load_state_dict(state)
    return mla, report


@torch.no_grad()
def attention_input_moments(model, batches, n_batches):
    """Per-layer X^T X / N (n_layer, C, C) float64 of the attention inputs (ln_1 outputs) over n_batches."""
    C = model.config.n_embd
    device = model.lm_head.weight.device
    sums = torch.zeros(model.config.n_layer, C, C, dtype=torch.float64, device=device)
    count = 0

    def hook(i):
        def accumulate(module, inputs, output):
            x = output.reshape(-1, C).double()  # (B T, C)
            sums[i] += x.mT @ x
        return accumulate

    handles = [b.ln_1.register_forward_hook(hook(i)) for i, b in enumerate(model.transformer.h)]
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_batches):
            x, _ = batches.next()
            model(x)
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums / count


# ----------------------------------------------------------------------------- the tool


def print_report(report, log=print):
    """Per-layer relative reconstruction errors and the KV cache saving."""
    for i, layer in enumerate(report["layers"]):
        parts = [f"{ERROR_LABELS[k]} {v:.4f}" for k, v in layer.items()]
        log(f"layer {i}: relative reconstruction error " + ", ".join(parts))
    kv = report["kv_elements_per_token_layer"]
    log(f"KV cache per token and layer: standard {kv['standard']} elements, MLA {kv['mla']} "
        f"(r={report['latent_dim']}, g={report['kv_groups']}, {'joint' if report['joint_kv'] else 'separate'} "
        f"K/V): {report['kv_cache_saving']:.2f}x smaller")


def _fresh_optimizer_state(model, train_cfg):
    """A fresh AdamW state_dict (no moments) with the source run's hyperparameters, for resume."""
    optimizer = model.configure_optimizers(train_cfg["weight_decay"], train_cfg["learning_rate"],
                                           (train_cfg["beta1"], train_cfg["beta2"]), "cpu")
    return optimizer.state_dict()


def convert(cfg, log=print):
    """Read cfg['in_dir']/ckpt.pt, convert it, write cfg['out_dir']/ckpt.pt; returns the report."""
    for key in ("calibration_batches", "svd_oversample", "svd_n_iter"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    out_dir = Path(cfg["out_dir"])
    if out_dir.resolve() == Path(cfg["in_dir"]).resolve():
        raise ConfigError(f"out_dir must differ from in_dir (both {cfg['in_dir']!r}): the source would be overwritten")
    device = resolve_device(cfg["device"])
    source = read_source(cfg["in_dir"])
    log(source.describe(cfg["in_dir"]))
    checkpoint, args = source.checkpoint, source.model_args
    if args.get("use_mla"):
        raise CheckpointError(
            f"{cfg['in_dir']!r} holds an MLA model already (use_mla=True, mla_latent_dim={args.get('mla_latent_dim')}, "
            f"mla_kv_groups={args.get('mla_kv_groups')}); convert takes a standard-attention checkpoint"
        )
    train_cfg = {f: getattr(TrainConfig, f, None) for f in TrainConfig.__dataclass_fields__}
    train_cfg.update(checkpoint.get("config") or {})
    state = {k: v.to(device) for k, v in source.state_dict.items()}
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])

    moments = None
    t0 = time.perf_counter()
    if cfg["calibration_batches"]:
        source_model = GPT(GPTConfig(**{**args, "dropout": 0.0})).to(device)
        source_model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
        dataset = cfg["dataset"] or train_cfg["dataset"]
        data_dir = ensure_prepared(dataset, cfg["data_dir"] or train_cfg["data_dir"] or None,
                                   train_cfg["encoding"], log=log)
        batches = Batches(data_dir / "train.bin", train_cfg["batch_size"], args["block_size"], device, cfg["seed"])
        moments = attention_input_moments(source_model, batches, cfg["calibration_batches"])
        log(f"calibration: {cfg['calibration_batches']} batches of {train_cfg['batch_size']} x "
            f"{args['block_size']} tokens from {data_dir}")
    try:
        new_state, new_args, report = convert_state_dict(
            state, args, cfg["mla_latent_dim"], cfg["mla_kv_groups"], cfg["mla_joint_kv"], moments,
            cfg["svd_oversample"], cfg["svd_n_iter"], generator)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    report["seconds"] = time.perf_counter() - t0
    print_report(report, log)

    model = GPT(GPTConfig(**new_args))
    model.load_state_dict({k: v.cpu() for k, v in new_state.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / CHECKPOINT_NAME, {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": _fresh_optimizer_state(model, train_cfg),
        "scaler": {},
        "model_args": new_args,
        "iter_num": 0,
        "best_val_loss": math.inf,
        "config": checkpoint.get("config"),
        "meta": checkpoint.get("meta"),
        "rng": [],  # no RNG states: a resumed run draws dropout and batches afresh from its seed
        "converted_from": {"in_dir": str(cfg["in_dir"]), "format": source.format,
                           "iter_num": checkpoint.get("iter_num"), "best_val_loss": checkpoint.get("best_val_loss"),
                           "report": report},
    })
    log(f"converted in {report['seconds']:.2f} s on {device}; wrote {out_dir / CHECKPOINT_NAME} "
        f"(fine-tune: python -m mla_gpt.cli.train --init_from=resume --out_dir={out_dir} ...)")
    return report


USAGE = "--in_dir=DIR --out_dir=DIR [--mla_latent_dim=N] [--mla_kv_groups=G] [--mla_joint_kv=True] " \
        "[--calibration_batches=K] [--key=value ...]"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text("python -m mla_gpt.cli.convert", USAGE, ConvertConfig))
        return 0
    try:
        convert(load_config(argv, ConvertConfig))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
