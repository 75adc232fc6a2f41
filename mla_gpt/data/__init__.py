"""Datasets of mla_gpt: the bundled Shakespeare corpus (shakespeare/input.txt) and its preparations.

See mla_gpt.data.prepare: `ensure_prepared`, `prepare_char`, `prepare_bpe`, `load_meta`.
"""
