"""Checks of the whole GPT on the kernels: low-precision correctness and a graph-break-free compile.

    python bench/model_check.py [--skip_compile] [--out PATH.json]

1. bf16 correctness of a GPT with MLA on the Triton kernels against a float64 copy on the
   reference path: loss and every gradient, error relative to the same bf16 model on the
   reference path (PyTorch's own bf16 error); the kernels pass within 2x of it (+ a small floor),
   in four configurations (r = hs/2, r = 3 hs expanded, one joint latent, SVD rank 16).
2. torch.compile(fullgraph=True) of that model: no graph break at attention (GPU only).
Rows (key `table`): correctness (`passed`, one per configuration), tensor (per configuration
and tensor: `err_kernels`, `err_torch_bf16`, `passed`) and compile. Without a GPU it runs a
1-layer, 128-wide GPT in float16 (the kernels through Triton's interpreter when
TRITON_INTERPRET=1, whose dot is wrong on bf16; else their reference) and no compile.
"""
import argparse
import copy
import json
import time

import harness  # first: it puts the repository root on sys.path
import torch

from mla_gpt.model import GPT, GPTConfig

DEVICE = "cuda" if harness.on_gpu() else "cpu"
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16
ERR_FACTOR, ERR_FLOOR = 2, 1e-3  # pass: error <= 2x PyTorch's own low-precision error + 1e-3
GPU_MODEL = dict(n_layer=2, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False, use_mla=True)
CPU_MODEL = dict(n_layer=1, n_head=4, n_embd=128, block_size=128, vocab_size=97, bias=False, use_mla=True)
GPU_BATCH, CPU_BATCH = (2, 512), (1, 33)  # (batch, sequence length)
SVD_RANK = 16
COMPILE_SHAPE = (2, 256)  # (batch, sequence length) of the compiled step
UNITS = {"err_kernels": "", "err_torch_bf16": "", "passed": "", "first_step_s": "s", "loss": ""}


def config_name(variant):
    """A configuration's shape key: its keys beyond the model's, 'default' for none."""
    return ", ".join(f"{k}={v}" for k, v in variant.items()) or "default"


def rel_err(x, ref):
    """||x - ref|| / ||ref||, in float64."""
    return ((x.double() - ref).norm() / ref.norm()).item()


def loss_and_grads(model, idx):
    """Loss and every parameter's gradient of one forward + backward, in float64."""
    model.zero_grad(set_to_none=True)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def check_model(model, variant, batch, seq_len):
    """Loss and gradients of the kernels (LOW) and of the reference (LOW) against float64: the
    configuration's correctness row, then a row per tensor."""
    config_kwargs = {**model, **variant}
    # Eval mode (there is no dropout) freezes the svd 'weight' basis, so all three models share
    # the one computed here rather than each drawing its own randomized SVD.
    torch.manual_seed(0)
    base = GPT(GPTConfig(**config_kwargs, attn_backend="reference")).to(DEVICE).eval()
    idx = torch.randint(0, base.config.vocab_size, (batch, seq_len + 1), device=DEVICE)
    ref64 = copy.deepcopy(base).double()
    ref_bf16 = copy.deepcopy(base).to(LOW)
    kernels = GPT(GPTConfig(**config_kwargs, attn_backend="triton")).to(DEVICE).to(LOW).eval()
    kernels.load_state_dict(ref_bf16.state_dict())
    loss64, grads64 = loss_and_grads(ref64, idx)
    loss_ref, grads_ref = loss_and_grads(ref_bf16, idx)
    loss_ker, grads_ker = loss_and_grads(kernels, idx)
    rows, ok = [], True
    for name in ["loss", *grads64]:
        want = loss64 if name == "loss" else grads64[name]
        got_ref = loss_ref if name == "loss" else grads_ref[name]
        got_ker = loss_ker if name == "loss" else grads_ker[name]
        e_ref, e_ker = rel_err(got_ref, want), rel_err(got_ker, want)
        passed = e_ker <= ERR_FACTOR * e_ref + ERR_FLOOR
        ok &= passed
        rows.append(dict(table="tensor", provider="triton", config=config_name(variant), batch=batch, seq_len=seq_len,
                         tensor=name, err_kernels=e_ker, err_torch_bf16=e_ref, passed=passed))
    worst = max(rows, key=lambda r: r["err_kernels"] / max(r["err_torch_bf16"], 1e-6))
    print(f"{config_kwargs}: {'PASS' if ok else 'FAIL'}; worst {worst['tensor']}: kernels "
          f"{worst['err_kernels']:.2e} vs torch {str(LOW).removeprefix('torch.')} {worst['err_torch_bf16']:.2e}")
    return [dict(table="correctness", provider="triton", config=config_name(variant), batch=batch, seq_len=seq_len,
                 passed=ok), *rows]


def check_compile(config_kwargs):
    """One forward + backward of the compiled model (fullgraph: a graph break raises)."""
    model = GPT(GPTConfig(**config_kwargs, attn_backend="triton")).to(DEVICE).to(LOW)
    compiled = torch.compile(model, fullgraph=True)
    batch, seq_len = COMPILE_SHAPE
    idx = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=DEVICE)
    start = time.perf_counter()
    _, loss = compiled(idx[:, :-1], idx[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - start
    print(f"torch.compile(fullgraph=True) fwd+bwd ok ({seconds:.1f} s incl. compile), loss {loss.item():.4f}")
    return dict(table="compile", provider="triton", config=config_name({}), batch=batch, seq_len=seq_len,
                fullgraph=True, first_step_s=seconds, loss=loss.item())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip_compile", action="store_true", help="skip the torch.compile check")
    harness.add_out_argument(parser, "model_check")
    args = parser.parse_args()
    gpu = harness.on_gpu()
    if not gpu:
        print("no GPU: a 1-layer, 128-wide GPT in float16 and no compile check; the GPU run is the one that counts")
    env = harness.environment(LOW)
    print(json.dumps(env), flush=True)
    model, (batch, seq_len) = (GPU_MODEL, GPU_BATCH) if gpu else (CPU_MODEL, CPU_BATCH)
    hs = model["n_embd"] // model["n_head"]
    rows = [
        *check_model(model, {}, 2 * batch, 2 * seq_len),
        *check_model(model, {"mla_latent_dim": 3 * hs}, batch, seq_len),
        *check_model(model, {"mla_kv_groups": 1, "mla_joint_kv": True, "mla_latent_dim": 2 * hs}, batch, seq_len),
        *check_model(model, {"use_svd": True, "svd_rank": SVD_RANK}, batch, seq_len),
    ]
    if gpu and not args.skip_compile:
        rows.append(check_compile(model))
    harness.write_results(harness.results_path(args.out, "model_check"),
                          harness.result_rows("model_check", rows, UNITS, env, settings=model))


if __name__ == "__main__":
    main()
