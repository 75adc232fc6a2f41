"""An fp8 latent cache in the model: written quantized, read as stored by the decode kernel.

CPU, float32 model, kernels through the Triton interpreter. Teacher-forced logits through an fp8
cache stay within fp8's precision of the full-precision cache's; the memory report counts the
scales.
"""
import pytest
import torch
from helpers import SMALL_GPT, SMALL_GPT_VARIANTS, rel_err, small_gpt

from mla_gpt.model import GPT, GPTConfig
from mla_kernels.append import project_append
from mla_kernels.cache import LatentKVCache, QuantizedLatents
from mla_kernels.reference import FP8_DTYPE

VARIANTS = ["mla-kernels", "mla-g1-joint-kernels", "mla-reference", "mla-sdpa", "standard-sdpa"]  # of SMALL_GPT
LOGIT_BOUND = 0.05  # relative: latents off by <= 2^-4 each, through two layers


@torch.no_grad()
def _teacher_forced_logits(model, tokens, cache_dtype, positions_as_tensor):
    """Prefill 5 tokens, then feed the rest one at a time through the caches: (T - 5, vocab) logits."""
    caches = model.setup_caches(1, tokens.size(1), cache_dtype)
    logits = [model(tokens[:, :5], caches=caches, input_pos=0)[0][:, -1]]
    for pos in range(5, tokens.size(1) - 1):
        input_pos = torch.tensor(pos) if positions_as_tensor else pos
        logits.append(model(tokens[:, pos : pos + 1], caches=caches, input_pos=input_pos)[0][:, -1])
    return torch.cat(logits)


@pytest.mark.parametrize("positions_as_tensor", [False, True], ids=["int-pos", "tensor-pos"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_cache_logits_within_fp8_precision(variant, positions_as_tensor):
    model = small_gpt(variant)
    tokens = torch.randint(0, SMALL_GPT["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(3))
    full = _teacher_forced_logits(model, tokens, None, positions_as_tensor)
    fp8 = _teacher_forced_logits(model, tokens, FP8_DTYPE, positions_as_tensor)
    rel = rel_err(fp8, full)
    assert 0 < rel <= LOGIT_BOUND, f"relative logit error {rel:.3g} of the fp8 cache"


def test_generate_with_an_fp8_cache_for_one_and_many_prompts():
    model = small_gpt("mla-kernels")
    prompt = torch.randint(0, SMALL_GPT["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, 5, temperature=0, cache_dtype=FP8_DTYPE)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], prompt)
    rows = model.generate([prompt[0], prompt[1, :3]], 5, temperature=0, cache_dtype=FP8_DTYPE)
    assert [r.numel() for r in rows] == [11, 8]


def test_memory_report_counts_the_scales():
    model = small_gpt("mla-kernels")  # r 8 (head size 16 / 2), 4 groups, separate K and V latents
    layer = model.transformer.h[0].attn
    bf16 = layer.memory_report(dtype=torch.bfloat16)
    fp8 = layer.memory_report(dtype=FP8_DTYPE)
    assert bf16["mla_bytes_per_token"] == layer.kv_cache_elements_per_token() * 2
    assert fp8["mla_bytes_per_token"] == layer.kv_cache_elements_per_token() + 2 * layer.n_groups * 4
    assert fp8["standard_bytes_per_token"] == 2 * SMALL_GPT["n_embd"] + 2 * SMALL_GPT["n_head"] * 4


def test_fp8_cache_holds_values_and_scales_and_counts_both():
    bf16 = LatentKVCache(2, 16, 3, 32, 32, dtype=torch.bfloat16, device="cpu")
    fp8 = LatentKVCache(2, 16, 3, 32, 32, dtype=FP8_DTYPE, device="cpu")
    assert fp8.bytes_per_token == 3 * 32 * 2 + 3 * 4 * 2  # fp8 keys and values, a float32 scale per group each
    assert fp8.bytes_per_token < 0.6 * bf16.bytes_per_token
    k_new, v_new = torch.randn(2, 4, 3, 32), torch.randn(2, 4, 3, 32)
    fp8.update(5, k_new, v_new)
    k, v = fp8.latents(2, 9)
    assert isinstance(k, QuantizedLatents) and k.values.shape == (2, 9, 3, 32) and k.scales.shape == (2, 9, 3)
    back = k.dequantize(torch.float32)[:, 5:]
    assert ((back - k_new).abs() <= 2**-4 * k_new.abs().amax(-1, keepdim=True)).all()
    x, weight = torch.randn(2, 1, 8), torch.randn(4 * 32 + 6 * 32, 8)  # 4 query heads of width 32, 3 groups
    q = project_append(x, weight, None, 4 * 32, fp8.k, fp8.v, 9, fp8.k_scales, fp8.v_scales)  # quantized in the kernel
    k, v = fp8.latents(2, 10)
    y = x @ weight.T
    torch.testing.assert_close(q, y[..., : 4 * 32], atol=1e-5, rtol=1e-5)
    for got, want in ((k, y[..., 128:224]), (v, y[..., 224:])):
        want = want.reshape(2, 1, 3, 32)
        assert ((got.dequantize(torch.float32)[:, 9:10] - want).abs() <= 2**-4 * want.abs().amax(-1, keepdim=True)
                + 1e-6).all()


PREFILL_CASES = [(variant, form) for variant in ("mla-kernels", "mla-g1-joint-kernels")
                 for form in ("absorbed", "expanded", "materialized")] + [("standard-sdpa", None)]


@pytest.mark.parametrize("variant, mla_path", PREFILL_CASES, ids=lambda x: x or "standard")
@torch.no_grad()
def test_prefill_attends_over_its_own_latents_not_the_fp8_copy(variant, mla_path):
    """A prefill into an fp8 cache gives the logits of the same call without a cache, in every MLA
    form: it attends over the latents it computed; the rounded copy is for the decode steps."""
    torch.manual_seed(0)
    form = {} if mla_path is None else {"mla_path": mla_path}
    model = GPT(GPTConfig(**SMALL_GPT, **SMALL_GPT_VARIANTS[variant], **form)).eval()
    tokens = torch.randint(0, SMALL_GPT["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))
    caches = model.setup_caches(2, tokens.size(1), FP8_DTYPE)
    prefilled = model(tokens, caches=caches, input_pos=0)[0][:, -1]  # (2, vocab)
    uncached = model(tokens)[0][:, -1]  # (2, vocab)
    assert caches[0].k.dtype == FP8_DTYPE
    torch.testing.assert_close(prefilled, uncached, atol=1e-5, rtol=1e-5)
