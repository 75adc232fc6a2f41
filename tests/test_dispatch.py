"""What every kernel of mla_kernels decides the same way (`mla_kernels._dispatch`).

Autotuning: each autotuned kernel (attention forward and backward, decode, fused append) times
every tile candidate that fits a new shape, or only the first one when MLA_KERNELS_AUTOTUNE=0;
the attention kernels search only from head dim 128 up (below it their first candidate won every
shape measured).
"""
import pytest
import torch

from mla_kernels import append, decode
from mla_kernels._dispatch import tuned_candidates
from mla_kernels.attention import kernels as attention

PRUNES = {  # kernel -> (its prune hook, the GPU candidates, the named arguments and constexprs it sees)
    "attention-fwd": (attention._prune, attention.gpu_configs("fwd"), {},
                      dict(DQ_P=128, DO_P=128, DK_P=128, DV_P=128, EXPAND=False)),
    "attention-dkdv": (attention._prune, attention.gpu_configs("dkdv"), {}, dict(DQ_P=128, DV_P=128)),
    "decode": (decode._prune_configs, decode._PARTIAL_CONFIGS, {"Q": torch.empty(0, dtype=torch.bfloat16)},
               dict(BLOCK_DK=32, BLOCK_DV=32, JOINT=False, BLOCK_M=16)),
    "append": (append._project_append_tuned.early_config_prune, append._CONFIGS, {}, {}),
}


@pytest.mark.parametrize("kernel", PRUNES)
@pytest.mark.parametrize("setting", ["1", "0", None], ids=["search", "first-only", "unset"])
def test_autotune_switch_decides_how_many_candidates_are_timed(kernel, setting, monkeypatch):
    prune, configs, named_args, meta = PRUNES[kernel]
    if setting is None:
        monkeypatch.delenv("MLA_KERNELS_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("MLA_KERNELS_AUTOTUNE", setting)
    kept = prune(configs, named_args, **meta)
    if setting == "0":
        assert len(kept) == 1 and kept[0] in configs
    else:
        assert len(kept) > 1, f"{kernel}: the search keeps {len(kept)} of {len(configs)} candidates"


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("head_dim", [8, 32, 64])
def test_attention_below_the_search_head_dim_compiles_its_first_candidate_alone(kind, head_dim, monkeypatch):
    monkeypatch.setenv("MLA_KERNELS_AUTOTUNE", "1")
    configs = attention.gpu_configs(kind)
    dims = dict(DQ_P=head_dim, DO_P=head_dim, DK_P=head_dim, DV_P=head_dim, EXPAND=False)
    assert attention._prune(configs, {}, **dims) == configs[:1]


# (kernel, padded head dim, fused expansion) -> the (BLOCK_M, BLOCK_N) candidates that fit the H200's
# shared memory (each compiled for sm_90: at 256 the backward's 64 x 64 tiles need 257 KB of 227)
FITTING_TILES = {
    ("fwd", 128, False): [(64, 64), (64, 32)],
    ("fwd", 128, True): [(64, 64), (64, 32)],
    ("dkdv", 128, False): [(64, 64), (64, 128), (32, 64)],
    ("dq", 128, False): [(64, 64), (128, 64), (64, 32)],
    ("fwd", 256, False): [(64, 64), (64, 32)],
    ("fwd", 256, True): [(64, 32)],
    ("dkdv", 256, False): [(32, 64)],
    ("dq", 256, False): [(64, 32)],
}


@pytest.mark.parametrize("kind, head_dim, expand", FITTING_TILES,
                         ids=[f"{k}-D{d}{'-expand' if e else ''}" for k, d, e in FITTING_TILES])
def test_attention_keeps_the_tiles_that_fit_wide_head_dims(kind, head_dim, expand, monkeypatch):
    monkeypatch.setenv("MLA_KERNELS_AUTOTUNE", "1")
    dims = dict(DQ_P=head_dim, DV_P=head_dim)
    if kind == "fwd":
        dims.update(DO_P=head_dim, DK_P=head_dim, EXPAND=expand)
    kept = attention._prune(attention.gpu_configs(kind), {}, **dims)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == FITTING_TILES[kind, head_dim, expand]


def test_first_candidate_is_the_searchs_first(monkeypatch):
    candidates = ["first", "second", "third"]
    monkeypatch.setenv("MLA_KERNELS_AUTOTUNE", "0")
    assert tuned_candidates(candidates) == ["first"]
    monkeypatch.setenv("MLA_KERNELS_AUTOTUNE", "1")
    assert tuned_candidates(candidates) == candidates
