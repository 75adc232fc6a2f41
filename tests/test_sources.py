"""Bring your own model: nanoGPT checkpoints and Hugging Face GPT-2 folders, converted and fine-tuned.

The Hugging Face tests need `transformers` (`pip install -e ".[hf]"`) and skip without it; they
save a randomly initialized GPT2LMHeadModel, so nothing is downloaded.
"""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import prepare_corpus_slice, run_train

from mla_gpt.cli import convert as convert_cli
from mla_gpt.cli import sample as sample_cli
from mla_gpt.cli import train as train_cli
from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, CheckpointError
from mla_gpt.cli.convert import convert_model
from mla_gpt.cli.sources import read_source
from mla_gpt.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the reference SVD's QR needs it

HF = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=97)


def hf_model(tmp_path, safe=True):
    """A random Hugging Face GPT-2 saved as save_pretrained writes it; (model, folder)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF)).eval()
    folder = tmp_path / ("hf-safetensors" if safe else "hf-bin")
    model.save_pretrained(folder, safe_serialization=safe)
    return model, folder


@pytest.fixture
def cpu_user(monkeypatch):
    """As a user converts on a CPU: without TRITON_INTERPRET the SVD runs its PyTorch reference
    (the kernels' own tests run them through the interpreter; here that would take minutes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def ours(source):
    model = GPT(GPTConfig(**source.model_args)).eval()
    model.load_state_dict(source.state_dict)
    return model


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_hf_gpt2_folder_gives_the_same_logits(tmp_path, safe):
    hf, folder = hf_model(tmp_path, safe)
    source = read_source(folder)
    assert source.format == "Hugging Face GPT-2" and source.model_args["gelu_approximate"] == "tanh"
    idx = torch.randint(0, HF["vocab_size"], (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(source)(idx, idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_hf_gpt2_converted_at_full_rank_keeps_its_logits(tmp_path, cpu_user):
    hf, folder = hf_model(tmp_path)
    out = tmp_path / "mla"
    assert convert_cli.main([f"--in_dir={folder}", f"--out_dir={out}", "--mla_latent_dim=16", "--device=cpu"]) == 0
    converted = ours(read_source(out))
    assert converted.config.use_mla and converted.config.latent_dim == 16  # r = head size: exact
    idx = torch.randint(0, HF["vocab_size"], (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(converted(idx, idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_hf_gpt2_at_half_the_head_size_has_the_best_rank_r_error(tmp_path, cpu_user):
    """r = hs / 2: each layer's key and value error is that of the truncated SVD of its heads' maps."""
    hf, folder = hf_model(tmp_path)
    source = read_source(folder)
    _, report = convert_model(ours(source).float(), 8, generator=torch.Generator().manual_seed(0))
    C, nh, hs = HF["n_embd"], HF["n_head"], HF["n_embd"] // HF["n_head"]
    for i, layer in enumerate(report["layers"]):
        c_attn = source.state_dict[f"transformer.h.{i}.attn.c_attn.weight"].double()  # (3C, C), nn.Linear layout
        for name, rows in (("k", c_attn[C : 2 * C]), ("v", c_attn[2 * C :])):
            s = torch.linalg.svdvals(rows.mT.reshape(C, nh, hs).permute(1, 0, 2))  # (nh, hs)
            optimal = ((s[:, 8:] ** 2).sum() / (s**2).sum()).sqrt().item()
            assert optimal * 0.999 <= layer[name] <= optimal * 1.01 + 1e-6, (i, name, layer[name], optimal)


def test_hf_folder_whose_config_disagrees_with_its_weights_is_refused(tmp_path):
    _, folder = hf_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"the weights disagree with config.json: transformer.wte.weight is "
                                              r"\(97, 64\), config.json implies \(97, 128\)"):
        read_source(folder)


def test_train_starts_from_a_saved_gpt2_folder(tmp_path, capsys):
    _, folder = hf_model(tmp_path)
    data_dir = tmp_path / "bpe"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # token ids of the model's vocabulary, as GPT-2's BPE data would be
        rng.integers(0, HF["vocab_size"], 4000, dtype=np.uint16).tofile(data_dir / f"{split}.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"tokenizer": "tiktoken", "encoding": "gpt2", "vocab_size": HF["vocab_size"]}, f)
    args = [f"--init_from=hf:{folder}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--device=cpu",
            "--dtype=float32", "--compile=False", "--progress_bar=False", "--block_size=16", "--batch_size=4",
            "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--dropout=0.0"]
    summary = run_train(args)
    assert f"hf:{folder}: Hugging Face GPT-2 (2 layers, 64 wide)" in capsys.readouterr().out
    assert summary["iter_num"] == 2 and summary["model"].config.block_size == 16
    char_dir = tmp_path / "char"
    prepare_corpus_slice(char_dir, 20_000)
    bad = [a if not a.startswith("--data_dir") else f"--data_dir={char_dir}" for a in args]
    assert train_cli.main(bad) == 2
    assert "are not the model's (vocab 97); use GPT-2's BPE dataset" in capsys.readouterr().err


def test_gpt2_by_name_without_network_or_cache_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    code = ("import sys; from mla_gpt.cli.sources import hf_gpt2_source\n"
            "try:\n    hf_gpt2_source('gpt2')\nexcept Exception as e:\n    print(type(e).__name__, e); sys.exit(3)")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("ConfigError could not load 'gpt2' through transformers")
    assert "save_pretrained(DIR)" in result.stdout and "--init_from=hf:DIR" in result.stdout


def nanogpt_checkpoint(folder):
    """A checkpoint as nanoGPT's train.py writes it, from a compiled model (keys '_orig_mod.')."""
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=None, dropout=0.0)
    meta = prepare_corpus_slice(folder / "data", 60_000)
    model_args["vocab_size"] = meta["vocab_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    for i in range(2):  # the causal-mask buffers of nanoGPT without flash attention
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    folder.mkdir(exist_ok=True)
    torch.save({"model": state, "optimizer": {}, "model_args": model_args, "iter_num": 500, "best_val_loss": 1.9,
                "config": {"dataset": "shakespeare_char", "batch_size": 8}}, folder / CHECKPOINT_NAME)
    return model


def test_nanogpt_checkpoint_converts_trains_and_samples(tmp_path, capsys):
    source_model = nanogpt_checkpoint(tmp_path / "nanogpt")
    source = read_source(tmp_path / "nanogpt")
    assert source.format == "nanoGPT checkpoint"
    idx = torch.randint(0, source.model_args["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(source)(idx, idx)[0], source_model.eval()(idx, idx)[0], rtol=0, atol=0)
    out = tmp_path / "mla"
    assert convert_cli.main([f"--in_dir={tmp_path / 'nanogpt'}", f"--out_dir={out}", "--mla_latent_dim=8",
                             "--device=cpu"]) == 0
    assert "nanoGPT checkpoint (2 layers, 32 wide)" in capsys.readouterr().out
    train_args = [f"--out_dir={out}", "--init_from=resume", f"--data_dir={tmp_path / 'nanogpt' / 'data'}",
                  "--device=cpu", "--dtype=float32", "--compile=False", "--progress_bar=False", "--max_iters=2",
                  "--eval_interval=2", "--eval_iters=1", "--batch_size=4", "--attn_backend=reference"]
    assert train_cli.main(train_args) == 0
    assert sample_cli.main([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=8",
                            "--start=ROMEO:"]) == 0
    assert "ROMEO:" in capsys.readouterr().out


def test_a_folder_with_no_model_names_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=r"no model found in .* \(found: \['notes.txt'\]\); accepted: "):
        read_source(tmp_path)
    torch.save({"weights": {}}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"neither an mla_gpt nor a nanoGPT checkpoint \(keys: \['weights'\]\)"):
        read_source(tmp_path)
