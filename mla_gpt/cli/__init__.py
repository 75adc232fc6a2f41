"""Command-line tools: `python -m mla_gpt.cli.train CONFIG.py [--key=value ...]`,
`python -m mla_gpt.cli.sample --out_dir=DIR [--key=value ...]` and
`python -m mla_gpt.cli.convert --in_dir=DIR --out_dir=DIR [--key=value ...]`.

train.py is the training loop over the engine in mla_gpt/train (runtime, batches, the step);
the parts of the loop, one job each:
- configurator.py: config files and --key=value arguments, checked against dataclasses;
- keys.py: the training config keys (TrainConfig, ModelKeys), their defaults and help;
- init_from.py: the model a run starts from (scratch, resume, pretrained);
- checkpoint.py: ckpt.pt written, read back and checked; rng.py: the RNG states it keeps;
- metrics.py: metrics.jsonl and loss.png.
sources.py reads nanoGPT checkpoints and Hugging Face GPT-2 weights for train and convert.
"""
