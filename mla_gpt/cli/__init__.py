"""Command-line tools: `python -m mla_gpt.cli.train CONFIG.py [--key=value ...]` and
`python -m mla_gpt.cli.sample --out_dir=DIR [--key=value ...]`."""
