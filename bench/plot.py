"""Draw the plot of results files from their rows: <stem>.png beside each <stem>.json.

    python bench/plot.py                          # every file in bench/results/
    python bench/plot.py RESULTS.json [...]

Each file's rows are in the long-format schema (`harness.result_rows`); the plot is the one its
benchmark's script draws after a run, `bench/<benchmark>.py`'s `plot(measurements, path)`.
Scripts without a plot, and files in an older layout, are listed and skipped.
"""
import argparse
import importlib
from pathlib import Path

import harness  # first: it puts the repository root on sys.path


def draw(path):
    """Draw path's plot beside it; returns the PNG, or None with the reason printed."""
    rows = harness.read_rows(path)
    if not harness.is_result_rows(rows):
        print(f"skipped {path}: not in the results schema")
        return None
    benchmark = rows[0]["benchmark"]
    plot = getattr(importlib.import_module(benchmark), "plot", None)
    if plot is None:
        print(f"skipped {path}: bench/{benchmark}.py draws no plot")
        return None
    png = harness.beside(Path(path), ".png")
    plot(harness.measurements(rows), png)
    return png if png.exists() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="results JSON files (default: bench/results/*.json)")
    args = parser.parse_args(argv)
    files = args.files or sorted((harness.REPO / "bench" / "results").glob("*.json"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    drawn = [png for png in map(draw, files) if png is not None]
    harness.report_written(*drawn)


if __name__ == "__main__":
    main()
