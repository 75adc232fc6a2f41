"""Models to start from: this project's checkpoints, nanoGPT's, and Hugging Face GPT-2 weights.

`read_source(path)` detects the format of a folder and returns its model in this project's terms
(GPTConfig keys and parameter names, nn.Linear layouts):
- this project's out_dir: ckpt.pt with its `format` key;
- a nanoGPT out_dir: ckpt.pt with `model_args` and `model`, keys possibly prefixed `_orig_mod.`
  (a compiled model), possibly with the causal-mask buffers `attn.bias` of older versions;
- a Hugging Face GPT-2 folder as `save_pretrained` writes it: config.json and model.safetensors or
  pytorch_model.bin. GPT-2's Conv1D stores weights (in, out), the transpose of nn.Linear's.
`hf_gpt2_source(name)` loads 'gpt2' ... 'gpt2-xl' through `transformers` (an optional extra,
`pip install -e ".[hf]"`) from its cache or the network.
"""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from mla_gpt.cli.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_checkpoint,
    model_from_checkpoint,
    read_checkpoint_file,
)
from mla_gpt.cli.configurator import ConfigError

FORMATS = "this project's out_dir (ckpt.pt), a nanoGPT out_dir (ckpt.pt with model_args and model), " \
          "or a Hugging Face GPT-2 folder (config.json and model.safetensors or pytorch_model.bin)"
NANOGPT_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
# Hugging Face GPT-2 activations -> nn.GELU's `approximate`
HF_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class Source:
    """A model to start from: its format's name, GPTConfig keys, state dict (this project's names)."""

    format: str
    model_args: dict
    state_dict: dict
    checkpoint: dict = field(default_factory=dict)  # config, meta, iter_num... where the format has them

    def describe(self, where):
        return f"{where}: {self.format} ({self.model_args['n_layer']} layers, {self.model_args['n_embd']} wide)"


def read_source(path, map_location="cpu"):
    """The model in folder `path`, in whichever of the three formats it is; CheckpointError otherwise."""
    path = Path(path)
    if (path / CHECKPOINT_NAME).is_file():
        raw = read_checkpoint_file(path / CHECKPOINT_NAME, map_location)
        if isinstance(raw, dict) and "format" in raw:
            checkpoint = check_checkpoint(raw, path / CHECKPOINT_NAME)
            return Source("mla_gpt checkpoint", dict(checkpoint["model_args"]), checkpoint["model"], checkpoint)
        if isinstance(raw, dict) and "model_args" in raw and "model" in raw:
            return _nanogpt_source(raw, path)
        raise CheckpointError(f"{str(path / CHECKPOINT_NAME)!r} is neither an mla_gpt nor a nanoGPT checkpoint "
                              f"(keys: {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}); "
                              f"accepted: {FORMATS}")
    if (path / "config.json").is_file():
        return _hf_folder_source(path)
    found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else "no such folder"
    raise CheckpointError(f"no model found in {str(path)!r} (found: {found}); accepted: {FORMATS}")


def _nanogpt_source(raw, path):
    unknown = sorted(set(raw["model_args"]) - set(NANOGPT_MODEL_KEYS))
    if unknown:
        raise CheckpointError(f"{str(path)!r}: nanoGPT model_args has keys nanoGPT does not: {unknown}")
    state = {k.removeprefix("_orig_mod."): v for k, v in raw["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}  # causal-mask buffers
    checkpoint = {k: raw.get(k) for k in ("config", "iter_num", "best_val_loss")}
    return Source("nanoGPT checkpoint", dict(raw["model_args"]), state, checkpoint)


def _hf_folder_source(path):
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        raise CheckpointError(f"{str(path)!r}: config.json describes model_type={config.get('model_type')!r}; "
                              f"only GPT-2 is read (accepted: {FORMATS})")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        weights = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{str(path)!r} has config.json but neither model.safetensors nor pytorch_model.bin")
    return hf_gpt2_state(config, weights, str(path))


def hf_gpt2_state(config, weights, where):
    """Source from a GPT-2 config dict and its (GPT2LMHeadModel or GPT2Model) weights."""
    activation = config.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise CheckpointError(f"{where}: activation_function={activation!r} is not one of {sorted(HF_ACTIVATIONS)}")
    if abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise CheckpointError(f"{where}: layer_norm_epsilon={config['layer_norm_epsilon']} (this GPT uses 1e-5)")
    model_args = dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                      block_size=config["n_positions"], vocab_size=config["vocab_size"], bias=True, dropout=0.0,
                      gelu_approximate=HF_ACTIVATIONS[activation])
    state = {}
    for key, value in weights.items():
        key = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers
            continue
        state[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied, often not stored
    C, L = model_args["n_embd"], model_args["n_layer"]
    expected = {"transformer.wte.weight": (model_args["vocab_size"], C),
                "transformer.wpe.weight": (model_args["block_size"], C),
                **{f"transformer.h.{i}.attn.c_attn.weight": (3 * C, C) for i in range(L)}}
    for key, shape in expected.items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise CheckpointError(f"{where}: the weights disagree with config.json: {key} is {got}, "
                                  f"config.json implies {shape}")
    meta = {"tokenizer": "tiktoken", "encoding": "gpt2", "vocab_size": model_args["vocab_size"]}  # GPT-2's BPE
    return Source("Hugging Face GPT-2", model_args, state, {"meta": meta})


def hf_gpt2_source(name):
    """'gpt2' ... 'gpt2-xl' through transformers, from its cache or the network."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise ConfigError(f"init_from={name!r} needs transformers: pip install -e \".[hf]\" "
                          f"(or give a saved folder: --init_from=hf:PATH)") from e
    try:
        model = GPT2LMHeadModel.from_pretrained(name)
    except OSError as e:
        raise ConfigError(
            f"could not load {name!r} through transformers (no network and not in its cache?): "
            f"{str(e).splitlines()[0]}. "
            f"On a machine with network: GPT2LMHeadModel.from_pretrained({name!r}).save_pretrained(DIR), "
            f"copy DIR here and use --init_from=hf:DIR") from e
    return hf_gpt2_state(model.config.to_dict(), model.state_dict(), name)


def pretrained_model(cfg, meta, log):
    """train's init_from 'gpt2' ... or 'hf:PATH': the model to fine-tune and its model args.

    The run's dropout applies and its block_size, if shorter, crops the position embeddings; the
    dataset must use the model's tokenizer (GPT-2's BPE: dataset 'shakespeare').
    """
    init_from = cfg["init_from"]
    source = hf_gpt2_source(init_from) if not init_from.startswith("hf:") else read_source(init_from[3:])
    log(source.describe(init_from))
    if cfg["use_mla"]:
        raise ConfigError(f"init_from={init_from!r} with use_mla=True: convert the model first "
                          f"(python -m mla_gpt.cli.convert --in_dir=... ), then train --init_from=resume")
    if meta is not None and (meta["tokenizer"] == "char" or meta["vocab_size"] > source.model_args["vocab_size"]):
        raise ConfigError(f"init_from={init_from!r}: the dataset's tokens ({meta['tokenizer']}, vocab "
                          f"{meta['vocab_size']}) are not the model's (vocab {source.model_args['vocab_size']}); "
                          f"use GPT-2's BPE dataset: --dataset=shakespeare")
    if cfg["block_size"] > source.model_args["block_size"]:
        positions = source.model_args["block_size"]
        raise ConfigError(f"block_size={cfg['block_size']} exceeds the model's {positions} positions")
    model = model_from_checkpoint({"model_args": source.model_args, "model": source.state_dict}, dropout=cfg["dropout"])
    model_args = {f.name: getattr(model.config, f.name) for f in fields(model.config)}  # every key, as checkpoints hold
    if cfg["block_size"] < model_args["block_size"]:
        model.crop_block_size(cfg["block_size"])
        model_args["block_size"] = cfg["block_size"]
    return model, model_args
