"""The GPT on the Triton kernels (interpreter on CPU) against the same GPT on the reference path."""
import pytest
import torch
from helpers import grads_by_name, rel_err

from mla_gpt.model import GPT, GPTConfig

TINY = dict(n_embd=64, n_head=4, n_layer=2, block_size=48, vocab_size=37, bias=True, use_mla=True)
CONFIGS = {
    "r8-absorbed": dict(),
    "r24-expanded": dict(mla_latent_dim=24),
    "g1-joint-r32": dict(mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=32),
    "svd-weight-k4": dict(use_svd=True, svd_rank=4),
    "r24-materialized": dict(mla_latent_dim=24, mla_path="materialized"),
    "g1-joint-r32-materialized": dict(mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=32, mla_path="materialized"),
    "standard": dict(use_mla=False),
    "standard-svd-weight-k4": dict(use_mla=False, use_svd=True, svd_rank=4),
}


def twin_models(kwargs, backend="triton"):
    """The same weights on `backend` and on the reference, float32, eval mode."""
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**{**TINY, **kwargs}, attn_backend="reference")).eval()
    kernels = GPT(GPTConfig(**{**TINY, **kwargs}, attn_backend=backend)).eval()
    kernels.load_state_dict(reference.state_dict())
    return kernels, reference


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=list(CONFIGS))
def test_loss_and_gradients_match_reference(kwargs, backend):
    """The kernels, and the same model with its core on PyTorch's SDPA, against the reference."""
    kernels, reference = twin_models(kwargs, backend)
    idx = torch.randint(0, 37, (2, 30))
    grads = []
    for model in (kernels, reference):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads.append(grads_by_name(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-5, rtol=2e-3, msg=name)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=list(CONFIGS))
def test_greedy_generation_through_kernels_equals_reference_recompute(kwargs, backend):
    kernels, reference = twin_models(kwargs, backend)
    prompt = torch.randint(0, 37, (2, 5))
    generated = kernels.generate(prompt, 12, top_k=1)
    idx = prompt
    for _ in range(12):  # the reference, recomputing the whole context each step
        logits, _ = reference(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(generated, idx, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@torch.no_grad()  # passing caches asks for generation, which has no backward
def test_static_decode_step_on_kernels_matches_reference(backend):
    """The CUDA-graph step (tensor position, whole cache: the decode kernel, or SDPA with the mask
    hiding the unfilled tail) against the reference."""
    kernels, reference = twin_models(dict(), backend)
    prompt, token = torch.randint(0, 37, (2, 7)), torch.randint(0, 37, (2, 1))
    logits = []
    for model in (kernels, reference):
        caches = model.setup_caches(2, 16)
        model(prompt, caches=caches, input_pos=0)
        logits.append(model(token, caches=caches, input_pos=torch.tensor(7))[0])
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)


def test_generation_under_autocast_matches_reference():
    """Float32 weights under float16 autocast (how `sample` runs on a GPU): the fused cache append
    casts x and the composed weights to the cache's float16, as autocast does for cuBLAS."""
    kernels, reference = twin_models(dict())
    prompt = torch.randint(0, 37, (2, 5))
    with torch.autocast("cpu", dtype=torch.float16):
        assert kernels.setup_caches(2, 16)[0].k_cache.dtype == torch.float16
        generated = kernels.generate(prompt, 8, top_k=1)
        expected = reference.generate(prompt, 8, top_k=1)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


AUTOCAST_CONFIGS = {
    "absorbed": dict(mla_path="absorbed"),
    "expanded": dict(mla_path="expanded"),
    "expanded-g2": dict(mla_path="expanded", mla_kv_groups=2),
    "joint-expanded": dict(mla_path="expanded", mla_kv_groups=1, mla_joint_kv=True),
    "svd-weight-absorbed": dict(mla_path="absorbed", use_svd=True, svd_rank=4),
    "svd-weight-expanded": dict(mla_path="expanded", use_svd=True, svd_rank=4),
    "svd-weight-materialized": dict(mla_path="materialized", use_svd=True, svd_rank=4),
    "svd-activation": dict(use_svd=True, svd_rank=4, svd_mode="activation"),
    "standard": dict(use_mla=False),
}


@pytest.mark.parametrize("kwargs", AUTOCAST_CONFIGS.values(), ids=list(AUTOCAST_CONFIGS))
def test_training_step_under_autocast_matches_reference(kwargs):
    """Float32 parameters, float16 autocast (how `train` runs on a GPU, there in bfloat16): the
    kernels take the float32 expansion weights beside float16 activations, as F.linear does,
    and return float32 gradients close to the reference's under the same autocast."""
    kernels, reference = twin_models(kwargs)
    idx = torch.randint(0, 37, (2, 30))
    losses, grads = [], []
    for model in (kernels.train(), reference.train()):
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads.append(grads_by_name(model))
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[1].items():
        got = grads[0][name]
        assert got.dtype == torch.float32, name
        assert rel_err(got, want) < 2e-2, name


@pytest.mark.parametrize("d_qk, d_v", [(32, 16), (16, 24), (20, 20)], ids=["Dv<Dqk", "Dv>Dqk", "equal"])
@pytest.mark.parametrize("q_offset", [0, 5])
def test_sdpa_attention_matches_reference_for_unequal_head_dims(d_qk, d_v, q_offset):
    """SVD's narrower values (and wider ones) reach SDPA's fused kernels zero-padded: same result."""
    from mla_gpt.model.core import sdpa_attention
    from mla_kernels.reference import attention_ref

    torch.manual_seed(0)
    q = torch.randn(2, 9, 6, d_qk)
    k = torch.randn(2, 9 + q_offset, 3, d_qk)
    v = torch.randn(2, 9 + q_offset, 3, d_v)
    got = sdpa_attention(q, k, v, 0.3, torch.full((2,), q_offset, dtype=torch.int32) if q_offset else None)
    want = attention_ref(q.double(), k.double(), v.double(), 0.3, q_offset)[0]
    assert got.shape == (2, 9, 6, d_v)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
