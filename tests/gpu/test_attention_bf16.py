"""bf16 accuracy of the attention kernels on the GPU: the project's GPU correctness check for them.

    PYTHONPATH=. python -m pytest tests/gpu/test_attention_bf16.py

For each case, `flash_attention` and `mla_attention_expanded` run on random bf16 CUDA inputs, forward
and backward. Their output and every gradient are compared with the float64 reference on the same
inputs, and so is PyTorch's own bf16 path (SDPA; for the expanded form, `reference.expand_latent`
then SDPA). Error = ||x - ref|| / ||ref||. A tensor passes when ours <= 2 x torch's + 1e-4
(flash-attention's criterion, tests/helpers.py; the additive term covers tensors where torch's
error is near zero).

The kernels run without autotuning (the first fitting tile of each kernel, tests/gpu/conftest.py),
so that each shape compiles once; set MLA_KERNELS_AUTOTUNE=1 to check the autotuned tiles instead.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ERR_FLOOR, assert_within_torch_error

from mla_kernels import reference
from mla_kernels.attention import flash_attention, mla_attention_expanded

BF16 = torch.bfloat16
DEVICE = "cuda"

# (B, T, nh, g, Dqk, Dv): the bench script's shapes, then head dims below 16 with grouped heads, odd T
CORE_SHAPES = [
    (2, 1000, 12, 12, 64, 64), (1, 4096, 12, 12, 32, 32), (1, 8192, 12, 12, 64, 64),
    (1, 8192, 16, 2, 32, 32), (2, 2047, 12, 4, 48, 48), (1, 4096, 12, 1, 128, 128),
    (1, 1500, 8, 8, 96, 96), (1, 2048, 8, 8, 192, 192), (4, 513, 12, 12, 16, 16),
    (2, 333, 8, 2, 8, 8), (3, 333, 6, 3, 4, 4), (1, 1001, 4, 1, 8, 4), (2, 333, 4, 4, 4, 8),
]
# (B, T, nh, g, hs, r): the bench script's shapes, then small head sizes and latent widths
EXPANDED_SHAPES = [
    (1, 4096, 12, 12, 64, 96), (2, 1023, 12, 3, 32, 96), (1, 8192, 12, 12, 64, 192),
    (2, 333, 8, 2, 8, 4), (1, 333, 6, 3, 4, 8),
]
# shapes also run with softmax_scale = scale_mult / sqrt(head dim)
CORE_SCALE_SHAPES = [(2, 1000, 12, 4, 64, 64), (2, 333, 8, 2, 8, 8), (1, 2048, 8, 8, 128, 128)]
EXPANDED_SCALE_SHAPES = [(2, 1023, 12, 3, 32, 96), (2, 333, 8, 2, 8, 4)]
SCALE_MULTS = [1, 3, 8]


def core_id(shape):
    B, T, nh, g, dqk, dv = shape
    return f"B{B}-T{T}-H{nh}-G{g}-D{dqk}" + (f"-Dv{dv}" if dv != dqk else "")


def expanded_id(shape):
    B, T, nh, g, hs, r = shape
    return f"B{B}-T{T}-H{nh}-G{g}-hs{hs}-r{r}"


def out_and_grads(fn, inputs, dout):
    """[out, grad of each input] of fn on fresh leaf copies of inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def sdpa(q, k, v, scale):
    """PyTorch's causal attention in the (B, T, heads, dim) layout, grouped KV heads broadcast."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=scale, enable_gqa=k.shape[2] != q.shape[2])
    return o.transpose(1, 2)


def assert_close_to_torch(ours, torch_bf16, ref64, inputs, names, out_shape):
    """Ours vs the float64 reference is within ERR_FACTOR x torch's bf16 error + ERR_FLOOR[bf16], per tensor."""
    dout = torch.randn(out_shape, device=DEVICE, dtype=BF16)
    results = zip(("out",) + names, out_and_grads(ours, inputs, dout), out_and_grads(torch_bf16, inputs, dout),
                  out_and_grads(ref64, [x.double() for x in inputs], dout.double()))
    assert_within_torch_error({name: (got, ref, torch_got, ERR_FLOOR[BF16]) for name, got, torch_got, ref in results})


def check_core(shape, softmax_scale=None):
    B, T, nh, g, dqk, dv = shape
    q = torch.randn(B, T, nh, dqk, device=DEVICE, dtype=BF16)
    k = torch.randn(B, T, g, dqk, device=DEVICE, dtype=BF16)
    v = torch.randn(B, T, g, dv, device=DEVICE, dtype=BF16)
    assert_close_to_torch(
        lambda q, k, v: flash_attention(q, k, v, softmax_scale),
        lambda q, k, v: sdpa(q, k, v, softmax_scale),
        lambda q, k, v: reference.attention_ref(q, k, v, softmax_scale)[0],
        [q, k, v], ("dq", "dk", "dv"), (B, T, nh, dv))


def check_expanded(shape, softmax_scale=None):
    B, T, nh, g, hs, r = shape
    q = torch.randn(B, T, nh, hs, device=DEVICE, dtype=BF16)
    c_k = torch.randn(B, T, g, r, device=DEVICE, dtype=BF16)
    c_v = torch.randn(B, T, g, r, device=DEVICE, dtype=BF16)
    w_uk = (torch.randn(nh, r, hs, device=DEVICE) / math.sqrt(r)).to(BF16)
    w_uv = (torch.randn(nh, r, hs, device=DEVICE) / math.sqrt(r)).to(BF16)

    def torch_path(q, c_k, c_v, w_uk, w_uv):
        return sdpa(q, reference.expand_latent(c_k, w_uk), reference.expand_latent(c_v, w_uv), softmax_scale)

    assert_close_to_torch(
        lambda *t: mla_attention_expanded(*t, softmax_scale),
        torch_path,
        lambda *t: reference.mla_attention_expanded_ref(*t, softmax_scale)[0],
        [q, c_k, c_v, w_uk, w_uv], ("dq", "dc_k", "dc_v", "dw_uk", "dw_uv"), (B, T, nh, hs))


@pytest.mark.parametrize("shape", CORE_SHAPES, ids=core_id)
def test_flash_attention_bf16(shape):
    check_core(shape)


@pytest.mark.parametrize("scale_mult", SCALE_MULTS, ids=lambda m: f"scale{m}")
@pytest.mark.parametrize("shape", CORE_SCALE_SHAPES, ids=core_id)
def test_flash_attention_bf16_softmax_scale(shape, scale_mult):
    check_core(shape, scale_mult / math.sqrt(shape[4]))


@pytest.mark.parametrize("shape", EXPANDED_SHAPES, ids=expanded_id)
def test_mla_attention_expanded_bf16(shape):
    check_expanded(shape)


@pytest.mark.parametrize("scale_mult", SCALE_MULTS, ids=lambda m: f"scale{m}")
@pytest.mark.parametrize("shape", EXPANDED_SCALE_SHAPES, ids=expanded_id)
def test_mla_attention_expanded_bf16_softmax_scale(shape, scale_mult):
    check_expanded(shape, scale_mult / math.sqrt(shape[4]))



def test_batch_offsets_past_2_31_elements():
    """A batched prefill whose q holds more than 2^31 elements (B 32, T 32768, 12 heads at a joint
    latent's r 256 does) indexes its last rows past int32: the kernels take batch offsets in int64.
    Many short rows reach the same offsets cheaply, and their B x nh = 98400 (batch, head) programs
    pass the 65535 a CUDA grid's second axis holds. The last two rows are checked, forward and
    backward, against the float64 reference and SDPA on those rows alone."""
    B, T, nh, g, d = 8200, 128, 12, 1, 256  # q: 3.2e9 elements
    q = torch.randn(B, T, nh, d, device=DEVICE, dtype=BF16)  # (B, T, nh, d)
    k = torch.randn(B, T, g, d, device=DEVICE, dtype=BF16)  # (B, T, g, d)
    v = torch.randn(B, T, g, d, device=DEVICE, dtype=BF16)  # (B, T, g, d)
    dout = torch.zeros(B, T, nh, d, device=DEVICE, dtype=BF16)  # (B, T, nh, d): only the last rows send gradients
    dout[-2:] = torch.randn(2, T, nh, d, device=DEVICE, dtype=BF16)
    tail = [x[-2:].clone() for x in (q, k, v)]
    ours = [x[-2:] for x in out_and_grads(lambda q, k, v: flash_attention(q, k, v), [q, k, v], dout)]
    del q, k, v
    torch_bf16 = out_and_grads(lambda q, k, v: sdpa(q, k, v, None), tail, dout[-2:])
    ref = out_and_grads(lambda q, k, v: reference.attention_ref(q, k, v)[0], [x.double() for x in tail],
                        dout[-2:].double())
    assert_within_torch_error({name: (got, r, t, ERR_FLOOR[BF16])
                               for name, got, t, r in zip(("out", "dq", "dk", "dv"), ours, torch_bf16, ref)})
