"""mla_gpt.model.plan: the form and core an MLA layer runs, from a measured table or the rule."""
import json

import pytest
import torch

from mla_gpt.model import plan

SHAPE = plan.layer_key(768, 12, 64, 32, 32, 12, False, torch.bfloat16)
WIDE = plan.layer_key(768, 12, 64, 192, 32, 12, False, torch.bfloat16)


def table_rows(timings):
    """Long-format rows as bench/backends.py writes them: {(T, provider): (fwd_ms, fwd_bwd_ms)}."""
    rows = []
    for (T, provider), (fwd, both) in timings.items():
        shape = dict(n_embd=768, n_head=12, head_size=64, latent_dim=32, value_dim=32, groups=12, joint=False,
                     dtype="bfloat16", T=T, B=16384 // T)
        for metric, value in (("fwd_ms", fwd), ("fwd_bwd_ms", both)):
            rows.append(dict(benchmark="backends", provider=provider, **shape, metric=metric, value=value,
                             unit="ms", gpu="NVIDIA H200", commit="0" * 7))
    return rows


@pytest.fixture
def h200_table(tmp_path, monkeypatch):
    timings = {
        (1024, "absorbed/triton"): (1.0, 3.0), (1024, "absorbed/cudnn"): (1.2, 2.5),
        (1024, "materialized/cudnn"): (2.0, 5.0), (1024, "expanded/triton"): (2.5, 6.0),
        (8192, "absorbed/triton"): (4.0, 9.0), (8192, "absorbed/cudnn"): (5.0, 12.0),
    }
    (tmp_path / "nvidia_h200.json").write_text(json.dumps(table_rows(timings)))
    monkeypatch.setattr(plan, "TABLES", plan._load_tables(tmp_path))


@pytest.mark.parametrize("seq_len, training, expected", [
    (1024, True, ("absorbed", "cudnn")),  # fastest forward + backward
    (1024, False, ("absorbed", "triton")),  # fastest forward alone
    (700, True, ("absorbed", "cudnn")),  # nearest measured length by ratio: 1024
    (2800, True, ("absorbed", "cudnn")),  # 2800 / 1024 < 8192 / 2800
    (3000, True, ("absorbed", "triton")),  # 8192 / 3000 < 3000 / 1024
    (65536, True, ("absorbed", "triton")),
], ids=["T1024-train", "T1024-eval", "T700", "T2800", "T3000", "T65536"])
def test_choose_takes_the_fastest_measured_pair_at_the_nearest_length(h200_table, seq_len, training, expected):
    assert plan.choose(SHAPE, seq_len, training, "nvidia_h200@9") == expected


def test_forced_core_and_form_narrow_the_candidates(h200_table):
    assert plan.choose(SHAPE, 1024, True, "nvidia_h200@9", core="triton") == ("absorbed", "triton")
    assert plan.choose(SHAPE, 1024, True, "nvidia_h200@9", form="materialized") == ("materialized", "cudnn")
    assert plan.choose(SHAPE, 1024, True, "nvidia_h200@9", form="expanded") == ("expanded", "triton")


def test_equal_ratio_takes_the_longer_length(h200_table):
    entries = plan.TABLES["nvidia_h200"][SHAPE]
    assert plan._nearest(entries, 2896)[0] == 1024  # 2896 / 1024 < 8192 / 2896
    assert plan._nearest([(1024, {}), (4096, {})], 2048)[0] == 4096


@pytest.mark.parametrize("shape, kind, expected", [
    (SHAPE, "nvidia_h100@9", ("absorbed", "triton")),  # no table: r 32 is a core our kernel wins on Hopper
    (SHAPE, "nvidia_a100@8", ("absorbed", "sdpa")),  # another architecture: PyTorch's own choice
    (WIDE, "nvidia_h200@9", ("materialized", "sdpa")),  # no row for r 192: FLOPs pick the form, hs 64 core
], ids=["unseen-hopper", "unseen-ampere", "unmeasured-shape"])
def test_the_rule_without_a_table(h200_table, shape, kind, expected):
    assert plan.choose(shape, 4096, True, kind) == expected


def test_expanded_is_offered_only_on_our_kernel():
    assert ("expanded", "cudnn") not in plan.candidates("auto", "auto")
    assert ("expanded", "triton") in plan.candidates("auto", "auto")
    assert plan.candidates("cudnn", "expanded") == []
    assert plan.candidates("sdpa", "auto") == [("absorbed", "sdpa"), ("materialized", "sdpa")]


def test_choose_traces_under_torch_compile_at_any_length(h200_table):
    def scaled(x):
        form, core = plan.choose(SHAPE, x.shape[1], True, "nvidia_h200@9")
        return x * (2.0 if core == "cudnn" else 3.0)

    compiled = torch.compile(scaled, backend="eager", fullgraph=True)
    for T, factor in ((1024, 2.0), (8192, 3.0), (1000, 2.0)):
        assert compiled(torch.ones(1, T))[0, 0].item() == factor


@pytest.mark.parametrize("core, form, shape", [
    ("sdpa", "absorbed", SHAPE),  # the table times no 'sdpa' pair: the rule decides
    ("auto", "auto", WIDE),  # no row for the shape
], ids=["forced-sdpa", "unmeasured-shape"])
def test_the_rule_traces_under_torch_compile_without_a_graph_break(h200_table, core, form, shape):
    def scaled(x):
        chosen_form, _ = plan.choose(shape, x.shape[1], True, "nvidia_h200@9", core=core, form=form)
        return x * (2.0 if chosen_form == "absorbed" else 3.0)

    expected = 2.0 if plan.choose(shape, 1024, True, "nvidia_h200@9", core=core, form=form)[0] == "absorbed" else 3.0
    assert torch.compile(scaled, backend="eager", fullgraph=True)(torch.ones(1, 1024))[0, 0].item() == expected


def test_committed_tables_parse():
    for name, shapes in plan._load_tables().items():
        assert "@" not in name and shapes, name
        for entries in shapes.values():
            for T, plans in entries:
                assert T >= 1 and all(p in plan.candidates("auto", "auto") for p in plans)


def test_gpu_kind_is_read_once_outside_the_graph(monkeypatch):
    """torch.compile takes the GPU's name as a constant (read at trace time), so a compiled layer
    looks its plan up without a graph break; here with a stand-in for the CUDA device."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    plan._gpu_kind.cache_clear()

    def planned(x):
        form, core = plan.choose(SHAPE, x.shape[1], True, plan.gpu_kind(0))
        return x * (2.0 if core == "triton" else 3.0)

    assert plan.gpu_kind(0) == "nvidia_h200@9"
    assert torch.compile(planned, backend="eager", fullgraph=True)(torch.ones(1, 1024))[0, 0].item() == 2.0
    plan._gpu_kind.cache_clear()  # the stand-in's answer stays out of later tests


def test_expanded_forced_on_a_core_that_cannot_fuse_it_runs_as_itself(h200_table):
    """No (form, core) pair holds 'expanded' on cuDNN: the layer gets what it asked for and runs
    the same math materialized (MultiHeadLatentAttention.forward)."""
    assert plan.choose(SHAPE, 1024, True, "nvidia_h200@9", core="cudnn", form="expanded") == ("expanded", "cudnn")
