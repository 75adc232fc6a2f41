"""bf16 accuracy of the latent decode kernel on the GPU: the project's GPU correctness check for it.

    PYTHONPATH=. python -m pytest tests/gpu/test_decode_bf16.py

`mla_kernels.decode.latent_decode` runs on random bf16 queries and caches, and is compared with
the float64 reference `mla_kernels.reference.latent_decode_ref` on the same inputs. PyTorch's own
bf16 result of the same computation is the reference run on the bf16 inputs (float32 math inside,
as PyTorch's bf16 attention accumulates, output rounded to bf16).

Tolerance rule (flash-attention's criterion, tests/helpers.py), per output tensor,
error = ||x - ref64|| / ||ref64||:
    error(kernel) <= ERR_FACTOR x error(PyTorch bf16) + floor,
with the floor ERR_FLOOR[dtype] for the output and LSE_FLOOR for the float32 logsumexp (float32
rounding of a long sum, which PyTorch's float32 logsumexp does not show). Both must also be finite.

Caches are in `LatentKVCache`'s group-major storage ((B, g, L, r) buffers seen as (B, L, g, r)),
rows have different lengths (one at its minimum Tq, one full, the rest random) and every slot at
or beyond a row's length is NaN: the kernel must never read it. Each case runs with the
heuristic's split count (`num_splits=None`), one split, and split counts that do not divide the
tiles, up to more splits than a short row has tiles.

DEVICE and LOW are the only device / dtype settings; a CPU dry run may set them to "cpu" and
float16 with TRITON_INTERPRET=1 (the interpreter's dot is wrong for bfloat16).
"""
import math

import pytest
import torch
from helpers import ERR_FLOOR, assert_within_torch_error, poison_past_lengths

from mla_kernels.decode import latent_decode
from mla_kernels.reference import latent_decode_ref

DEVICE = "cuda"
LOW = torch.bfloat16
LSE_FLOOR = 2e-5  # relative, for the float32 logsumexp: about eps32 x (KV tiles a program sums)
SCALE = 1.0 / math.sqrt(64)  # MLA keeps the head size's scale (hs 64) in the absorbed form

# (B, L, Tq, nh, g, r, rv, layout): L is the cache capacity and the longest row's length. layout:
# "separate" K and V latents; "joint" (cache_v None, V = K); "shared": V is a view of the first rv
# columns of the K buffer (DeepSeek-V2's latent: K = 512 + 64 rope dims, V = the 512)
CASES = [
    (3, 4099, 1, 12, 12, 32, 32, "separate"),  # the model's default: g = nh, r = hs / 2
    (4, 2053, 4, 12, 12, 32, 32, "separate"),  # four new tokens (speculative / chunked step)
    (3, 4099, 2, 12, 1, 256, 256, "joint"),  # one group, one joint latent
    (2, 1031, 3, 16, 1, 576, 576, "joint"),  # the widest latent the kernel takes
    (2, 1031, 1, 16, 1, 576, 512, "shared"),
    (2, 1031, 3, 16, 1, 576, 256, "separate"),  # a query tile as wide as 576 over 48 packed rows
    (3, 777, 2, 8, 2, 96, 40, "separate"),  # grouped heads, V narrower than K
    (3, 300, 4, 32, 1, 16, 16, "joint"),  # 32 heads x 4 queries = 128 packed rows: two query blocks
    # one query row per group (g = nh, Tq 1): the single-row kernel, beyond the default above
    (3, 2053, 1, 8, 8, 48, 40, "separate"),  # V narrower than K
    (3, 2053, 1, 4, 4, 64, 64, "joint"),
    (2, 1031, 1, 4, 4, 576, 576, "joint"),  # the widest tile: only the fallback config fits its registers
]
SPLITS = [None, 1, 5, 64]  # None: num_splits_heuristic; 64 leaves short rows with empty splits
LONG_CASES = [
    (1, 32768, 1, 12, 12, 32, 32, "separate"),
    (2, 32768, 1, 12, 1, 256, 256, "joint"),
    (2, 30011, 2, 16, 1, 576, 512, "shared"),
]
LONG_SPLITS = [None, 1]


def case_id(case):
    B, L, Tq, nh, g, r, rv, layout = case
    value = {"separate": f"-V{rv}" if rv != r else "", "joint": "-joint", "shared": f"-V{rv}shared"}[layout]
    return f"B{B}-L{L}-H{nh}-G{g}-R{r}{value}-Tq{Tq}"


def splits_id(num_splits):
    return "Sauto" if num_splits is None else f"S{num_splits}"


def row_lengths(B, L, Tq):
    """Per-row cached lengths (new tokens included): the shortest allowed (Tq), random ones, the full L."""
    middle = torch.randint(Tq, L + 1, (max(B - 2, 0),)).tolist()
    return ([Tq] + middle + [L])[-B:]


def make_inputs(B, L, Tq, nh, g, r, rv, layout):
    """Queries (B, Tq, nh, r) and caches as views of group-major buffers, NaN beyond each row's length."""
    lens = row_lengths(B, L, Tq)
    q = torch.randn(B, Tq, nh, r, device=DEVICE, dtype=LOW)
    ck = torch.randn(B, g, L, r, device=DEVICE, dtype=LOW).transpose(1, 2)  # (B, L, g, r)
    if layout == "joint":
        cv = None
    elif layout == "shared":
        cv = ck[..., :rv]  # (B, L, g, rv), a view of the K latent
    else:
        cv = torch.randn(B, g, L, rv, device=DEVICE, dtype=LOW).transpose(1, 2)  # (B, L, g, rv)
    poison_past_lengths(lens, ck, cv)
    return q, ck, cv, torch.tensor(lens, device=DEVICE, dtype=torch.int32)


def check_decode(case, num_splits):
    """latent_decode against the float64 reference and PyTorch's low-precision result, same inputs."""
    q, ck, cv, lens = make_inputs(*case)
    out, lse = latent_decode(q, ck, cv, lens, SCALE, num_splits=num_splits)
    out64, lse64 = latent_decode_ref(q.double(), ck.double(), None if cv is None else cv.double(), lens, SCALE)
    out_torch, lse_torch = latent_decode_ref(q, ck, cv, lens, SCALE)
    assert out.shape == out64.shape and out.dtype == LOW
    assert lse.shape == lse64.shape and lse.dtype == torch.float32
    assert_within_torch_error({"o_lat": (out, out64, out_torch, ERR_FLOOR[LOW]),
                              "lse": (lse, lse64, lse_torch, LSE_FLOOR)})


@pytest.mark.parametrize("num_splits", SPLITS, ids=splits_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_latent_decode_bf16(case, num_splits):
    """Every layout (default, joint, grouped, V narrower than K, two query blocks) at every split count."""
    check_decode(case, num_splits)


@pytest.mark.parametrize("num_splits", LONG_SPLITS, ids=splits_id)
@pytest.mark.parametrize("case", LONG_CASES, ids=case_id)
def test_latent_decode_bf16_long_context(case, num_splits):
    """Contexts up to 32k at batch 1-2: one split summing the whole row, and the heuristic's many."""
    check_decode(case, num_splits)


# B x g programs past 65535, the most a CUDA grid's second axis holds: the single-row kernel (Tq 1)
# and the dot kernel (Tq 2), each with more (row, group) programs than that
GRID_CASES = [
    (5600, 40, 1, 12, 12, 32, 32, "separate"),
    (2800, 40, 2, 24, 24, 16, 16, "separate"),
]


@pytest.mark.parametrize("num_splits", [None, 2], ids=splits_id)
@pytest.mark.parametrize("case", GRID_CASES, ids=case_id)
def test_latent_decode_bf16_grid_past_65535_programs(case, num_splits):
    check_decode(case, num_splits)
