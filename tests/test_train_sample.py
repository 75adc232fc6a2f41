"""CPU tests of the train and sample tools, the configurator and the Shakespeare data preparation.

Tiny models (2 layers, 32 wide, block 16) with attn_backend='reference'; float32 on CPU, so a resumed
run must reproduce an uninterrupted one exactly.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import prepare_corpus_slice, run_train

from mla_gpt.cli import sample as sample_cli
from mla_gpt.cli import train as train_cli
from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, portable_optimizer_state
from mla_gpt.cli.configurator import ConfigError, load_config
from mla_gpt.cli.keys import ModelKeys, TrainConfig
from mla_gpt.cli.metrics import METRICS_NAME, PLOT_NAME, Metrics
from mla_gpt.cli.train import TrainingDiverged
from mla_gpt.data import prepare
from mla_gpt.model import GPT
from mla_gpt.train.batches import Batches
from mla_gpt.train.runtime import Runtime, bf16_peak
from mla_gpt.train.step import TrainStep, capturable_optimizer, set_learning_rate, use_cuda_graphs

REPO = Path(__file__).resolve().parents[1]
CORPUS_SLICE = 60_000  # characters of the bundled corpus used by the training tests: enough for block 16


def tiny_args(data_dir, out_dir, **overrides):
    """--key=value arguments of a tiny MLA run (a few seconds on 2 CPU cores)."""
    settings = dict(
        data_dir=data_dir,
        out_dir=out_dir,
        device="cpu",
        dtype="float32",
        compile=False,
        progress_bar=False,
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=8,
        dropout=0.1,
        bias=False,
        use_mla=True,
        mla_latent_dim=8,
        attn_backend="reference",
        learning_rate=3e-3,
        max_iters=20,
        lr_decay_iters=20,
        warmup_iters=4,
        min_lr=3e-4,
        eval_interval=10,
        eval_iters=2,
        log_interval=1,
        seed=7,
    )
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def train_losses(out_dir):
    records = Metrics.read(Path(out_dir) / METRICS_NAME)
    return {r["iter"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """shakespeare_char prepared from the first CORPUS_SLICE characters of the bundled corpus."""
    directory = tmp_path_factory.mktemp("shakespeare_char")
    prepare_corpus_slice(directory, CORPUS_SLICE)
    return str(directory)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """out_dir of a finished 20-iteration run and its summary."""
    out_dir = str(tmp_path_factory.mktemp("out-trained"))
    return out_dir, run_train(tiny_args(data_dir, out_dir))


# ----------------------------------------------------------------------------- configurator


def test_config_file_then_overrides(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("import math\nbatch_size = 7\nlearning_rate = 1\nn_layer = 3\n_private = 'skipped'\n")
    cfg = load_config(
        [
            str(cfg_file),
            "--n_layer=5",
            "--use_mla=True",
            "--mla_latent_dim=32",
            "--use_svd=True",
            "--svd_rank=16",
            "--compile=None",
            "--init_from=resume",
        ],
        TrainConfig,
        ModelKeys,
    )
    assert cfg["batch_size"] == 7 and cfg["n_layer"] == 5  # the command line wins over the file
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)  # int accepted for float
    assert (cfg["use_mla"], cfg["mla_latent_dim"], cfg["use_svd"], cfg["svd_rank"]) == (True, 32, True, 16)
    assert cfg["compile"] is None and cfg["init_from"] == "resume"
    assert cfg["block_size"] == 1024 and cfg["vocab_size"] is None  # defaults fill the rest


@pytest.mark.parametrize(
    "file_text, argv, message",
    [
        (None, ["--batch_sise=4"], r"unknown key 'batch_sise'; did you mean batch_size"),
        (None, ["--mla_latent=4"], r"did you mean mla_latent_dim"),
        ("learnin_rate = 1e-3\n", [], r"cfg\.py: unknown key 'learnin_rate'; did you mean learning_rate"),
        (None, ["--batch_size=abc"], r"batch_size expects int, got 'abc'"),
        (None, ["--use_mla=maybe"], r"use_mla expects bool, got 'maybe'"),
        (None, ["--mla_latent_dim=1.5"], r"mla_latent_dim expects int or None"),
        ("batch_size = '12'\n", [], r"batch_size expects int, got '12' \(str\)"),
        ("dropout = True\n", [], r"dropout expects float, got True \(bool\)"),
        ("batch_size = (\n", [], r"failed to run: SyntaxError"),
        (None, ["--batch_size"], r"must be written --key=value"),
        (None, ["missing_config.py"], r"config file 'missing_config.py' does not exist"),
    ],
    ids=[
        "typo-cli",
        "typo-model-key",
        "typo-file",
        "int-cli",
        "bool-cli",
        "optional-int-cli",
        "int-file",
        "float-file",
        "syntax-error",
        "no-value",
        "missing-file",
    ],
)
def test_config_errors(tmp_path, monkeypatch, file_text, argv, message):
    monkeypatch.chdir(tmp_path)
    if file_text is not None:
        (tmp_path / "cfg.py").write_text(file_text)
        argv = ["cfg.py", *argv]
    with pytest.raises(ConfigError, match=message):
        load_config(argv, TrainConfig, ModelKeys)


def test_help_lists_every_key(capsys):
    assert train_cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in load_config([], TrainConfig, ModelKeys):
        assert f"--{name}=" in text, name
    assert "--learning_rate=0.0006" in text and "--use_mla=False" in text


def test_cli_reports_config_error(capsys):
    assert train_cli.main(["--max_iter=10"]) == 2
    assert "unknown key 'max_iter'; did you mean max_iters" in capsys.readouterr().err


def test_shipped_configs_load():
    for name in ("train_shakespeare_char", "train_mla_test", "train_mla_custom"):
        cfg = load_config([str(REPO / "config" / f"{name}.py")], TrainConfig, ModelKeys)
        assert cfg["out_dir"] and cfg["dataset"] == "shakespeare_char"
    assert cfg["use_svd"] and cfg["svd_rank"] == 32 and cfg["mla_latent_dim"] == 192


# ----------------------------------------------------------------------------- data


def test_prepare_char_round_trip(tmp_path):
    text = prepare.CORPUS_PATH.read_text()
    meta = prepare.prepare_char(tmp_path)
    ids = np.concatenate([np.fromfile(tmp_path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert "".join(meta["itos"][int(i)] for i in ids) == text
    assert meta == prepare.load_meta(tmp_path) and meta["vocab_size"] == len(set(text))
    assert os.path.getsize(tmp_path / "train.bin") // 2 == int(len(text) * prepare.TRAIN_FRACTION)


def tiny_encoding():
    """An offline tiktoken encoding: the 256 single bytes plus a few merges."""
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    for word in (b"th", b"he", b"the", b"an", b"in", b"er"):
        ranks[word] = len(ranks)
    return tiktoken.Encoding(
        name="tiny_test", pat_str=r"\s?\w+|\s?[^\w\s]+|\s+", mergeable_ranks=ranks, special_tokens={}
    )


def test_prepare_bpe_round_trip(tmp_path):
    enc = tiny_encoding()
    text = prepare.CORPUS_PATH.read_text()[:20_000] + "caf\u00e9 \u2014 ok\n"  # non-ASCII survives too
    meta = prepare.prepare_bpe(tmp_path, text=text, encoding=enc)
    train_ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).tolist()
    val_ids = np.fromfile(tmp_path / "val.bin", dtype=np.uint16).tolist()
    assert enc.decode(train_ids + val_ids) == text
    assert len(train_ids) + len(val_ids) < len(text.encode())  # the merges compress
    assert meta == {"tokenizer": "tiktoken", "encoding": "tiny_test", "vocab_size": enc.n_vocab}


def test_bpe_without_tokenizer_files_explains_cache_dir(tmp_path, monkeypatch):
    import tiktoken.load

    def offline(blobpath):
        raise ConnectionError(f"no network for {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.delitem(__import__("tiktoken.registry").registry.ENCODINGS, "gpt2", raising=False)
    with pytest.raises(
        RuntimeError, match=r"(?s)could not load the tiktoken encoding 'gpt2'.*TIKTOKEN_CACHE_DIR"
    ):
        prepare.prepare_bpe(tmp_path / "bpe", text="hello")
    with pytest.raises(ValueError, match=r"encoding='nope' is not a tiktoken encoding"):
        prepare.load_tiktoken_encoding("nope")


def test_read_only_package_dir_falls_back_to_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PACKAGE_DIR", tmp_path / "read-only")
    monkeypatch.setattr(prepare, "_writable", lambda directory: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    messages = []
    assert (
        prepare.default_data_dir("shakespeare_char", log=messages.append)
        == tmp_path / "cache" / "mla_gpt" / "shakespeare_char"
    )
    assert len(messages) == 1 and "is not writable; using" in messages[0]


def test_train_on_bpe_data_takes_vocab_from_meta(tmp_path):
    enc = tiny_encoding()
    prepare.prepare_bpe(tmp_path / "bpe", text=prepare.CORPUS_PATH.read_text()[:20_000], encoding=enc)
    args = tiny_args(
        str(tmp_path / "bpe"),
        str(tmp_path / "out"),
        dataset="shakespeare",
        encoding="tiny_test",
        max_iters=2,
        eval_interval=2,
    )
    summary = run_train(args)
    assert summary["model"].config.vocab_size == enc.n_vocab
    assert load_checkpoint(tmp_path / "out" / CHECKPOINT_NAME)["meta"]["encoding"] == "tiny_test"


def test_ensure_prepared_runs_once_with_one_line(tmp_path):
    messages = []
    data_dir = prepare.ensure_prepared("shakespeare_char", tmp_path / "d", log=messages.append)
    assert len(messages) == 1 and "preparing shakespeare_char" in messages[0]
    assert all((data_dir / name).exists() for name in ("train.bin", "val.bin", "meta.pkl"))
    prepare.ensure_prepared("shakespeare_char", data_dir, log=messages.append)
    assert len(messages) == 1  # already prepared: silent
    with pytest.raises(ValueError, match=r"dataset='owt' has no bundled preparation"):
        prepare.ensure_prepared("owt")


# ----------------------------------------------------------------------------- training


def test_short_run_loss_falls(trained):
    out_dir, summary = trained
    losses = train_losses(out_dir)
    assert sorted(losses) == list(range(20))
    assert np.mean([losses[i] for i in range(17, 20)]) < np.mean([losses[i] for i in range(3)]) - 0.5
    evals = [r for r in Metrics.read(Path(out_dir) / METRICS_NAME) if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 10, 20] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert summary["iter_num"] == 20 and summary["val_loss"] == evals[-1]["val_loss"]
    assert (Path(out_dir) / PLOT_NAME).stat().st_size > 0
    checkpoint = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
    assert checkpoint["iter_num"] == 20 and checkpoint["model_args"]["use_mla"] is True
    assert set(checkpoint["rng"][0]) == {"torch", "cuda", "numpy", "python", "sampler"}


def test_log_line_format(data_dir, tmp_path, capsys):
    assert train_cli.main(tiny_args(data_dir, str(tmp_path), max_iters=2, eval_interval=2)) == 0
    out = capsys.readouterr().out
    assert "step 0: train loss" in out
    assert any(
        line.startswith("iter 1: loss ") and ", time " in line and "ms, tok/s " in line
        for line in out.splitlines()
    )
    assert "mfu" not in out  # MFU only against a known peak: none on a CPU


@pytest.mark.parametrize(
    "variant",
    [{}, {"use_svd": True, "svd_rank": 4}, {"use_mla": False, "dropout": 0.0}],
    ids=["mla-dropout", "mla-svd4", "standard"],
)
def test_resume_equals_uninterrupted(data_dir, trained, tmp_path, variant):
    if variant:
        straight_dir = str(tmp_path / "straight")
        straight = run_train(tiny_args(data_dir, straight_dir, **variant))
    else:
        straight_dir, straight = trained
    resumed_dir = tmp_path / "resumed"
    run_train(
        tiny_args(data_dir, str(resumed_dir), max_iters=10, **variant)
    )  # "interrupted" after the iter-10 checkpoint
    resumed = run_train(tiny_args(data_dir, str(resumed_dir), init_from="resume", **variant))
    assert train_losses(resumed_dir) == train_losses(straight_dir)  # exact, iterations 0..19
    assert resumed["val_loss"] == straight["val_loss"]
    for p, q in zip(resumed["model"].parameters(), straight["model"].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def poison_training_loss(monkeypatch):
    """From now on every training forward returns a NaN loss (eval forwards are left alone)."""
    forward = GPT.forward

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        return logits, (loss * float("nan") if self.training and loss is not None else loss)

    monkeypatch.setattr(GPT, "forward", poisoned)


def test_nan_loss_stops_and_keeps_last_checkpoint(data_dir, trained, tmp_path, monkeypatch):
    _, _ = trained
    run_train(tiny_args(data_dir, str(tmp_path), max_iters=10))
    ckpt = tmp_path / CHECKPOINT_NAME
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    poison_training_loss(monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at iter 10; stopping.*last good checkpoint"):
        run_train(tiny_args(data_dir, str(tmp_path), init_from="resume"))
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before


def test_corrupt_checkpoint_is_a_clear_error(data_dir, tmp_path, capsys):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert train_cli.main(tiny_args(data_dir, str(tmp_path), init_from="resume")) == 2
    assert "is corrupt or unreadable" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(
        CheckpointError, match=r"not an mla_gpt checkpoint \(missing format, model, model_args"
    ):
        load_checkpoint(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"no checkpoint at"):
        run_train(tiny_args(data_dir, str(tmp_path / "empty"), init_from="resume"))


# ----------------------------------------------------------------------------- sampling


def sample_args(out_dir, **overrides):
    settings = dict(out_dir=out_dir, device="cpu", num_samples=2, max_new_tokens=40, seed=3, start="ROMEO:")
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def test_checkpoint_to_sample(trained, tmp_path, capsys):
    out_dir, _ = trained
    assert sample_cli.main(sample_args(out_dir)) == 0
    captured = capsys.readouterr()
    samples = captured.out.split("\n---------------\n")[:-1]
    assert len(samples) == 2 and all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40 for s in samples)
    assert "tokens/s" in captured.err
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("HAMLET:\n")
    texts = sample_cli.sample(
        load_config(sample_args(out_dir, start=f"FILE:{prompt}", num_samples=1), sample_cli.SampleConfig)
    )
    again = sample_cli.sample(
        load_config(sample_args(out_dir, start=f"FILE:{prompt}", num_samples=1), sample_cli.SampleConfig)
    )
    assert texts == again and texts[0].startswith("HAMLET:\n")  # seeded


def test_sample_batch_generates_every_prompt_line_together(trained, tmp_path, capsys):
    """--batch: each non-empty line is a prompt; prompts of different lengths in one batch, greedy
    equal to each prompt sampled alone."""
    out_dir, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n\nKING:\nO\n")  # the tiny model has block_size 16
    args = dict(start=f"FILE:{prompts}", num_samples=1, max_new_tokens=9, temperature=0)
    assert sample_cli.main([*sample_args(out_dir, **args), "--batch"]) == 0
    captured = capsys.readouterr()
    batch = captured.out.split("\n---------------\n")[:-1]
    assert "3 samples (3 prompts x 1) in one batch" in captured.err
    for line, text in zip(["ROMEO:", "KING:", "O"], batch):
        alone = sample_cli.sample(load_config(sample_args(out_dir, **{**args, "start": line}), sample_cli.SampleConfig))
        assert text == alone[0] and len(text) == len(line) + 9


def test_sample_with_an_fp8_cache(trained, capsys):
    out_dir, _ = trained
    assert sample_cli.main(sample_args(out_dir, cache_dtype="fp8", num_samples=1, max_new_tokens=10)) == 0
    assert len(capsys.readouterr().out.split("\n---------------\n")[0]) == len("ROMEO:") + 10
    assert sample_cli.main(sample_args(out_dir, cache_dtype="int4")) == 2
    assert "cache_dtype must be None (the activations' dtype) or 'fp8', got 'int4'" in capsys.readouterr().err


def test_bool_keys_stand_alone_on_the_command_line():
    assert load_config(["--batch"], sample_cli.SampleConfig)["batch"] is True
    with pytest.raises(ConfigError, match=r"'--num_samples' must be written --key=value \(only bool keys"):
        load_config(["--num_samples"], sample_cli.SampleConfig)


def test_sample_errors(trained, tmp_path, capsys):
    out_dir, _ = trained
    assert sample_cli.main(sample_args(str(tmp_path / "none"))) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    checkpoint = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
    checkpoint["model_args"]["n_embd"] = 48  # weights no longer fit the described model
    torch.save(checkpoint, tmp_path / CHECKPOINT_NAME)
    assert sample_cli.main(sample_args(str(tmp_path))) == 2
    assert "checkpoint weights do not fit the model" in capsys.readouterr().err
    assert sample_cli.main(sample_args(out_dir, start="\u00e9t\u00e9")) == 2
    assert "not in the model's vocabulary" in capsys.readouterr().err
    assert sample_cli.main([*sample_args(out_dir), "--cuda_graph=True", "--device=cpu"]) == 2
    assert "cuda_graph=True needs a CUDA device, got device='cpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert sample_cli.main([*sample_args(out_dir), "--device=cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: device 'cuda' is not available on this machine; available: cpu")
        assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- DDP

DDP_WRAPPER = """
import os, sys, torch
from mla_gpt.cli.configurator import load_config
from mla_gpt.cli.keys import ModelKeys, TrainConfig
from mla_gpt.cli.train import train
summary = train(load_config(sys.argv[1:], TrainConfig, ModelKeys))
flat = torch.cat([p.detach().flatten() for p in summary["model"].parameters()]).double()
with open(os.path.join(summary["out_dir"], f"checksum-rank{os.environ['RANK']}.txt"), "w") as f:
    f.write(repr((flat.sum().item(), flat.abs().sum().item(), flat.square().sum().item())))
"""


def test_ddp_gloo_two_processes_keep_replicas_identical(data_dir, tmp_path):
    wrapper = tmp_path / "ddp_train.py"
    wrapper.write_text(DDP_WRAPPER)
    out_dir = tmp_path / "out"
    args = tiny_args(data_dir, str(out_dir), max_iters=6, eval_interval=3, gradient_accumulation_steps=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(wrapper),
        *args,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checksums = [(out_dir / f"checksum-rank{r}.txt").read_text() for r in range(2)]
    assert checksums[0] == checksums[1]
    assert "tokens per iteration: 256 (2 process(es) x 1 micro-steps" in result.stdout
    assert load_checkpoint(out_dir / CHECKPOINT_NAME)["iter_num"] == 6
    assert len(load_checkpoint(out_dir / CHECKPOINT_NAME)["rng"]) == 2


def test_cuda_graphs_need_a_cuda_device(data_dir, tmp_path, capsys):
    """cuda_graphs='step' on a CPU is refused with the reason, not ignored."""
    assert train_cli.main(tiny_args(data_dir, str(tmp_path), cuda_graphs="step")) == 2
    assert "cuda_graphs='step' needs a CUDA device; this run is on cpu" in capsys.readouterr().err


def test_prefetched_batch_is_the_next_one_and_its_state_is_checkpointed(data_dir):
    """The trainer draws batch i + 1 while the device runs batch i: same batches, same saved state."""
    path = Path(data_dir) / "train.bin"
    plain = Batches(path, 3, 8, "cpu", seed=5)
    ahead = Batches(path, 3, 8, "cpu", seed=5)
    for _ in range(3):
        state = ahead.get_state()
        assert torch.equal(state, plain.get_state())
        ahead.prefetch()
        assert torch.equal(ahead.get_state(), state)  # the pending batch is not yet consumed
        for got, want in zip(ahead.next(), plain.next()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_loss_read_only_at_log_lines_logs_the_same_and_stops_on_nan(data_dir, tmp_path, monkeypatch):
    """As on a GPU: the host reads the loss only at log lines, evals and the end. The logged
    losses equal those of a run that reads every step, and a NaN still stops the run before the
    next checkpoint, at the first read after it."""
    every_step = tmp_path / "every"
    run_train(tiny_args(data_dir, str(every_step), log_interval=3, dropout=0.0))
    monkeypatch.setattr(train_cli, "reads_loss_every_step", lambda rt: False)
    deferred = tmp_path / "deferred"
    run_train(tiny_args(data_dir, str(deferred), log_interval=3, dropout=0.0))
    assert train_losses(deferred) == train_losses(every_step)
    assert sorted(train_losses(deferred)) == [0, 3, 6, 9, 12, 15, 18]

    ckpt = deferred / CHECKPOINT_NAME
    run_train(tiny_args(data_dir, str(deferred), log_interval=3, dropout=0.0, max_iters=10))
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    poison_training_loss(monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at iter 12; stopping"):
        run_train(tiny_args(data_dir, str(deferred), log_interval=3, dropout=0.0, init_from="resume"))
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before


def test_cuda_device_on_a_machine_without_one_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_cli.main(tiny_args(data_dir, str(tmp_path), device="cuda")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: device 'cuda' is not available on this machine; available: cpu"
        + (", mps" if torch.backends.mps.is_available() else "")
    ]


def test_block_size_longer_than_the_data_is_refused_with_the_limit(data_dir, tmp_path, capsys):
    assert train_cli.main(tiny_args(data_dir, str(tmp_path), block_size=100_000_000)) == 2
    err = capsys.readouterr().err
    assert "block_size=100000000 does not fit the data" in err and "block_size must be at most" in err


def test_keys_without_their_switch_are_reported(data_dir, tmp_path, capsys):
    run_train(tiny_args(data_dir, str(tmp_path), use_mla=False, svd_rank=8, max_iters=1))
    assert "warning: svd_rank=8 has no effect without use_svd=True" in capsys.readouterr().out


def test_resume_reports_only_keys_the_config_sets(data_dir, tmp_path, capsys):
    run_train(tiny_args(data_dir, str(tmp_path), mla_kv_groups=1, max_iters=10))
    resume = [a for a in tiny_args(data_dir, str(tmp_path), init_from="resume", max_iters=11)
              if not a.startswith("--mla_kv_groups")]
    capsys.readouterr()
    run_train(resume)  # the config leaves mla_kv_groups at its default: no conflict to report
    assert "resume: keeping" not in capsys.readouterr().out
    run_train([*resume, "--max_iters=12", "--n_layer=3"])
    assert "resume: keeping the checkpoint's n_layer=2 over the config" in capsys.readouterr().out


def test_a_long_eval_is_announced_with_how_to_shorten_it(data_dir, tmp_path, capsys, monkeypatch):
    run_train(tiny_args(data_dir, str(tmp_path / "quick"), max_iters=1))
    assert "--eval_iters=N shortens it" not in capsys.readouterr().out  # a quick eval says nothing
    monkeypatch.setattr(train_cli, "EVAL_NOTICE_S", 0.0)
    run_train(tiny_args(data_dir, str(tmp_path / "long"), max_iters=1, eval_iters=3))
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval: ")]
    assert len(notices) == 1  # once per run, not at every eval
    assert notices[0].startswith("eval: 2 splits x 3 batches of 8 x 16 will take about ")
    assert notices[0].endswith("on cpu, at every eval; --eval_iters=N shortens it")


def test_a_nan_between_loss_reads_is_still_caught(data_dir, tmp_path, monkeypatch):
    """One unread step with a NaN loss (the steps after it finite): the read at the next log line
    finds it through the sum of the unread losses and names the iterations it may have been."""
    monkeypatch.setattr(train_cli, "reads_loss_every_step", lambda rt: False)
    step = TrainStep.__call__
    calls = []

    def one_nan(self):
        loss = step(self)
        calls.append(1)
        return loss * float("nan") if len(calls) == 5 else loss  # iter 4: not a logged iteration

    monkeypatch.setattr(TrainStep, "__call__", one_nan)
    with pytest.raises(TrainingDiverged, match=r"loss was NaN or inf in one of iters 4\.\.6; stopping"):
        run_train(tiny_args(data_dir, str(tmp_path), log_interval=3))


def test_mfu_peak_is_matched_by_whole_model_names(monkeypatch):
    for name, expected in (("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA L4", 121e12),
                           ("NVIDIA L40", None), ("NVIDIA A100-SXM4-80GB", 312e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peak = bf16_peak("cuda")
        assert (None if peak is None else peak[1]) == expected, name
    assert bf16_peak("cpu") is None


MODEL_ARGS = {"use_svd": False}


@pytest.mark.parametrize("compile_model", [True, False], ids=["compile", "eager"])
def test_cuda_graphs_default_captures_the_step_on_one_cuda_process(compile_model):
    single = Runtime("cuda", "cuda", torch.bfloat16, False, 0, 0, 1)
    ddp = Runtime("cuda:0", "cuda", torch.bfloat16, True, 0, 0, 2)
    cpu = Runtime("cpu", "cpu", torch.float32, False, 0, 0, 1)
    auto = {"cuda_graphs": None}
    assert use_cuda_graphs(auto, single, compile_model, MODEL_ARGS) == "step"
    assert use_cuda_graphs(auto, ddp, compile_model, MODEL_ARGS) == "off"
    assert use_cuda_graphs(auto, cpu, compile_model, MODEL_ARGS) == "off"


# one latent group: value maps (192, 768), so a rank-57 sketch is 57 + 8 = 65 columns, past the kernels' 64
WIDE_SVD = {"use_svd": True, "use_mla": True, "mla_latent_dim": 192, "mla_kv_groups": 1, "svd_rank": 57}


@pytest.mark.parametrize("model_args", [
    {"use_svd": True},
    {"use_svd": True, "svd_rank": 56},
    {"use_svd": True, "use_mla": True, "mla_latent_dim": 192, "svd_rank": 32},  # config/train_mla_custom.py
    {"use_svd": True, "use_mla": True, "svd_mode": "activation", "svd_rank": 8},
], ids=["standard-svd", "rank56", "mla-r192-rank32", "mla-activation"])
def test_cuda_graphs_default_captures_the_svd_basis_update(model_args):
    """Sketches of at most 64 columns run on the kernels without host syncs: the step is one graph."""
    single = Runtime("cuda", "cuda", torch.bfloat16, False, 0, 0, 1)
    assert use_cuda_graphs({"cuda_graphs": None}, single, True, model_args) == "step"


def test_cuda_graphs_default_falls_back_where_the_step_cannot_be_captured():
    """A wide SVD sketch, the plain-PyTorch SVD, or float16: the compiler's graphs when compiling, else none."""
    single = Runtime("cuda", "cuda", torch.bfloat16, False, 0, 0, 1)
    fp16 = Runtime("cuda", "cuda", torch.float16, False, 0, 0, 1)
    auto = {"cuda_graphs": None}
    assert use_cuda_graphs(auto, single, True, WIDE_SVD) == "compiler"
    assert use_cuda_graphs(auto, single, False, WIDE_SVD) == "off"
    for backend in ("sdpa", "cudnn", "flash", "reference"):
        assert use_cuda_graphs(auto, single, True, {"use_svd": True, "attn_backend": backend}) == "compiler"
    assert use_cuda_graphs(auto, single, True, {"use_svd": True, "attn_backend": "triton"}) == "step"
    assert use_cuda_graphs(auto, fp16, True, MODEL_ARGS) == "compiler"


@pytest.mark.parametrize("mode, runtime, compile_model, model_args, message", [
    ("step", "ddp", True, MODEL_ARGS, r"cuda_graphs='step' runs in one process; this run has 2 \(DDP\)"),
    ("compiler", "single", False, MODEL_ARGS, r"cuda_graphs='compiler' needs compile=True"),
    ("step", "single", True, WIDE_SVD,
     r"cuda_graphs='step' cannot capture this run: svd_rank=57 needs a randomized-SVD sketch of 65 columns"),
    ("step", "fp16", True, MODEL_ARGS, r"cannot capture this run: float16 training reads its GradScaler"),
    ("True", "single", True, MODEL_ARGS, r"cuda_graphs must be one of 'step', 'compiler', 'off' or None; got 'True'"),
], ids=["step-ddp", "compiler-eager", "step-svd", "step-fp16", "bool-word"])
def test_cuda_graphs_refusals_name_the_reason(mode, runtime, compile_model, model_args, message):
    rt = {"single": Runtime("cuda", "cuda", torch.bfloat16, False, 0, 0, 1),
          "fp16": Runtime("cuda", "cuda", torch.float16, False, 0, 0, 1),
          "ddp": Runtime("cuda:0", "cuda", torch.bfloat16, True, 0, 0, 2)}[runtime]
    with pytest.raises(ConfigError, match=message):
        use_cuda_graphs({"cuda_graphs": mode}, rt, compile_model, model_args)


def test_learning_rate_is_set_in_place_once_it_is_a_tensor():
    """A captured optimizer step reads its learning rate from the tensor's memory: fill it, never rebind."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    set_learning_rate(optimizer, 2e-3)
    assert optimizer.param_groups[0]["lr"] == 2e-3
    capturable_optimizer(optimizer, "cpu")
    lr_tensor = optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["capturable"] and lr_tensor.item() == pytest.approx(2e-3)
    set_learning_rate(optimizer, 5e-4)
    assert optimizer.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(5e-4)


def test_checkpointed_optimizer_state_is_plain_after_a_graphed_run():
    """A graphed run's tensor learning rate and capturable flag are not saved: a CPU run resumes it."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    capturable_optimizer(optimizer, "cpu")
    set_learning_rate(optimizer, 4e-4)
    state = portable_optimizer_state(optimizer)
    assert state["param_groups"][0]["lr"] == pytest.approx(4e-4) and type(state["param_groups"][0]["lr"]) is float
    assert state["param_groups"][0]["capturable"] is False
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)  # the live optimizer is untouched
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3)
    resumed.load_state_dict(state)
    model(torch.randn(4, 3)).sum().backward()
    resumed.step()
