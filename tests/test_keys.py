"""The config keys are defined once, by the dataclasses in mla_gpt/cli/keys.py: ModelKeys stays
GPTConfig's fields, every key has its help, and README's key tables list the same keys and defaults."""

import re
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

from mla_gpt.cli.configurator import config_schema
from mla_gpt.cli.keys import ModelKeys, TrainConfig
from mla_gpt.model import GPTConfig
from mla_gpt.model.config import type_name

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(heading):
    """The lines of README's section under `heading` (a whole heading line), up to the next heading."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return lines[start:end]


def table_rows(section):
    """{first cell without its backticks: the other cells} of the section's table rows for `key`s."""
    rows = {}
    for line in section:
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def training_keys_table():
    return table_rows(readme_section("### Training config keys"))


def test_model_keys_are_gpt_config_fields_with_its_types_and_defaults():
    """Only vocab_size differs: None takes it from the dataset."""
    assert [f.name for f in fields(ModelKeys)] == [f.name for f in fields(GPTConfig)]
    keys, gpt = get_type_hints(ModelKeys), get_type_hints(GPTConfig)
    for f, g in zip(fields(ModelKeys), fields(GPTConfig)):
        if f.name == "vocab_size":
            assert f.default is None and type_name(keys[f.name]) == "int or None"
        else:
            assert (keys[f.name], f.default) == (gpt[g.name], g.default), f.name


def test_every_key_has_help():
    for name, key in config_schema(TrainConfig, ModelKeys).items():
        assert key.help, name


def test_readme_lists_every_training_key_with_its_type_and_default():
    readme = {key: (cells[0], cells[1]) for key, cells in training_keys_table().items()}
    code = {name: (type_name(key.type), f"`{key.default!r}`")
            for name, key in config_schema(TrainConfig, ModelKeys).items()}
    assert readme == code


def test_readme_meanings_are_the_keys_help():
    readme = {key: cells[2] for key, cells in training_keys_table().items()}
    code = {name: key.help for name, key in config_schema(TrainConfig, ModelKeys).items()}
    assert readme == code


def test_readme_configuration_reference_names_every_gpt_config_field_with_its_default():
    section = readme_section("## Configuration reference")
    named = set(re.findall(r"`(\w+)`", "\n".join(section)))
    defaults = {f.name: f.default for f in fields(GPTConfig)}
    assert set(defaults) <= named, sorted(set(defaults) - named)
    rows = table_rows(section)
    assert set(rows) <= set(defaults), sorted(set(rows) - set(defaults))
    for name, cells in rows.items():
        assert re.match(r"`([^`]*)`", cells[0]).group(1) == repr(defaults[name]), name
