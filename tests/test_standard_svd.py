"""SVD of the values on standard attention (use_mla=False, use_svd=True), in both modes.

'weight': each head's values are stored and attended as z = v U_k, with U_k the top-k left
singular vectors of the head's value projection: causal, cached (hs + k numbers per head and
token instead of 2 hs). 'activation': the per-sequence SVD of V, not causal, no cache.
"""
import pytest
import torch

from mla_gpt.model import GPT, GPTConfig
from mla_gpt.model.attention import CausalSelfAttention

C, NH, HS = 64, 4, 16
BASE = dict(n_embd=C, n_head=NH, n_layer=2, block_size=40, vocab_size=53, bias=True, attn_backend="reference")


def layer(**overrides):
    torch.manual_seed(0)
    return CausalSelfAttention(GPTConfig(**{**BASE, **overrides})).eval()


@pytest.mark.parametrize("mode, causal", [("weight", True), ("activation", False)])
def test_a_future_token_changes_past_outputs_only_in_activation_mode(mode, causal):
    attn = layer(use_svd=True, svd_rank=4, svd_mode=mode)
    x = torch.randn(2, 21, C)
    changed = x.clone()
    changed[:, 15] += torch.randn(2, C)
    with torch.no_grad():
        before, after = attn(x), attn(changed)
    assert torch.allclose(before[:, :15], after[:, :15], atol=1e-6) == causal
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_full_rank_weight_mode_equals_plain_attention():
    """U_k with k = hs is an orthonormal basis of the whole value space: nothing is cut."""
    plain, svd = layer(), layer(use_svd=True, svd_rank=HS)
    svd.load_state_dict(plain.state_dict(), strict=False)
    svd.train().eval()  # recompute the frozen basis from the loaded weights
    x = torch.randn(2, 19, C)
    with torch.no_grad():
        torch.testing.assert_close(svd(x), plain(x), atol=1e-5, rtol=1e-4)


def test_rank_k_values_are_the_projection_of_v_on_the_top_singular_vectors():
    """With a decaying spectrum (as trained weights have) the basis spans the exact top-k subspace."""
    attn = layer(use_svd=True, svd_rank=3)
    left = torch.linalg.qr(torch.randn(NH, HS, HS))[0]  # (nh, hs, hs)
    right = torch.linalg.qr(torch.randn(NH, C, HS))[0]  # (nh, C, hs)
    spectrum = 0.5 ** torch.arange(HS, dtype=torch.float32)  # (hs,)
    w_v = left @ torch.diag_embed(spectrum.expand(NH, HS)) @ right.transpose(1, 2)  # (nh, hs, C)
    with torch.no_grad():
        attn.c_attn.weight[2 * C :] = w_v.reshape(C, C)
    attn.train().eval()  # the basis of the new weights
    U = left[..., :3].double()  # (nh, hs, 3)
    overlap = torch.linalg.matrix_norm(U.transpose(1, 2) @ attn.value_basis.double()) ** 2
    torch.testing.assert_close(overlap, torch.full((NH,), 3.0, dtype=torch.float64), atol=1e-3, rtol=0)


def test_basis_follows_the_weights_in_training_and_is_frozen_in_eval():
    attn = layer(use_svd=True, svd_rank=4)
    frozen = attn.value_basis.clone()
    with torch.no_grad():
        attn.c_attn.weight.mul_(1.0 + torch.rand_like(attn.c_attn.weight))
    attn(torch.randn(1, 5, C))
    torch.testing.assert_close(attn.value_basis, frozen, rtol=0, atol=0)
    attn.train()(torch.randn(1, 5, C))
    assert not torch.allclose(attn.value_basis, frozen)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
def test_cached_generation_equals_recomputation(backend):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "attn_backend": backend}, use_svd=True, svd_rank=5)).eval()
    prompt = torch.randint(0, 53, (2, 6))
    generated = model.generate(prompt, 10, top_k=1)
    idx = prompt
    for _ in range(10):  # no cache: the whole context through the model at every step
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(generated, idx, rtol=0, atol=0)


def test_cache_and_memory_report_count_hs_plus_k_per_head():
    model = GPT(GPTConfig(**BASE, use_svd=True, svd_rank=4)).eval()
    attn = model.transformer.h[0].attn
    assert attn.kv_cache_elements_per_token() == NH * (HS + 4)
    cache = model.setup_caches(3, 10, dtype=torch.bfloat16)[0]
    assert cache.bytes_per_token == NH * (HS + 4) * 2
    assert attn.get_memory_savings(sequence_length=10) == pytest.approx(2 * C / (NH * (HS + 4)))
    assert attn.memory_report(sequence_length=10)["mla_bytes_per_token"] == cache.bytes_per_token
    assert attn.get_compression_ratio() == 1.0


def test_activation_mode_generates_without_a_cache_and_warns():
    model = GPT(GPTConfig(**BASE, use_svd=True, svd_rank=4, svd_mode="activation")).eval()
    assert not model.transformer.h[0].attn.supports_cache
    with pytest.warns(UserWarning, match="not causal"):
        out = model.generate(torch.randint(0, 53, (1, 4)), 3, top_k=1)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("rank", [0, HS + 1])
def test_bad_rank_is_refused_with_the_limit(rank):
    with pytest.raises(ValueError, match=rf"svd_rank must be in \[1, {HS}\] \(the head size.*got {rank}"):
        GPTConfig(**BASE, use_svd=True, svd_rank=rank)
