"""CPU tests of the MHA -> MLA checkpoint conversion (mla_gpt/cli/convert.py).

Exactness at full rank in float64 (the reference SVD), error falling with rank and matching the
exact truncated SVD (float32 through the Triton SVD kernels in the interpreter), activation
weighting, bad input, and the converted checkpoint through train (resume) and sample.
"""

import re

import pytest
import torch
from helpers import prepare_corpus_slice, run_train

from mla_gpt.cli import convert as convert_cli
from mla_gpt.cli import sample as sample_cli
from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from mla_gpt.cli.configurator import load_config
from mla_gpt.cli.convert import attention_input_moments, convert_model, convert_state_dict
from mla_gpt.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the reference SVD's QR needs it

CORPUS_SLICE = 30_000  # characters of the bundled corpus: enough for block 16


def random_model(n_head=4, n_embd=48, bias=True, dtype=torch.float64, seed=0, n_layer=2):
    """A standard GPT with weights far from their init (so no factor is trivially low rank)."""
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=24, vocab_size=61, bias=bias)
    model = GPT(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def model_args(model):
    return {f: getattr(model.config, f) for f in model.config.__dataclass_fields__}


@pytest.mark.parametrize(
    "n_head, groups, joint, bias",
    [(4, 4, False, True), (4, 2, False, True), (4, 1, False, False), (4, 2, True, True), (6, 3, True, False)],
    ids=lambda v: str(v),
)
def test_full_rank_is_exact(n_head, groups, joint, bias):
    """r = columns of one factored matrix: A B = M, biases folded exactly -> the same logits (float64)."""
    model = random_model(n_head=n_head, bias=bias)
    hs = model.config.head_size
    r = (n_head // groups) * hs * (2 if joint else 1)
    mla, report = convert_model(model, r, groups, joint)
    assert mla.config.use_mla and mla.config.latent_dim == r and mla.config.kv_groups == groups
    idx = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = model(idx, idx)
        got, _ = mla.eval()(idx, idx)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)
    assert max(max(layer.values()) for layer in report["layers"]) < 1e-12


def test_error_falls_with_rank_and_is_near_optimal():
    """Randomized SVD (float32, Triton kernels) error: decreasing in r, within 1% of the exact truncated SVD.
    One layer: the interpreter's time grows with the layers, and one holds every case checked."""
    model = random_model(dtype=torch.float32, n_layer=1)
    C, nh = model.config.n_embd, model.config.n_head
    hs = C // nh
    previous = float("inf")
    for r in (2, 7, 12):
        _, report = convert_model(model, r, generator=torch.Generator().manual_seed(0))
        error = report["layers"][0]["k"]
        w_k = model.transformer.h[0].attn.c_attn.weight[C:2 * C].double()  # (C, C) out x in
        s = torch.linalg.svdvals(w_k.mT.reshape(C, nh, hs).permute(1, 0, 2))  # (nh, hs)
        optimal = ((s[:, r:] ** 2).sum() / (s ** 2).sum()).sqrt().item()
        assert error < previous
        assert error <= optimal * 1.01 + 1e-6, (r, error, optimal)
        previous = error


def test_calibration_lowers_the_weighted_error():
    """Whitened SVD minimizes ||X (M - A B)||: its weighted error is below the plain SVD's, its plain error above."""
    model = random_model()
    C, r = model.config.n_embd, 4
    gen = torch.Generator().manual_seed(3)
    scales = torch.logspace(0, -2, C, dtype=torch.float64)  # anisotropic activations
    x = torch.randn(2, 400, C, generator=gen, dtype=torch.float64) * scales  # (L, N, C)
    moments = x.mT @ x / x.size(1)  # (L, C, C)
    args, state = model_args(model), model.state_dict()
    plain_state, _, plain = convert_state_dict(state, args, r)
    _, _, weighted = convert_state_dict(state, args, r, moments=moments)
    assert weighted["calibrated"] and not plain["calibrated"]
    for layer in range(2):
        for latent, key in enumerate(("k", "v")):
            plain_weighted = weighted_error(state, plain_state, moments, layer, latent, model.config.n_head, r)
            assert weighted["layers"][layer][f"weighted_{key}"] < 0.9 * plain_weighted
            assert weighted["layers"][layer][key] > plain["layers"][layer][key]


def weighted_error(state, new_state, moments, layer, latent, nh, r):
    """||L^T (M - A B)|| / ||L^T M|| of one layer's K (latent 0) or V (latent 1), from the converted weights."""
    prefix = f"transformer.h.{layer}.attn."
    C = moments.size(-1)
    L = convert_cli.whitening_factors(moments)[layer]  # (C, C)
    M = state[prefix + "c_attn.weight"][(latent + 1) * C:(latent + 2) * C].mT  # (C, C) in x out
    A = new_state[prefix + "kv_latent_proj.weight"].view(2, nh, r, C)[latent]  # (nh, r, C)
    B = new_state[prefix + ("k_expand" if latent == 0 else "v_expand") + ".weight"]  # (nh, r, hs)
    approx = torch.cat([A[h].mT @ B[h] for h in range(nh)], dim=1)  # (C, C)
    return ((L.mT @ (M - approx)).norm() / (L.mT @ M).norm()).item()


def test_moments_are_the_ln1_outputs():
    model = random_model()

    class Fixed:
        def __init__(self, x):
            self.x = x

        def next(self):
            return self.x, None

    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(4))
    moments = attention_input_moments(model, Fixed(idx), 2)
    block = model.transformer.h[0]
    pos = torch.arange(24)
    h = block.ln_1(model.transformer.wte(idx) + model.transformer.wpe(pos)).reshape(-1, model.config.n_embd)
    torch.testing.assert_close(moments[0], (h.mT @ h / h.size(0)).detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(latent_dim=0), ValueError, "mla_latent_dim must be in [1, 12]"),
        (dict(latent_dim=13), ValueError, "mla_latent_dim must be in [1, 12]"),
        (dict(latent_dim=25, joint_kv=True), ValueError, "mla_latent_dim must be in [1, 24]"),
        (dict(latent_dim=4, kv_groups=3), ValueError, "mla_kv_groups must divide n_head=4, got 3"),
        (dict(latent_dim=2.0), TypeError, "mla_latent_dim must be an int"),
    ],
    ids=["r0", "r-too-big", "joint-r-too-big", "groups", "float-r"],
)
def test_bad_arguments(kwargs, error, message):
    model = random_model()
    with pytest.raises(error, match=re.escape(message)):
        convert_state_dict(model.state_dict(), model_args(model), **kwargs)


def test_mla_model_args_refused():
    model = random_model()
    with pytest.raises(ValueError, match="MLA model already"):
        convert_state_dict(model.state_dict(), {**model_args(model), "use_mla": True}, 4)


# ----------------------------------------------------------------------------- the tool, end to end


def tiny_args(data_dir, out_dir, **overrides):
    settings = dict(
        data_dir=data_dir, out_dir=out_dir, device="cpu", dtype="float32", compile=False, progress_bar=False,
        n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, dropout=0.0, bias=True, use_mla=False,
        learning_rate=3e-3, max_iters=10, lr_decay_iters=10, warmup_iters=2, min_lr=3e-4, eval_interval=10,
        eval_iters=2, log_interval=1, seed=7,
    )
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """(data_dir, out_dir) of a finished 10-iteration standard-attention run."""
    data_dir = tmp_path_factory.mktemp("shakespeare_char")
    prepare_corpus_slice(data_dir, CORPUS_SLICE)
    out_dir = tmp_path_factory.mktemp("out-standard")
    run_train(tiny_args(str(data_dir), str(out_dir)))
    return str(data_dir), str(out_dir)


def test_converted_checkpoint_resumes_trains_and_samples(standard, tmp_path, capsys):
    data_dir, in_dir = standard
    out_dir = tmp_path / "converted"
    argv = [f"--in_dir={in_dir}", f"--out_dir={out_dir}", "--mla_latent_dim=8", "--calibration_batches=2",
            f"--data_dir={data_dir}", "--device=cpu"]
    assert convert_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer 1: relative reconstruction error K" in printed and "weighted V" in printed
    assert "standard 64 elements, MLA 32" in printed and "2.00x smaller" in printed
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME)
    assert checkpoint["iter_num"] == 0 and checkpoint["model_args"]["use_mla"]
    assert checkpoint["converted_from"]["report"]["calibrated"]

    before = model_from_checkpoint(checkpoint).state_dict()
    result = run_train(tiny_args(data_dir, str(out_dir), init_from="resume", max_iters=4, eval_interval=4))
    assert result["iter_num"] == 4 and result["model"].config.use_mla and result["model"].config.latent_dim == 8
    after = load_checkpoint(out_dir / CHECKPOINT_NAME)
    assert after["iter_num"] == 4
    assert any(not torch.equal(before[k], v) for k, v in after["model"].items())

    args = [f"--out_dir={out_dir}", "--device=cpu", "--num_samples=1", "--max_new_tokens=20", "--start=ROMEO:"]
    texts = sample_cli.sample(load_config(args, sample_cli.SampleConfig), err=open("/dev/null", "w"))
    assert texts[0].startswith("ROMEO:") and len(texts[0]) == len("ROMEO:") + 20


def test_converted_loss_matches_at_full_rank(standard, tmp_path):
    """The tool's float32 path: at r = hs the converted model's val loss equals the original's."""
    data_dir, in_dir = standard
    out_dir = tmp_path / "full"
    assert convert_cli.main([f"--in_dir={in_dir}", f"--out_dir={out_dir}", "--mla_latent_dim=16"]) == 0
    source = model_from_checkpoint(load_checkpoint(f"{in_dir}/{CHECKPOINT_NAME}")).eval()
    converted = model_from_checkpoint(load_checkpoint(out_dir / CHECKPOINT_NAME)).eval()
    idx = torch.randint(0, source.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(converted(idx, idx)[0], source(idx, idx)[0], atol=1e-4, rtol=1e-4)


def test_cli_errors(standard, tmp_path, capsys):
    _, in_dir = standard
    cases = [
        ([f"--in_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'o'}"],
         "(found: no such folder); accepted: this project's out_dir"),
        ([f"--in_dir={in_dir}", f"--out_dir={tmp_path / 'o'}", "--mla_latent_dim=0"], "mla_latent_dim must be in"),
        ([f"--in_dir={in_dir}", f"--out_dir={tmp_path / 'o'}", "--mla_latent_dim=17"], "[1, 16]"),
        ([f"--in_dir={in_dir}", f"--out_dir={in_dir}"], "out_dir must differ from in_dir"),
        ([f"--in_dir={in_dir}", "--mla_latent_dim=x"], "mla_latent_dim expects int or None"),
        ([f"--in_dir={in_dir}", "--calibration_batches=-1"], "calibration_batches must be >= 0"),
    ]
    for argv, message in cases:
        assert convert_cli.main(argv) == 2
        assert message in capsys.readouterr().err, argv
    mla_dir = tmp_path / "mla"
    assert convert_cli.main([f"--in_dir={in_dir}", f"--out_dir={mla_dir}", "--mla_latent_dim=8"]) == 0
    capsys.readouterr()
    assert convert_cli.main([f"--in_dir={mla_dir}", f"--out_dir={tmp_path / 'again'}"]) == 2
    assert "holds an MLA model already" in capsys.readouterr().err
