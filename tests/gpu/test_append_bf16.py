"""bf16 accuracy of the fused latent projection + cache append on the GPU: its GPU correctness check.

    PYTHONPATH=. python -m pytest tests/gpu/test_append_bf16.py

`mla_kernels.append.project_append` computes
y = x W^T + b and writes its latent columns into the cache views (max_batch, max_seq, g, dim) of a
`LatentKVCache` (`.k`, `.v`; group-major storage) at positions [pos, pos + T) of rows [0, B),
pos = cache_seqlens, the tokens already cached. It is compared with the float64 reference
`mla_kernels.reference.project_append_ref` on the same bf16 inputs; PyTorch's own bf16 result of
the same computation is `F.linear` in bf16 (cuBLAS), the unfused path the model would otherwise run.

Tolerance rule (flash-attention's criterion, tests/helpers.py), per output (q', the written key
slots, the written value slots), error = ||x - ref64|| / ||ref64||:
    error(kernel) <= ERR_FACTOR x error(F.linear in bf16) + ERR_FLOOR[dtype].
Before the call every cache slot is NaN; afterwards the written slots hold no NaN and every other
slot (other positions, rows >= B of a larger cache) is still NaN, bit for bit untouched.

The op takes all tensors in one dtype: float32 weights under bf16 autocast are the caller's to
cast (the model casts its composed weights, tests/gpu/test_model_bf16.py checks that path).

DEVICE and LOW are the only device / dtype settings; a CPU dry run may set them to "cpu" and
float16 with TRITON_INTERPRET=1 (the interpreter's dot is wrong for bfloat16).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import ERR_FLOOR, assert_within_torch_error

from mla_kernels.append import project_append
from mla_kernels.cache import LatentKVCache
from mla_kernels.reference import project_append_ref

DEVICE = "cuda"
LOW = torch.bfloat16

# (B, T, C, nh, g, r, rv, bias, pos, max_batch, max_seq): query_dim = nh r; rv 0 is a joint latent;
# the new tokens go to positions pos .. pos + T - 1
CASES = [
    (1, 1, 768, 12, 12, 32, 32, True, 17, 4, 1024),  # a decode step of the model's default layout
    (32, 1, 768, 12, 12, 32, 32, False, 1000, 32, 1024),
    (64, 1, 768, 12, 1, 256, 0, True, 0, 70, 512),  # joint latent, the largest row bucket, from slot 0
    (7, 5, 768, 12, 1, 256, 0, False, 300, 9, 1024),  # joint latent, a chunk of 5
    (5, 3, 768, 12, 12, 32, 16, True, 1021, 6, 1024),  # svd 'weight': value latent narrower, last slots
    (3, 7, 200, 4, 2, 24, 24, True, 123, 3, 131),  # C, dims and positions off the tile sizes
    (2, 16, 1000, 16, 1, 576, 0, True, 4083, 3, 4099),  # DeepSeek-V2's 576 joint latent, 16 new tokens
    (65, 2, 96, 6, 3, 8, 4, False, 31, 66, 33),  # more rows than the largest bucket, latents below a tile
]


def case_id(case):
    B, T, C, nh, g, r, rv, bias, pos, max_batch, max_seq = case
    return (f"B{B}-T{T}-C{C}-H{nh}-G{g}-R{r}" + ("-joint" if rv == 0 else f"-V{rv}")
            + ("-bias" if bias else "") + f"-P{pos}-of{max_seq}")


def assert_within_bf16_error(checks):
    """checks: {name: (got, want64, torch_low)}, each held to the rule with the floor ERR_FLOOR[LOW]."""
    assert_within_torch_error({name: (*triple, ERR_FLOOR[LOW]) for name, triple in checks.items()})


def make_inputs(B, T, C, nh, g, r, rv, bias):
    """x (B, T, C), weight (nh r + g r + g rv, C) scaled to unit-variance outputs, bias or None."""
    n_out = nh * r + g * (r + rv)
    x = torch.randn(B, T, C, device=DEVICE, dtype=LOW)
    weight = (torch.randn(n_out, C, device=DEVICE) / C ** 0.5).to(LOW)
    b = torch.randn(n_out, device=DEVICE, dtype=LOW) if bias else None
    return x, weight, b


def poisoned_cache(max_batch, max_seq, g, r, rv):
    """A LatentKVCache whose every slot is NaN."""
    cache = LatentKVCache(max_batch, max_seq, g, r, rv or None, dtype=LOW, device=DEVICE)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    return cache


def assert_only_new_slots_written(buf, B, pos, T):
    """buf (max_batch, max_seq, g, dim): slots [:B, pos:pos + T] hold numbers, all others NaN."""
    new = buf[:B, pos : pos + T]
    assert not new.isnan().any(), "a slot of the new tokens was not written"
    outside = torch.ones(buf.shape[:3], dtype=torch.bool, device=buf.device)
    outside[:B, pos : pos + T] = False
    assert buf[outside].isnan().all(), "a slot other than rows [0, B) x positions [pos, pos + T) was written"


def check_append(case, tensor_pos):
    """project_append into a NaN cache against project_append_ref in float64 and F.linear in LOW."""
    B, T, C, nh, g, r, rv, bias, pos, max_batch, max_seq = case
    x, weight, b = make_inputs(B, T, C, nh, g, r, rv, bias)
    qd = nh * r
    cache = poisoned_cache(max_batch, max_seq, g, r, rv)
    q = project_append(x, weight, b, qd, cache.k, cache.v, torch.tensor(pos, device=DEVICE) if tensor_pos else pos)

    k64, v64 = cache.k.double().fill_(0), cache.v.double().fill_(0)  # (max_batch, max_seq, g, dim)
    q64 = project_append_ref(x.double(), weight.double(), None if b is None else b.double(), qd, k64, v64, pos)
    y = F.linear(x, weight, b)  # (B, T, N), PyTorch's bf16 path
    new = (slice(0, B), slice(pos, pos + T))
    assert q.shape == (B, T, qd) and q.dtype == LOW
    checks = {"q'": (q, q64, y[..., :qd]), "c^k": (cache.k[new], k64[new], y[..., qd : qd + g * r].view(B, T, g, r))}
    if rv:
        checks["c^v"] = (cache.v[new], v64[new], y[..., qd + g * r :].view(B, T, g, rv))
    assert_within_bf16_error(checks)
    assert_only_new_slots_written(cache.k, B, pos, T)
    assert_only_new_slots_written(cache.v, B, pos, T)


@pytest.mark.parametrize("tensor_pos", [False, True], ids=["int-pos", "tensor-pos"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_project_append_bf16(case, tensor_pos):
    """Written slots match float64 within the bf16 rule; nothing else in the cache changes.

    The position as an int (checked on the host) and as a 0-dim device tensor (CUDA-graph steps).
    """
    check_append(case, tensor_pos)


@pytest.mark.parametrize("tensor_pos", [False, True], ids=["int-pos", "tensor-pos"])
def test_append_into_cache_latents_bf16(tensor_pos):
    """project_append into a LatentKVCache's `.k` / `.v`, as the model's decode step writes, and the
    cache's `latents` views of it: the filled prefix (B, pos + T, g, dim), or the whole buffers."""
    B, T, C, nh, g, r, rv, pos, max_seq = 3, 2, 768, 12, 12, 32, 16, 510, 777
    x, weight, b = make_inputs(B, T, C, nh, g, r, rv, True)
    qd = nh * r
    cache = poisoned_cache(B + 1, max_seq, g, r, rv)
    q = project_append(x, weight, b, qd, cache.k, cache.v, torch.tensor(pos, device=DEVICE) if tensor_pos else pos)
    end = max_seq if tensor_pos else pos + T
    k, v = cache.latents(B, end)
    assert k.shape == (B, end, g, r) and v.shape == (B, end, g, rv)
    assert k.data_ptr() == cache.k.data_ptr() and v.data_ptr() == cache.v.data_ptr()

    k64, v64 = cache.k.double().fill_(0), cache.v.double().fill_(0)
    q64 = project_append_ref(x.double(), weight.double(), b.double(), qd, k64, v64, pos)
    y = F.linear(x, weight, b)
    new = (slice(0, B), slice(pos, pos + T))
    assert_within_bf16_error({"q'": (q, q64, y[..., :qd]),
                              "c^k": (k[new], k64[new], y[..., qd : qd + g * r].view(B, T, g, r)),
                              "c^v": (v[new], v64[new], y[..., qd + g * r :].view(B, T, g, rv))})
    assert_only_new_slots_written(cache.k, B, pos, T)
    assert_only_new_slots_written(cache.v, B, pos, T)
