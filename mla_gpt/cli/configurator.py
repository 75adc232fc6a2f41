"""Config files and `--key=value` overrides, checked against dataclasses of settings.

A config file is plain Python assignments (`config/*.py`). It is run with runpy.run_path into its own
namespace (never into the tool's globals); its public names become settings. Then `--key=value`
arguments override them, each parsed into the type of its dataclass field:

    python -m mla_gpt.cli.train config/train_mla_test.py --batch_size=32 --use_mla=True --svd_rank=None

Unknown keys, values of the wrong type and missing files raise ConfigError with a message that names
the key, the value and what is expected (the closest known keys for a misspelt one).
"""

import difflib
import runpy
import types
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from mla_gpt.model.config import annotation_options, coerce, type_name

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A config file or a --key=value argument that cannot be used; the message says why."""


@dataclass(frozen=True)
class Key:
    """One setting: its resolved type annotation, default and help text."""

    type: Any
    default: Any
    help: str


def config_schema(*dataclasses):
    """name -> Key over the fields of all given dataclasses (a name may appear in only one of them)."""
    schema = {}
    for cls in dataclasses:
        hints = get_type_hints(cls)  # resolves string annotations too
        for f in fields(cls):
            if f.name in schema:
                raise ValueError(
                    f"setting {f.name!r} of {cls.__name__} is already defined by another dataclass"
                )
            default = f.default_factory() if f.default is MISSING else f.default
            schema[f.name] = Key(hints[f.name], default, f.metadata.get("help", ""))
    return schema


def check_value(key, value, annotation, where):
    """Return value if it fits annotation (int is accepted for float), else raise ConfigError."""
    try:
        return coerce(value, annotation)
    except TypeError as e:
        raise ConfigError(f"{where}: {key} {e}") from None


def parse_value(key, text, annotation):
    """Parse the text of `--key=text` into annotation's type, or raise ConfigError."""
    options = annotation_options(annotation)
    if type(None) in options and text == "None":
        return None
    for typ in options:
        try:
            if typ is bool:
                if text.lower() in TRUE_WORDS:
                    return True
                if text.lower() in FALSE_WORDS:
                    return False
            elif typ is int:
                return int(text)
            elif typ is float:
                return float(text)
            elif typ is str:
                return text
        except ValueError:
            continue
    raise ConfigError(f"--{key}={text}: {key} expects {type_name(annotation)}, got {text!r}")


def unknown_key_error(key, schema, where):
    close = difflib.get_close_matches(key, schema, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; --help lists every key"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def read_config_file(path, schema):
    """Run a config file in its own namespace; return its settings as a dict checked against schema."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        namespace = runpy.run_path(str(path), run_name="__config__")
    except Exception as e:
        raise ConfigError(f"config file {str(path)!r} failed to run: {type(e).__name__}: {e}") from e
    settings = {}
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue  # imports, helpers and dunders are not settings
        if key not in schema:
            raise unknown_key_error(key, schema, str(path))
        settings[key] = check_value(key, value, schema[key].type, str(path))
    return settings


def load_config(argv, *dataclasses):
    """Merge defaults, config files and --key=value overrides (in argv order) into one dict.

    argv: command-line arguments without the program name. Positional arguments are config files;
    a bool key given alone (--batch) means --batch=True.
    Returns a dict holding every key of the dataclasses.
    """
    schema = config_schema(*dataclasses)
    config = {name: key.default for name, key in schema.items()}
    for arg in argv:
        if not arg.startswith("--"):
            config.update(read_config_file(arg, schema))
            continue
        key, sep, text = arg[2:].partition("=")
        if key not in schema:
            raise unknown_key_error(key, schema, "command line")
        if not sep:
            if bool not in annotation_options(schema[key].type):
                raise ConfigError(f"argument {arg!r} must be written --key=value (only bool keys stand alone)")
            text = "True"
        config[key] = parse_value(key, text, schema[key].type)
    return config


def help_text(prog, usage, *dataclasses):
    """Usage line and one line per key: name, type, default and help (the field's metadata)."""
    lines = [f"usage: {prog} {usage}", "", "keys (--key=value; defaults shown):"]
    for cls in dataclasses:
        lines.append(f"  [{cls.__name__}]")
        for name, key in config_schema(cls).items():
            setting = f"--{name}={key.default!r}"
            lines.append(
                f"    {setting:<34} {type_name(key.type):<14} {key.help}".rstrip()
            )
    return "\n".join(lines)
