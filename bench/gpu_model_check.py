"""GPU checks of the whole model on the kernels (run on the device; writes JSON beside --out).

    PYTHONPATH=. python bench/gpu_model_check.py --out bench/results/model_check.json

1. bf16 correctness of a GPT with MLA on the Triton kernels against a float64 copy on the
   reference path: loss and every gradient, error relative to the same bf16 model on the
   reference path (PyTorch's own bf16 error); the kernels pass within 2x of it (+ a small floor).
2. torch.compile(fullgraph=True) of that model: no graph break at attention.
3. Host overhead of flash_attention forward + backward at a tiny shape (torch.profiler): where
   the CPU time of a call goes.
4. (--only_layer_diagnostics) the attention layer on the kernels against its plain-PyTorch twin.
"""
import argparse
import copy
import json
import time

import torch

from mla_gpt.model import GPT, GPTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 on the GPU; the CPU smoke run goes through the Triton interpreter, whose dot is wrong on bf16
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def check_model(config_kwargs, batch, seq_len):
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
        passed = e_ker <= 2 * e_ref + 1e-3
        ok &= passed
        rows.append(dict(tensor=name, err_kernels=e_ker, err_torch_bf16=e_ref, passed=passed))
    worst = max(rows, key=lambda r: r["err_kernels"] / max(r["err_torch_bf16"], 1e-6))
    print(f"{config_kwargs}: {'PASS' if ok else 'FAIL'}; worst {worst['tensor']}: kernels "
          f"{worst['err_kernels']:.2e} vs torch bf16 {worst['err_torch_bf16']:.2e}")
    return dict(config=config_kwargs, batch=batch, seq_len=seq_len, passed=ok, rows=rows)


def check_compile(config_kwargs):
    model = GPT(GPTConfig(**config_kwargs, attn_backend="triton")).to(DEVICE).to(LOW)
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, model.config.vocab_size, (2, 257), device=DEVICE)
    start = time.perf_counter()
    _, loss = compiled(idx[:, :-1], idx[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - start
    print(f"torch.compile(fullgraph=True) fwd+bwd ok ({seconds:.1f} s incl. compile), loss {loss.item():.4f}")
    return dict(config=config_kwargs, fullgraph=True, first_step_s=seconds, loss=loss.item())


def profile_overhead():
    from mla_kernels.attention import flash_attention

    q = torch.randn(4, 128, 12, 32, device=DEVICE, dtype=LOW, requires_grad=True)
    k = torch.randn(4, 128, 12, 32, device=DEVICE, dtype=LOW, requires_grad=True)
    v = torch.randn(4, 128, 12, 32, device=DEVICE, dtype=LOW, requires_grad=True)

    def step():
        flash_attention(q, k, v).sum().backward()

    from mla_kernels import attention

    out, lse = attention.attention_forward(q, k, v, 32 ** -0.5, 0)
    dout = torch.randn_like(out)
    pieces = {
        "fwd+bwd (public API, autograd)": step,
        "forward launcher": lambda: attention.attention_forward(q, k, v, 32 ** -0.5, 0),
        "backward launchers": lambda: attention.attention_backward(dout, q, k, v, out, lse, 32 ** -0.5, 0),
        "forward custom op": lambda: torch.ops.mla_kernels.flash_attention_fwd(q, k, v, 32 ** -0.5, 0),
        "backward custom op": lambda: torch.ops.mla_kernels.flash_attention_bwd(
            dout, None, q, k, v, out, lse, 32 ** -0.5, 0),
    }
    per_call_ms = {}
    for name, fn in pieces.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            fn()
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        per_call_ms[name] = dict(host_ms=host / 50 * 1e3, wall_ms=total / 50 * 1e3)
        print(f"{name:<34} host {host / 50 * 1e3:.3f} ms/call, wall {total / 50 * 1e3:.3f} ms/call")
    wall_ms = per_call_ms["fwd+bwd (public API, autograd)"]["wall_ms"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(f"flash_attention fwd+bwd at B4 T128 H12 D32: {wall_ms:.3f} ms per call (wall)")
    print(table)
    return dict(shape="B4-T128-H12-D32", fwd_bwd_wall_ms=wall_ms, pieces=per_call_ms, profile=table)


def layer_diagnostics():
    """Why the MLA layer on the kernels trails its plain-PyTorch twin although its core is faster.

    (a) the core on contiguous q / k / v against the same core on strided slices of one
        projection output, as the layer feeds it; (b) the CUDA kernels of one layer fwd+bwd,
        ours against the plain-PyTorch MLA on cuDNN (bench/attention.py's PlainMLA).
    """
    import triton.testing

    from bench.attention import PlainMLA, _sdpa_layer
    from mla_gpt.model.attention import MultiHeadLatentAttention
    from mla_kernels.attention import flash_attention

    B, T, nh, r = 4, 4096, 12, 32
    width = nh * r + 2 * nh * r
    projected = torch.randn(B, T, width, device=DEVICE, dtype=LOW)
    strided = (projected[..., : nh * r].view(B, T, nh, r),
               projected[..., nh * r: 2 * nh * r].view(B, T, nh, r),
               projected[..., 2 * nh * r:].view(B, T, nh, r))
    contiguous = tuple(t.contiguous() for t in strided)
    result = {}
    for name, tensors in (("contiguous", contiguous), ("strided", strided)):
        leaves = [t.detach().requires_grad_() for t in tensors]
        dout = torch.randn(B, T, nh, r, device=DEVICE, dtype=LOW)
        ms = triton.testing.do_bench(lambda: flash_attention(*leaves).backward(dout), return_mode="median")
        result[f"core_fwd_bwd_ms_{name}"] = ms
        print(f"core fwd+bwd B{B} T{T} H{nh} D{r}, {name} inputs: {ms:.3f} ms")
    config = GPTConfig(n_embd=768, n_head=nh, bias=False, block_size=T, use_mla=True, mla_latent_dim=r,
                       attn_backend="triton", mla_path="absorbed")
    ours = MultiHeadLatentAttention(config).to(DEVICE, LOW)
    layers = {"ours": ours, "plain_cudnn": _sdpa_layer(PlainMLA(ours, "cudnn"), "cudnn")}
    x = torch.randn(B, T, 768, device=DEVICE, dtype=LOW, requires_grad=True)
    for name, layer in layers.items():
        for _ in range(3):
            layer(x).sum().backward()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                layer(x).sum().backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
        print(f"--- {name}: CUDA kernels of 5 layer fwd+bwd")
        print(table)
        result[f"profile_{name}"] = table
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip_compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to try the script on a CPU")
    parser.add_argument("--only_layer_diagnostics", action="store_true")
    args = parser.parse_args()
    if args.only_layer_diagnostics:
        with open(args.out, "w") as f:
            json.dump(layer_diagnostics(), f, indent=1)
        return
    import triton

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    results = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    gpt2ish = dict(n_layer=2, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False, use_mla=True)
    batch, seq_len = 2, 512
    if args.smoke:
        gpt2ish = dict(n_layer=1, n_head=4, n_embd=128, block_size=128, vocab_size=97, bias=False, use_mla=True)
        batch, seq_len = 1, 33
    else:
        results["overhead"] = profile_overhead()
    results["correctness"] = [
        check_model(gpt2ish, 2 * batch, 2 * seq_len),
        check_model({**gpt2ish, "mla_latent_dim": 3 * gpt2ish["n_embd"] // gpt2ish["n_head"]}, batch, seq_len),
        check_model({**gpt2ish, "mla_kv_groups": 1, "mla_joint_kv": True, "mla_latent_dim": 128}, batch, seq_len),
        check_model({**gpt2ish, "use_svd": True, "svd_rank": 16}, batch, seq_len),
    ]
    if not args.skip_compile:
        results["compile"] = check_compile(gpt2ish)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
