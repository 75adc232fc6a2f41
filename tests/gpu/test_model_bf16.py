"""The GPT with MLA on the Triton kernels in bf16 on the GPU, against a float64 copy of itself.

    PYTHONPATH=. python -m pytest tests/gpu/test_model_bf16.py

(The pytest form of the correctness part of bench/gpu_model_check.py.) Three copies of one model
share its weights: the model under test on the kernels (attn_backend='triton') in bf16; the same
bf16 model on the plain-PyTorch reference path (attn_backend='reference'), PyTorch's own bf16
result; and a float64 copy of the bf16 weights on the reference path, the exact result of the
model under test. Eval mode (the models have no dropout) freezes the svd 'weight' basis, so all
three share the one basis the reference computed.

Tolerance rule (flash-attention's criterion, tests/helpers.py), per tensor,
error = ||x - ref64|| / ||ref64||:
    error(kernels) <= ERR_FACTOR x error(PyTorch bf16) + floor,
floor = ERR_FLOOR[dtype] for tensors; for the scalar loss, which is a single rounding to bf16,
floor = finfo(dtype).eps (one unit in the last place, relative). Checked for the loss and the
gradient of every parameter (training), and for the logits of a prefill and of two decode steps
over the latent KV cache (generation: the fused projection + cache append and the decode kernel),
in bf16 and with float32 weights under bf16 autocast.

Configs (GPT-2 small's attention, C 768, nh 12, hs 64; two layers):
r32-absorbed: the defaults (r = hs / 2, g = nh) on the latent-space core; r192-expanded: a latent
wider than the head, K / V expanded on-chip; g1-joint-r128: one group, one joint latent;
svd-weight-k16: value latents cut to rank 16 by the randomized SVD of the value maps.

GPT2ISH, BATCH, SEQ, PROMPT, DEVICE and LOW are the only shape / device / dtype settings; a CPU
dry run may shrink the shapes and set "cpu" and float16 with TRITON_INTERPRET=1 (the
interpreter's dot is wrong for bfloat16).
"""
import copy
from contextlib import nullcontext

import pytest
import torch
from helpers import ERR_FLOOR, assert_within_torch_error, grads_by_name

from mla_gpt.model import GPT, GPTConfig, plan

DEVICE = "cuda"
LOW = torch.bfloat16
GPT2ISH = dict(n_layer=2, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False, use_mla=True)
BATCH, SEQ = 2, 512  # training: BATCH sequences of SEQ tokens
PROMPT, STEPS = 200, (1, 3)  # generation: a prompt of PROMPT tokens, then steps of 1 and 3 new tokens
CONFIGS = {
    "r32-absorbed": dict(mla_path="absorbed"),
    "r192-expanded": dict(mla_latent_dim=192, mla_path="expanded"),
    "g1-joint-r128": dict(mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=128),
    "svd-weight-k16": dict(use_svd=True, svd_rank=16),
}


def assert_within_bf16_error(checks, dtype):
    """checks: {name: (got, want64, torch_low)}, each held to the rule with the floor
    finfo(dtype).eps for a scalar (one rounding), ERR_FLOOR[dtype] for a tensor."""
    assert_within_torch_error({name: (got, want64, torch_low,
                                      torch.finfo(dtype).eps if got.numel() == 1 else ERR_FLOOR[dtype])
                               for name, (got, want64, torch_low) in checks.items()})


def model_triplet(kwargs, dtype, backend="triton"):
    """(kernels, torch_low, ref64): one set of weights in `dtype` on `backend` (the kernels) and on
    the reference path, and those weights in float64 on the reference path; eval mode."""
    base = GPT(GPTConfig(**GPT2ISH, **kwargs, attn_backend="reference")).to(DEVICE).eval()
    torch_low = base.to(dtype)
    ref64 = copy.deepcopy(torch_low).double()
    kernels = GPT(GPTConfig(**GPT2ISH, **kwargs, attn_backend=backend)).to(DEVICE).to(dtype).eval()
    kernels.load_state_dict(torch_low.state_dict())
    return kernels, torch_low, ref64


def loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), grads_by_name(model)


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=list(CONFIGS))
def test_loss_and_gradients_bf16(kwargs):
    """One training forward + backward: the loss and every parameter's gradient."""
    kernels, torch_low, ref64 = model_triplet(kwargs, LOW)
    idx = torch.randint(0, GPT2ISH["vocab_size"], (BATCH, SEQ + 1), device=DEVICE)
    loss64, grads64 = loss_and_grads(ref64, idx)
    loss_torch, grads_torch = loss_and_grads(torch_low, idx)
    loss_kernels, grads_kernels = loss_and_grads(kernels, idx)
    assert grads_kernels.keys() == grads64.keys() == grads_torch.keys()
    checks = {"loss": (loss_kernels, loss64, loss_torch)}
    checks.update({name: (grads_kernels[name], grads64[name], grads_torch[name]) for name in grads64})
    assert_within_bf16_error(checks, LOW)


@pytest.mark.parametrize("latent", [32, 192], ids=["r32", "r192"])
@pytest.mark.parametrize("form, core", [*plan.candidates("auto", "auto"), ("auto", "auto")],
                         ids=[*(f"{f}-{c}" for f, c in plan.candidates("auto", "auto")), "auto-auto"])
def test_every_form_and_core_bf16(form, core, latent):
    """Each (form, core) the layer can be forced to, and the one `plan.choose` picks: one training
    forward + backward, held to the same rule."""
    kernels, torch_low, ref64 = model_triplet(dict(mla_latent_dim=latent, mla_path=form), LOW, backend=core)
    idx = torch.randint(0, GPT2ISH["vocab_size"], (BATCH, SEQ + 1), device=DEVICE)
    loss64, grads64 = loss_and_grads(ref64, idx)
    loss_torch, grads_torch = loss_and_grads(torch_low, idx)
    loss_kernels, grads_kernels = loss_and_grads(kernels, idx)
    checks = {"loss": (loss_kernels, loss64, loss_torch)}
    checks.update({name: (grads_kernels[name], grads64[name], grads_torch[name]) for name in grads64})
    assert_within_bf16_error(checks, LOW)


@torch.no_grad()  # passing caches asks for generation, which has no backward
def generation_logits(model, prompt, tokens):
    """Logits (B, 1, vocab) of the prefill and of each decode step, through the model's KV caches.

    The first step passes its position as an int, the second as a device tensor (the static-shape
    step that CUDA graphs replay)."""
    caches = model.setup_caches(prompt.shape[0], prompt.shape[1] + tokens.shape[1])
    logits = [model(prompt, caches=caches, input_pos=0)[0]]
    pos = prompt.shape[1]
    for i, T in enumerate(STEPS):
        input_pos = pos if i == 0 else torch.tensor(pos, device=DEVICE)
        logits.append(model(tokens[:, pos - prompt.shape[1] : pos - prompt.shape[1] + T],
                            caches=caches, input_pos=input_pos)[0])
        pos += T
    return logits


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-autocast"])
@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=list(CONFIGS))
@torch.no_grad()
def test_generation_logits_bf16(kwargs, autocast):
    """Prefill, then decode steps of 1 and 3 tokens over the caches: logits of each forward.

    bf16-weights: the models and caches in bf16. fp32-weights-autocast: float32 weights under bf16
    autocast (how `sample` runs): caches in bf16, the fused cache append takes the composed weights
    cast to bf16; PyTorch's result is the float32 reference model under the same autocast."""
    kernels, torch_low, ref64 = model_triplet(kwargs, torch.float32 if autocast else LOW)
    prompt = torch.randint(0, GPT2ISH["vocab_size"], (BATCH, PROMPT), device=DEVICE)
    tokens = torch.randint(0, GPT2ISH["vocab_size"], (BATCH, sum(STEPS)), device=DEVICE)
    logits64 = generation_logits(ref64, prompt, tokens)
    with torch.autocast(torch.device(DEVICE).type, dtype=LOW) if autocast else nullcontext():
        logits_torch = generation_logits(torch_low, prompt, tokens)
        logits_kernels = generation_logits(kernels, prompt, tokens)
    assert all(t.dtype == LOW for t in logits_kernels)
    names = ["prefill"] + [f"step {i + 1} ({T} tokens)" for i, T in enumerate(STEPS)]
    assert_within_bf16_error({name: triple for name, triple in zip(names, zip(logits_kernels, logits64, logits_torch))},
                             LOW)
