"""Multi-Head Latent Attention in the GPT: API, validation, formulas, SVD modes, causality, cache.

Run with pytest, or as the original design says: `cd tests && python test_mla_implementation.py`.
"""
import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch

from mla_gpt.model import GPT, GPTConfig
from mla_gpt.model.attention import _COMPOSED_PER_CACHE, CausalSelfAttention, MultiHeadLatentAttention
from mla_gpt.model.costs import mla_form_costs
from mla_kernels.cache import LatentKVCache

SMALL = dict(n_embd=96, n_head=4, block_size=40, vocab_size=61, n_layer=2, bias=True, attn_backend="reference")


def mla_config(**overrides):
    return GPTConfig(**{**SMALL, "use_mla": True, **overrides})


def layer(config):
    torch.manual_seed(0)
    return MultiHeadLatentAttention(config).double()


# ---- API and initialization -----------------------------------------------------------------

def test_original_design_api():
    config = GPTConfig(n_embd=768, n_head=12, n_layer=12, use_mla=True, mla_latent_dim=128,
                       use_svd=True, svd_rank=64)
    mla = MultiHeadLatentAttention(config)
    for part in ("q_proj", "kv_latent_proj", "k_expand", "v_expand", "c_proj"):
        assert isinstance(getattr(mla, part), torch.nn.Module), part
    assert mla.get_compression_ratio() > 0
    assert mla.get_memory_savings(sequence_length=1024) > 0


def test_default_latent_dim_and_groups():
    config = mla_config()
    assert config.latent_dim == config.head_size // 2 == 12
    assert config.kv_groups == config.n_head
    mla = layer(config)
    assert mla.kv_latent_proj.out_features == 2 * config.n_head * 12  # 2 nh r, as the original design
    assert mla.k_expand.weight.shape == mla.v_expand.weight.shape == (4, 12, 24)


@pytest.mark.parametrize("latent_dim", [24, 48, 192, 7], ids=lambda r: f"r{r}")
def test_forward_shape_matches_standard(latent_dim):
    x = torch.randn(2, 13, 96, dtype=torch.float64)
    standard = CausalSelfAttention(GPTConfig(**SMALL)).double()
    mla = layer(mla_config(mla_latent_dim=latent_dim))
    y = mla(x)
    assert y.shape == standard(x).shape == x.shape
    assert torch.isfinite(y).all()


def test_gpt_trains_with_mla_and_svd():
    torch.manual_seed(0)
    model = GPT(mla_config(use_svd=True, svd_rank=6))
    idx = torch.randint(0, 61, (4, 24))
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,words", [
    (dict(n_embd=100, n_head=3), ValueError, "n_embd must be divisible by n_head"),
    (dict(use_mla=True, mla_latent_dim=0), ValueError, "mla_latent_dim"),
    (dict(use_mla=True, mla_kv_groups=3), ValueError, "mla_kv_groups"),
    (dict(use_mla=True, use_svd=True, svd_rank=0), ValueError, "svd_rank"),
    (dict(use_mla=True, mla_latent_dim=12, use_svd=True, svd_rank=13), ValueError, "svd_rank"),
    (dict(use_mla=True, use_svd=True, svd_rank=25, svd_mode="activation"), ValueError, "svd_rank"),
    (dict(use_mla=True, svd_mode="fast"), ValueError, "svd_mode"),
    (dict(attn_backend="cuda"), ValueError, "attn_backend"),
    (dict(use_mla=True, mla_path="latent"), ValueError, "mla_path"),
    (dict(use_svd=True, svd_rank=25), ValueError, r"svd_rank must be in \[1, 24\] \(the head size"),
    (dict(use_mla="yes"), TypeError, "use_mla"),
    (dict(mla_latent_dim=3.5), TypeError, "mla_latent_dim"),
    (dict(dropout=1.5), ValueError, "dropout"),
], ids=["n_embd", "latent0", "groups", "svd0", "svd>latent", "svd>hs", "svd_mode", "backend", "path",
        "standard-svd>hs", "bool-type", "int-type", "dropout"])
def test_config_errors_name_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words) as info:
        GPTConfig(**{**SMALL, **kwargs})
    assert "got" in str(info.value)


def test_latent_dim_above_head_size_is_allowed_and_expanded():
    x = torch.randn(1, 4, 768)  # on the CPU: the FLOP model chooses, SDPA or the reference runs the core
    custom = dict(n_embd=768, n_head=12, use_mla=True, mla_latent_dim=192, use_svd=True, svd_rank=32)
    assert MultiHeadLatentAttention(GPTConfig(**custom)).choose_form(1024, x) == ("materialized", "sdpa")
    default = MultiHeadLatentAttention(GPTConfig(n_embd=768, n_head=12, use_mla=True))
    assert default.choose_form(1024, x) == ("absorbed", "sdpa")
    forced = MultiHeadLatentAttention(GPTConfig(**custom, attn_backend="reference", mla_path="expanded"))
    assert forced.choose_form(1024, x) == ("expanded", "reference")


def test_sequence_longer_than_block_size():
    model = GPT(mla_config())
    with pytest.raises(ValueError, match="exceeds block_size=40"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_cache_errors():
    cache = LatentKVCache(2, 8, 3, 5, 4, dtype=torch.float32, device="cpu")
    k, v = torch.randn(2, 3, 3, 5), torch.randn(2, 3, 3, 4)
    with pytest.raises(ValueError, match="cache overflow"):
        cache.update(6, k, v)
    with pytest.raises(ValueError, match="float64"):
        cache.update(0, k.double(), v)
    with pytest.raises(ValueError, match="max_batch"):
        cache.update(0, torch.randn(3, 3, 3, 5), torch.randn(3, 3, 3, 4))
    with pytest.raises(ValueError, match="v_new must be given"):
        cache.update(0, k)
    with pytest.raises(ValueError, match="max_seq"):
        LatentKVCache(1, 0, 1, 1, dtype=torch.float32, device="cpu")


def test_cache_update_writes_in_place_and_latents_hands_out_the_prefix():
    cache = LatentKVCache(2, 8, 3, 5, dtype=torch.float64, device="cpu")  # joint latent
    first, second = torch.randn(2, 3, 3, 5, dtype=torch.float64), torch.randn(2, 2, 3, 5, dtype=torch.float64)
    cache.update(0, first)
    cache.update(torch.tensor([3, 3]), second)  # per row, as a decode step writes
    k, v = cache.latents(2, 5)
    assert v is None and k.shape == (2, 5, 3, 5) and cache.latents(1)[0].shape == (1, 8, 3, 5)
    torch.testing.assert_close(k, torch.cat([first, second], dim=1), rtol=0, atol=0)


# ---- compression and memory formulas ----------------------------------------------------------

@pytest.mark.parametrize("kwargs,per_token", [
    (dict(), 2 * 4 * 12),
    (dict(mla_latent_dim=48), 2 * 4 * 48),
    (dict(mla_kv_groups=2, mla_latent_dim=24), 2 * 2 * 24),
    (dict(mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=64), 64),
    (dict(use_svd=True, svd_rank=5), 4 * (12 + 5)),
    (dict(mla_joint_kv=True, use_svd=True, svd_rank=5), 4 * (12 + 5)),
], ids=["default", "r48", "g2-r24", "g1-joint-r64", "svd-weight-k5", "joint-svd-k5"])
def test_memory_savings_formula_matches_cache_bytes(kwargs, per_token):
    mla = layer(mla_config(**kwargs))
    assert mla.kv_cache_elements_per_token() == per_token
    report = mla.memory_report(sequence_length=100, batch_size=3, n_layer=2, dtype=torch.float16)
    assert report["mla_bytes_per_token"] == 2 * per_token
    assert report["standard_bytes_per_token"] == 2 * 2 * 96
    assert report["mla_bytes_per_layer"] == 2 * per_token * 100 * 3
    assert report["mla_bytes_per_sequence"] == 2 * per_token * 100 * 2
    assert mla.get_memory_savings(sequence_length=100) == pytest.approx(2 * 96 / per_token)
    cache = mla.make_cache(3, 100, torch.float16, "cpu")
    standard_cache = CausalSelfAttention(GPTConfig(**SMALL)).make_cache(3, 100, torch.float16, "cpu")
    assert cache.nbytes == report["mla_bytes_per_layer"]
    assert standard_cache.nbytes == report["standard_bytes_per_layer"]


def test_memory_report_rejects_bad_length():
    with pytest.raises(ValueError, match="sequence_length must be a positive int, got 0"):
        layer(mla_config()).memory_report(sequence_length=0)


def test_compression_ratio_formula():
    mla = layer(mla_config(mla_latent_dim=24))
    C, nh, hs, r = 96, 4, 24, 24
    mla_params = (C * C + C) * 2 + (C * 2 * nh * r + 2 * nh * r) + 2 * nh * r * hs
    standard_params = 4 * C * C + 4 * C
    assert mla.get_compression_ratio() == pytest.approx(standard_params / mla_params)


def test_form_cost_model_prefers_latent_space_below_head_size():
    for r in (8, 16, 32):
        costs = mla_form_costs(2048, 768, 12, r, r)
        assert costs["absorbed"] < min(costs["expanded"], costs["materialized"])
    costs = mla_form_costs(2048, 768, 12, 192, 192)
    assert min(costs["expanded"], costs["materialized"]) < costs["absorbed"]
    # the fused kernel re-expands each K/V tile per query tile: at long lengths expanding once wins
    long = mla_form_costs(16384, 768, 12, 192, 192)
    assert long["materialized"] < long["expanded"]


# ---- the two paths agree; every path is causal ---------------------------------------------------

PATH_CONFIGS = {
    "default": dict(),
    "r24": dict(mla_latent_dim=24),
    "r48-g2": dict(mla_latent_dim=48, mla_kv_groups=2),
    "r192": dict(mla_latent_dim=192),
    "g1-joint-r30": dict(mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=30),
    "svd-weight": dict(use_svd=True, svd_rank=5),
}


@pytest.mark.parametrize("form", ["expanded", "materialized"])
@pytest.mark.parametrize("kwargs", PATH_CONFIGS.values(), ids=list(PATH_CONFIGS))
def test_absorbed_equals_other_forms_in_module(kwargs, form):
    x = torch.randn(2, 17, 96, dtype=torch.float64)
    absorbed = layer(mla_config(mla_path="absorbed", **kwargs)).eval()
    other = layer(mla_config(mla_path=form, **kwargs)).eval()
    other.load_state_dict(absorbed.state_dict())
    torch.testing.assert_close(absorbed(x), other(x), atol=1e-10, rtol=1e-10)


CAUSAL_CONFIGS = {
    "standard": dict(use_mla=False),
    **{f"{name}-{path}": dict(kwargs, mla_path=path) for name, kwargs in PATH_CONFIGS.items()
       for path in ("absorbed", "expanded", "materialized")},
}


def future_changes_past(config, t=9):
    """Does changing inputs after position t change any output at positions <= t?"""
    torch.manual_seed(0)
    module = (MultiHeadLatentAttention if config.use_mla else CausalSelfAttention)(config).double()
    x = torch.randn(2, 20, 96, dtype=torch.float64)
    x_changed = x.clone()
    x_changed[:, t + 1:] = torch.randn_like(x_changed[:, t + 1:])
    return not torch.allclose(module(x)[:, : t + 1], module(x_changed)[:, : t + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs", CAUSAL_CONFIGS.values(), ids=list(CAUSAL_CONFIGS))
def test_every_path_is_causal(kwargs):
    assert not future_changes_past(GPTConfig(**{**SMALL, "use_mla": True, **kwargs}))


def test_svd_activation_leaks_the_future_as_documented():
    assert future_changes_past(mla_config(use_svd=True, svd_rank=3, svd_mode="activation"))


# ---- SVD integration ---------------------------------------------------------------------------

def test_svd_weight_basis_orthonormal_and_frozen_in_eval():
    mla = layer(mla_config(use_svd=True, svd_rank=5, mla_kv_groups=2))
    mla.eval()
    basis = mla.value_basis.clone()  # (g, r, k)
    assert basis.shape == (2, 12, 5)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(5, dtype=torch.float64).expand(2, -1, -1))
    with torch.no_grad():
        mla.v_expand.weight.add_(torch.randn_like(mla.v_expand.weight))
    mla(torch.randn(1, 4, 96, dtype=torch.float64))
    torch.testing.assert_close(mla.value_basis, basis, rtol=0, atol=0)  # eval: frozen
    mla.train()
    mla(torch.randn(1, 4, 96, dtype=torch.float64))
    assert not torch.allclose(mla.value_basis, basis)  # training: recomputed from the new weights


def test_svd_weight_basis_recomputed_only_when_weights_change(monkeypatch):
    mla = layer(mla_config(use_svd=True, svd_rank=5))
    calls = []
    compute = mla._compute_value_basis
    monkeypatch.setattr(mla, "_compute_value_basis", lambda: calls.append(1) or compute())
    x = torch.randn(1, 6, 96, dtype=torch.float64)
    mla(x)
    mla(x)  # a second micro-step on the same weights reuses the basis
    assert len(calls) == 1
    optimizer = torch.optim.SGD(mla.parameters(), lr=0.1)
    mla(x).sum().backward()
    optimizer.step()
    before = mla.value_basis.clone()
    mla(x)  # the step changed v_expand: recomputed
    assert len(calls) == 2 and not torch.allclose(mla.value_basis, before)
    with torch.no_grad():
        torch.testing.assert_close(mla.value_basis, compute())


def test_svd_weight_keeps_the_top_subspace_of_each_group():
    mla = layer(mla_config(use_svd=True, svd_rank=5, mla_kv_groups=2)).eval()
    stacked = mla.v_expand.weight.detach().view(2, 2, 12, 24).transpose(1, 2).reshape(2, 12, 48)
    U = torch.linalg.svd(stacked)[0][..., :5]
    # the randomized basis spans (nearly) the exact top-5 subspace
    overlap = torch.linalg.matrix_norm(U.transpose(1, 2) @ mla.value_basis) ** 2
    assert (overlap > 5 - 0.05).all(), overlap


def test_svd_full_rank_activation_is_plain_mla():
    x = torch.randn(2, 10, 96, dtype=torch.float64)
    plain = layer(mla_config(mla_path="expanded"))
    svd = layer(mla_config(use_svd=True, svd_mode="activation", svd_rank=24))
    svd.load_state_dict(plain.state_dict())
    torch.testing.assert_close(plain(x), svd(x), atol=1e-10, rtol=1e-10)


def test_svd_activation_output_uses_rank_k_values():
    mla = layer(mla_config(use_svd=True, svd_mode="activation", svd_rank=3))
    captured = {}

    def capture(module, args, output):
        captured["v"] = output

    mla.v_expand.register_forward_hook(capture)
    x = torch.randn(1, 16, 96, dtype=torch.float64)
    y = mla(x)
    y.sum().backward()  # gradients flow through the low-rank values
    assert mla.v_expand.weight.grad is not None and torch.isfinite(mla.v_expand.weight.grad).all()
    assert captured["v"].shape == (1, 16, 4, 24)


# ---- cached generation ---------------------------------------------------------------------------

GENERATION_CONFIGS = {
    "standard": dict(use_mla=False),
    "mla-default": dict(use_mla=True),
    "mla-r48": dict(use_mla=True, mla_latent_dim=48),
    "mla-g1-joint": dict(use_mla=True, mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=40),
    "mla-svd-weight": dict(use_mla=True, use_svd=True, svd_rank=6),
}


def recompute_greedy(model, idx, steps):
    """nanoGPT's generation: the whole (cropped) context through the model at every step."""
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("kwargs", GENERATION_CONFIGS.values(), ids=list(GENERATION_CONFIGS))
def test_cached_generation_equals_full_recompute(kwargs):
    torch.manual_seed(1)
    model = GPT(GPTConfig(**{**SMALL, **kwargs})).double().eval()
    prompt = torch.randint(0, 61, (3, 7))
    # 45 new tokens run past block_size 40, so the sliding window is covered too
    cached = model.generate(prompt, 45, top_k=1)
    torch.testing.assert_close(cached, recompute_greedy(model, prompt, 45), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", GENERATION_CONFIGS.values(), ids=list(GENERATION_CONFIGS))
@torch.no_grad()  # passing caches asks for generation, which has no backward
def test_static_shape_decode_step_equals_prefix_step(kwargs):
    """The CUDA-graph step (position in a tensor, whole cache read) gives the same logits."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(**{**SMALL, **kwargs})).double().eval()
    prompt = torch.randint(0, 61, (2, 9))
    token = torch.randint(0, 61, (2, 1))
    logits = []
    for position in (9, torch.tensor(9)):
        caches = model.setup_caches(2, 20)
        model(prompt, caches=caches, input_pos=0)
        logits.append(model(token, caches=caches, input_pos=position)[0])
    torch.testing.assert_close(logits[1], logits[0], atol=1e-12, rtol=0)


def test_cuda_graph_needs_cuda():
    model = GPT(mla_config()).eval()
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device, got idx on cpu"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, cuda_graph=True)


@pytest.mark.parametrize("kwargs", [dict(), dict(use_svd=True, svd_rank=5)], ids=["mla", "svd-weight"])
def test_generation_composes_weights_once_per_cache(kwargs):
    mla = layer(mla_config(mla_path="absorbed", **kwargs)).eval()
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    with torch.no_grad():
        cache = mla.make_cache(2, 8, torch.float64, x.device)
        mla(x[:, :4], cache)  # a prefill
        composed = _COMPOSED_PER_CACHE[cache][1][None]
        mla(x[:, 4:], cache, torch.full((2,), 4, dtype=torch.int32))  # a decode step at position 4
        assert _COMPOSED_PER_CACHE[cache][1][None] is composed  # one generation: composed once
        mla(x[:, :4], cache)
        assert _COMPOSED_PER_CACHE[cache][1][None] is not composed  # a new prefill composes afresh
        kept = len(_COMPOSED_PER_CACHE)
        mla(x, None)
        assert len(_COMPOSED_PER_CACHE) == kept  # a call without a cache keeps nothing
        del cache
        assert len(_COMPOSED_PER_CACHE) == kept - 1  # gone with its cache
        copy.deepcopy(mla)
        pickle.dumps(mla)  # torch.save(model) pickles it


@pytest.mark.parametrize("kwargs", [dict(mla_path="materialized"), dict(mla_path="expanded"),
                                    dict(mla_path="materialized", mla_kv_groups=1, mla_joint_kv=True),
                                    dict(mla_path="materialized", use_svd=True, svd_rank=5)],
                         ids=["materialized", "expanded", "joint-materialized", "svd-weight-materialized"])
def test_prefill_runs_the_planned_form_and_fills_the_cache(kwargs, monkeypatch):
    """A prefill is a training-shaped forward: it runs the layer's form (here forced) on the fresh
    latents and stores them; only decode steps run in latent space over the cache."""
    mla = layer(mla_config(**kwargs)).eval()
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    calls = []
    absorbed = mla._forward_absorbed
    monkeypatch.setattr(mla, "_forward_absorbed", lambda *a: calls.append(a[3]) or absorbed(*a))
    with torch.no_grad():
        whole = mla(x, None)
        cache = mla.make_cache(2, 8, torch.float64, x.device)
        prefilled = mla(x[:, :4], cache)  # a prefill
        assert calls == []
        stepped = mla(x[:, 4:], cache, torch.full((2,), 4, dtype=torch.int32))  # a decode step at position 4
        assert len(calls) == 1 and calls[0] is not None
    torch.testing.assert_close(prefilled, whole[:, :4], atol=1e-12, rtol=0)
    torch.testing.assert_close(stepped, whole[:, 4:], atol=1e-12, rtol=0)
    with torch.no_grad():  # new weights, the same cache: the next generation's decode steps use them
        for p in mla.parameters():
            p.mul_(1.5)
        whole = mla(x, None)
        mla(x[:, :4], cache)
        stepped = mla(x[:, 4:], cache, torch.full((2,), 4, dtype=torch.int32))
    torch.testing.assert_close(stepped, whole[:, 4:], atol=1e-12, rtol=0)


def test_a_prefill_with_gradients_still_starts_a_new_generation():
    """An absorbed prefill that composes without keeping (autograd on, or compiling) still drops the
    cache's weights from the generation before, so the decode steps after it use the current ones."""
    mla = layer(mla_config(mla_path="absorbed")).eval()
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    step_at_4 = torch.full((2,), 4, dtype=torch.int32)
    cache = mla.make_cache(2, 8, torch.float64, x.device)
    with torch.no_grad():
        mla(x[:, :4], cache)
        mla(x[:, 4:], cache, step_at_4)  # one generation: the composed weights kept for the cache
        for p in mla.parameters():
            p.mul_(1.5)
        whole = mla(x, None)
    mla(x[:, :4], cache)  # a prefill with autograd on
    with torch.no_grad():
        stepped = mla(x[:, 4:], cache, step_at_4)
    torch.testing.assert_close(stepped, whole[:, 4:], atol=1e-12, rtol=0)


def test_reused_caches_serve_the_weights_of_the_model_using_them():
    """Caches from `setup_caches` refilled after load_state_dict, or handed to another model."""
    torch.manual_seed(0)
    first, second = (GPT(mla_config(mla_path="absorbed")).double().eval() for _ in range(2))
    tokens = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        caches = first.setup_caches(2, 8)
        first(tokens, caches=caches)
        expected = second(tokens, caches=second.setup_caches(2, 8))[0]
        torch.testing.assert_close(second(tokens, caches=caches)[0], expected, atol=1e-12, rtol=0)
        first.load_state_dict(second.state_dict())
        torch.testing.assert_close(first(tokens, caches=caches)[0], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(use_svd=True, svd_rank=5)], ids=["mla", "svd-weight"])
def test_weights_changed_without_a_version_bump_are_seen(kwargs):
    """A replayed CUDA graph (the trainer's captured step) updates parameters without moving their
    version counters, as writes through `.data` do here: evals and generations after it must see
    the new weights."""
    torch.manual_seed(0)
    model = GPT(mla_config(mla_path="absorbed", **kwargs)).double().eval()
    tokens = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        model(tokens, tokens)  # an eval before the update
        model.generate(tokens, 3, top_k=1)  # and a generation
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.1)  # no version bump
        model.eval()  # svd 'weight' recomputes its basis on entering eval, whatever the versions say
        fresh = GPT(mla_config(mla_path="absorbed", **kwargs)).double()
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        torch.testing.assert_close(model(tokens, tokens), fresh(tokens, tokens), atol=1e-12, rtol=0)
        caches, fresh_caches = model.setup_caches(2, 8), fresh.setup_caches(2, 8)
        torch.testing.assert_close(model(tokens, caches=caches)[0], fresh(tokens, caches=fresh_caches)[0],
                                   atol=1e-12, rtol=0)


def test_generation_uses_one_token_per_step():
    model = GPT(mla_config()).double().eval()
    lengths = []
    model.transformer.h[0].attn.register_forward_pre_hook(lambda module, args: lengths.append(args[0].size(1)))
    model.generate(torch.randint(0, 61, (2, 5)), 6, top_k=1)
    assert lengths == [5, 1, 1, 1, 1, 1]


def test_generation_rejects_bad_sampling_arguments():
    model = GPT(mla_config()).eval()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, top_k=0)


def test_svd_activation_generation_warns_and_recomputes():
    torch.manual_seed(0)
    model = GPT(mla_config(use_svd=True, svd_rank=3, svd_mode="activation")).double().eval()
    prompt = torch.randint(0, 61, (1, 6))
    with pytest.warns(UserWarning, match="not causal"):
        out = model.generate(prompt, 5, top_k=1)
    torch.testing.assert_close(out, recompute_greedy(model, prompt, 5), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(use_svd=True, svd_rank=5),
                                    dict(use_svd=True, svd_rank=5, svd_mode="activation")],
                         ids=["mla", "svd-weight", "svd-activation"])
def test_torch_compile_trains(kwargs):
    """torch.compile traces the model; the randomized SVD runs outside the graph."""
    torch.manual_seed(0)
    model = GPT(mla_config(**kwargs))
    idx = torch.randint(0, 61, (2, 17))
    eager_loss = model(idx[:, :-1], idx[:, 1:])[1]
    compiled_loss = torch.compile(model, backend="eager")(idx[:, :-1], idx[:, 1:])[1]
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)


def test_nanogpt_interface():
    model = GPT(mla_config())
    assert model.get_num_params() < model.get_num_params(non_embedding=False)
    assert 0 < model.estimate_mfu(fwdbwd_per_iter=4, dt=1.0) < 1
    model.crop_block_size(16)
    assert model.transformer.wpe.weight.shape[0] == 16
    with pytest.raises(ValueError, match="block_size"):
        model.crop_block_size(17)


def test_runs_as_a_plain_script():
    """`python test_mla_implementation.py` from tests/ (pytest is a dependency of the package)."""
    import subprocess

    here = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, Path(__file__).name, "-k", "nanogpt_interface"], cwd=here,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


def test_readme_usage_example_costs_what_the_readme_says():
    """The original design's example (r 128 at head size 64, SVD rank 64) is not a memory saver;
    the README says so with these numbers."""
    config = GPTConfig(n_embd=768, n_head=12, n_layer=12, use_mla=True, mla_latent_dim=128, use_svd=True,
                       svd_rank=64)
    mla = MultiHeadLatentAttention(config)
    ratio, savings = mla.get_compression_ratio(), mla.get_memory_savings(sequence_length=1024)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"`get_compression_ratio()` gives\n{ratio:.2f}x" in readme and ratio < 1
    assert f"`get_memory_savings()` {savings:.2f}x" in readme and savings < 1


def test_readme_test_command_pins_what_ci_runs():
    root = Path(__file__).resolve().parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    for pin in ("torch==2.13.0", "triton==3.6.0", '"numpy<2.4"', '-e ".[test,hf]"'):
        assert pin in readme and pin in ci, pin


def test_caches_with_autograd_on_are_refused():
    """Caches ask for generation, whose kernels have no backward: autograd must be off."""
    model = GPT(GPTConfig(**SMALL))
    caches = model.setup_caches(1, 8)
    with pytest.raises(RuntimeError, match=r"caches are for generation.*torch.no_grad\(\)"):
        model(torch.randint(0, 61, (1, 3)), caches=caches, input_pos=0)


if __name__ == "__main__":  # the original design's `cd tests && python test_mla_implementation.py`
    sys.exit(pytest.main([__file__, "-v", *sys.argv[1:]]))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_value_basis_ignores_autocast(backend):
    """The SVD basis of the values is computed from the float32 weights in float32 under bf16
    autocast too (PyTorch's QR on a GPU takes no bfloat16): the same basis as without autocast."""
    config = mla_config(mla_latent_dim=24, use_svd=True, svd_rank=5, attn_backend=backend)
    torch.manual_seed(0)
    module = MultiHeadLatentAttention(config)
    plain = module._compute_value_basis()
    with torch.autocast("cpu", torch.bfloat16):
        under_autocast = module._compute_value_basis()
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, atol=0, rtol=0)
