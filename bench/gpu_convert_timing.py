"""Time MHA -> MLA conversion of a random 12-layer, 768-wide, 12-head GPT (target: < 2 s on the GPU).

    PYTHONPATH=. python bench/gpu_convert_timing.py --out=$OUT/convert_timing.json
    python bench/gpu_convert_timing.py --small --out=/tmp/convert_timing.json   # CPU smoke run

For r in (32, 64) (g = n_head, separate K/V latents; plain and activation-weighted), one warm-up
conversion (Triton compiles), then REPEATS timed ones with torch.cuda.synchronize() around each:
`convert_state_dict` (all the factorizations) and `convert_model` (plus building the MLA GPT).
Checks beside the timings: the randomized SVD's error against the exact truncated SVD's, and at
r = hs the converted model's logits against the original's.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mla_gpt.cli.convert import attention_input_moments, convert_model, convert_state_dict  # noqa: E402
from mla_gpt.model import GPT, GPTConfig  # noqa: E402

REPEATS = 3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Median wall seconds of REPEATS calls after one warm-up, and the last result."""
    fn()
    times = []
    for _ in range(REPEATS):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def optimal_error(model, r):
    """Exact truncated-SVD relative error over all layers' per-head K and V matrices."""
    C, nh = model.config.n_embd, model.config.n_head
    w = torch.stack([b.attn.c_attn.weight[C:] for b in model.transformer.h]).double()  # (L, 2C, C)
    mats = w.mT.reshape(-1, C, 2 * nh, C // nh).permute(0, 2, 1, 3)  # (L, 2 nh, C, hs)
    s = torch.linalg.svdvals(mats).reshape(len(model.transformer.h), -1)  # (L, 2 nh hs)
    s = s.reshape(s.size(0), 2, nh, -1)
    return (((s[..., r:] ** 2).sum((-1, -2)) / (s ** 2).sum((-1, -2))).sqrt()).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--small", action="store_true", help="2 layers, 128 wide, 4 heads (CPU smoke run)")
    opts = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.small:
        config = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=65)
    else:
        config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    with torch.no_grad():  # trained-looking spectra: random init plus a decaying low-rank part per layer
        for block in model.transformer.h:
            w = block.attn.c_attn.weight
            u = torch.randn(w.size(0), 64, device=device) * torch.logspace(0, -2, 64, device=device)
            w.add_(0.05 * u @ torch.randn(64, w.size(1), device=device))
    args = {f: getattr(config, f) for f in config.__dataclass_fields__}
    state = model.state_dict()
    hs = config.head_size
    x = torch.randint(0, config.vocab_size, (2, config.block_size), device=device)

    class RandomTokens:
        def next(self):
            return torch.randint(0, config.vocab_size, (4, config.block_size), device=device), None

    moments = attention_input_moments(model, RandomTokens(), 2)  # (L, C, C): stands in for calibration data

    results = []
    for r in (hs // 2, hs):  # 32 and 64 at hs 64
        for calibrated in (False, True):
            m = moments if calibrated else None
            gen = torch.Generator(device=device)
            t_factor, all_factor, (_, _, report) = timed(
                lambda: convert_state_dict(state, args, r, moments=m, generator=gen.manual_seed(0)), device)
            t_model, all_model, (mla, _) = timed(
                lambda: convert_model(model, r, moments=m, generator=gen.manual_seed(0)), device)
            row = {
                "latent_dim": r, "calibrated": calibrated, "factor_seconds": t_factor, "factor_all": all_factor,
                "convert_model_seconds": t_model, "convert_model_all": all_model,
                "kv_cache_saving": report["kv_cache_saving"],
                "rel_error": statistics.mean((layer["k"] + layer["v"]) / 2 for layer in report["layers"]),
            }
            if not calibrated:
                row["optimal_rel_error"] = optimal_error(model, r)
            if r == hs and not calibrated:
                with torch.no_grad():
                    want, got = model(x, x)[0], mla.eval()(x, x)[0]
                row["full_rank_max_logit_diff"] = (want - got).abs().max().item()
            results.append(row)
            print(json.dumps(row), flush=True)
    import triton

    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "model": {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd},
        "repeats": REPEATS, "results": results,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
