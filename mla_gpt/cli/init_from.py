"""The model a training run starts from, as its init_from key says.

'scratch': a new GPT from the model keys; 'resume': the checkpoint's model, its architecture kept
over the config's (only the runtime keys dropout, attn_backend and mla_path follow the config);
'gpt2' ... 'gpt2-xl' and 'hf:PATH': pretrained weights through mla_gpt.cli.sources.
"""

import warnings
from dataclasses import fields

from mla_gpt.cli.checkpoint import model_from_checkpoint
from mla_gpt.cli.configurator import ConfigError
from mla_gpt.cli.keys import PRETRAINED_NAMES, RUNTIME_MODEL_KEYS, ModelKeys
from mla_gpt.cli.sources import pretrained_model
from mla_gpt.model import GPT, GPTConfig


def initial_model(cfg, meta, checkpoint, log):
    """(model, model_args) of the run; checkpoint: the one to resume (init_from='resume'), else None."""
    if cfg["init_from"] in PRETRAINED_NAMES or cfg["init_from"].startswith("hf:"):
        return pretrained_model(cfg, meta, log)
    if checkpoint is not None:
        return resumed_model(cfg, checkpoint, log)
    vocab_size = meta["vocab_size"] if meta else GPTConfig.vocab_size  # data without meta.pkl: GPT-2's, padded
    return new_model(cfg, vocab_size, log)


def new_model(cfg, vocab_size, log):
    """A GPT from the config's model keys (vocab_size None -> the dataset's); inactive keys are logged."""
    model_args = {f.name: cfg[f.name] for f in fields(GPTConfig)}
    model_args["vocab_size"] = cfg["vocab_size"] or vocab_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # logged as one line each below
            config = GPTConfig(**model_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model keys: {e}") from e
    for message in config.inactive_settings():
        log(f"warning: {message}")
    return GPT(config), model_args


def resumed_model(cfg, checkpoint, log):
    """The checkpoint's model with the config's runtime keys; other keys the config sets are logged as kept."""
    model_args = dict(checkpoint["model_args"])
    defaults = {f.name: f.default for f in fields(ModelKeys)}
    changed = [  # keys the config sets (to a value other than the default) that the checkpoint has otherwise
        f.name for f in fields(GPTConfig)
        if f.name not in RUNTIME_MODEL_KEYS and f.name != "vocab_size"
        and cfg[f.name] != defaults[f.name] and cfg[f.name] != model_args[f.name]
    ]
    if changed:
        log(
            f"resume: keeping the checkpoint's {', '.join(f'{k}={model_args[k]!r}' for k in changed)} over the config"
        )
    runtime = {k: cfg[k] for k in RUNTIME_MODEL_KEYS}
    model_args.update(runtime)
    return model_from_checkpoint(checkpoint, **runtime), model_args
