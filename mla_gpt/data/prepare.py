"""Turn the bundled Shakespeare corpus into train.bin / val.bin / meta.pkl.

Two preparations of the same text (mla_gpt/data/shakespeare/input.txt), as in nanoGPT:
- `shakespeare_char`: one token per character; meta.pkl holds the vocabulary (stoi, itos).
- `shakespeare`: GPT-2 BPE through tiktoken (any tiktoken encoding by name, or an Encoding object);
  meta.pkl holds the encoding name.
The first TRAIN_FRACTION of the characters is the training split, the rest the validation split;
token ids are stored as uint16 (both vocabularies are below 65536).

    python -m mla_gpt.data.prepare [shakespeare_char|shakespeare] [--data_dir DIR] [--encoding gpt2]
"""

import argparse
import os
import pickle
from pathlib import Path

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent
CORPUS_PATH = PACKAGE_DIR / "shakespeare" / "input.txt"
TRAIN_FRACTION = 0.9  # nanoGPT's split: first 90% of the text trains, last 10% validates
DATASETS = ("shakespeare_char", "shakespeare")
SPLIT_FILES = ("train.bin", "val.bin", "meta.pkl")
TIKTOKEN_HELP = (
    "Without network access, fetch the tokenizer files on a machine that has it:\n"
    "    TIKTOKEN_CACHE_DIR=/some/dir python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"\n"
    "then copy /some/dir here and run with TIKTOKEN_CACHE_DIR=/some/dir set."
)


def default_data_dir(dataset, log=print):
    """Where `dataset` lives when no data_dir is given: mla_gpt/data/<dataset>, or a cache dir.

    The package folder is used when it is writable (or already holds the prepared files); otherwise
    $XDG_CACHE_HOME/mla_gpt/<dataset> (~/.cache by default), announced through `log`.
    """
    package_dir = PACKAGE_DIR / dataset
    if all((package_dir / name).exists() for name in SPLIT_FILES) or _writable(package_dir):
        return package_dir
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache_dir = cache_root / "mla_gpt" / dataset
    log(f"{package_dir} is not writable; using {cache_dir} for the prepared {dataset} data")
    return cache_dir


def _writable(directory):
    """True when `directory` exists and is writable, or could be created."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    return os.access(existing, os.W_OK)


def _split(text):
    """Return (train_text, val_text): the first TRAIN_FRACTION of the characters, then the rest."""
    n = int(len(text) * TRAIN_FRACTION)
    return text[:n], text[n:]


def _write_atomic(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_splits(data_dir, train_ids, val_ids, meta):
    """Write uint16 train.bin / val.bin and meta.pkl into data_dir (meta.pkl last: it marks completion)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train.bin", train_ids), ("val.bin", val_ids)):
        array = np.asarray(ids, dtype=np.uint16)  # (n_tokens,)
        _write_atomic(data_dir / name, array.tofile)
    _write_atomic(data_dir / "meta.pkl", lambda f: pickle.dump(meta, f))


def prepare_char(data_dir, text=None):
    """Character-level preparation. Returns meta: {'vocab_size', 'stoi', 'itos', 'tokenizer': 'char'}."""
    text = CORPUS_PATH.read_text(encoding="utf-8") if text is None else text
    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"text has {len(chars)} distinct characters; uint16 storage allows at most 65536")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    train_text, val_text = _split(text)
    meta = {"tokenizer": "char", "vocab_size": len(chars), "stoi": stoi, "itos": itos}
    _write_splits(Path(data_dir), [stoi[c] for c in train_text], [stoi[c] for c in val_text], meta)
    return meta


def load_tiktoken_encoding(name):
    """tiktoken.get_encoding(name), with an error that says how to work offline."""
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        raise ValueError(
            f"encoding={name!r} is not a tiktoken encoding; known: {tiktoken.list_encoding_names()}"
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests, OSError, hash mismatch: all mean the tokenizer data is unavailable
        raise RuntimeError(
            f"could not load the tiktoken encoding {name!r}: {type(e).__name__}: {e}\n"
            + TIKTOKEN_HELP.format(name=name)
        ) from e


def prepare_bpe(data_dir, text=None, encoding="gpt2"):
    """BPE preparation with a tiktoken encoding (a name or a tiktoken.Encoding).

    Returns meta: {'tokenizer': 'tiktoken', 'encoding': name, 'vocab_size': n_vocab}.
    """
    enc = load_tiktoken_encoding(encoding) if isinstance(encoding, str) else encoding
    if enc.n_vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(
            f"encoding {enc.name!r} has {enc.n_vocab} tokens; uint16 storage allows at most 65536"
        )
    text = CORPUS_PATH.read_text(encoding="utf-8") if text is None else text
    train_text, val_text = _split(text)
    meta = {"tokenizer": "tiktoken", "encoding": enc.name, "vocab_size": enc.n_vocab}
    _write_splits(Path(data_dir), enc.encode_ordinary(train_text), enc.encode_ordinary(val_text), meta)
    return meta


def load_meta(data_dir):
    """meta.pkl of a prepared data dir, or None when there is none (a dataset prepared elsewhere)."""
    path = Path(data_dir) / "meta.pkl"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def ensure_prepared(dataset, data_dir=None, encoding="gpt2", log=print):
    """Return the data dir of `dataset`, preparing the bundled corpus there the first time.

    dataset: 'shakespeare_char' or 'shakespeare' (BPE) are prepared on demand; any other name needs
    data_dir to hold train.bin and val.bin already. data_dir: None or '' -> default_data_dir(dataset).
    """
    if not data_dir:
        if dataset not in DATASETS:
            raise ValueError(
                f"dataset={dataset!r} has no bundled preparation ({', '.join(DATASETS)}); "
                f"set data_dir to a folder holding train.bin and val.bin"
            )
        data_dir = default_data_dir(dataset, log=log)
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    ready = all((data_dir / name).exists() for name in SPLIT_FILES[:2])
    if dataset == "shakespeare" and ready and meta is not None and meta.get("encoding") != encoding:
        ready = False  # prepared with another encoding
    if ready:
        return data_dir
    if dataset == "shakespeare_char":
        log(f"preparing shakespeare_char (character vocabulary) from {CORPUS_PATH.name} into {data_dir} ...")
        prepare_char(data_dir)
    elif dataset == "shakespeare":
        log(f"preparing shakespeare (tiktoken {encoding}) from {CORPUS_PATH.name} into {data_dir} ...")
        prepare_bpe(data_dir, encoding=encoding)
    else:
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r} has no train.bin / val.bin for dataset={dataset!r}"
        )
    return data_dir


def main():
    parser = argparse.ArgumentParser(description="Prepare the bundled Shakespeare corpus.")
    parser.add_argument("dataset", nargs="?", default="shakespeare_char", choices=DATASETS)
    parser.add_argument("--data_dir", default=None, help="output folder (default: mla_gpt/data/<dataset>)")
    parser.add_argument("--encoding", default="gpt2", help="tiktoken encoding for the BPE variant")
    args = parser.parse_args()
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(args.dataset)
    meta = (
        prepare_char(data_dir)
        if args.dataset == "shakespeare_char"
        else prepare_bpe(data_dir, encoding=args.encoding)
    )
    sizes = {name: os.path.getsize(data_dir / name) // 2 for name in SPLIT_FILES[:2]}
    print(
        f"{data_dir}: vocab {meta['vocab_size']}, train {sizes['train.bin']:,} tokens, val {sizes['val.bin']:,} tokens"
    )


if __name__ == "__main__":
    main()
