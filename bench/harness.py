"""What every script in bench/ shares: the device, timing, the environment and the results files.

Timing: `median_ms` times a callable with CUDA events on a GPU (`triton.testing.do_bench`, or
`do_bench_cudagraph` for graph replay) and with the host clock on a CPU, where the numbers only
show that a script works.

Results: one long-format schema for every benchmark. `result_rows` turns a script's measurements
(one dict per provider and shape) into rows of one metric each: benchmark, provider, the shape
keys, metric, value, unit, then gpu, driver, torch, triton, cuda, python, commit and time
(`RUN_COLUMNS`). `write_results` writes them as a JSON list and draws the script's plot beside it
from `measurements(rows)`, the inverse of `result_rows`; `python bench/plot.py FILE.json` draws
it again from the file. Every script takes `--out PATH` (`add_out_argument`); without it the
files go to the system temp folder (`<tmp>/mla_bench/<script>_<device>.json`), so a run never
writes over the committed results in bench/results/ unless --out names them. Every script
prints the paths it wrote.

Importing this module also puts the repository root on sys.path, so `python bench/<script>.py`
runs from a checkout without installing the package.
"""
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CPU_RUNS = 3  # host-clock runs after one warm-up call; their median is reported
DEFAULT_DIR = Path(tempfile.gettempdir()) / "mla_bench"


def on_gpu():
    """True when a CUDA device is there: the scripts then run their full, timed settings."""
    return torch.cuda.is_available()


def device_tag():
    """Short device name for file names: 'h200' for an NVIDIA H200, 'cpu' without a GPU."""
    return torch.cuda.get_device_name().split()[-1].lower() if on_gpu() else "cpu"


def synchronize():
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if on_gpu():
        torch.cuda.synchronize()


def median_ms(fn, graph=False, warmup=25, rep=100):
    """Median milliseconds of one fn() call.

    On a GPU: `triton.testing.do_bench` (CUDA events, L2 flushed between calls, `warmup` and
    `rep` in ms), or with graph=True `do_bench_cudagraph` (calls replayed from a CUDA graph, so no
    launch gaps; fn must be capturable). On a CPU: one warm-up call, then the median of CPU_RUNS
    calls by the host clock.
    """
    if on_gpu():
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(CPU_RUNS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profiled(fn, *args):
    """(fn(*args), its cProfile.Profile): the host time of every Python function it called."""
    profiler = cProfile.Profile()
    return profiler.runcall(fn, *args), profiler


def device_time(fn, n_steps, table=0):
    """(device microseconds, the profiler) of fn(), which runs n_steps steps, from torch.profiler:
    the device-side events only (kernels, copies, sets; a host op's device time would count its
    kernels twice). table: also print this many kernels by device time per step, with their calls
    per step and share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    device_us = sum(e.time_range.elapsed_us() for e in events)
    if table:
        us_by_name, count_by_name = {}, {}
        for e in events:
            us_by_name[e.name] = us_by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
            count_by_name[e.name] = count_by_name.get(e.name, 0) + 1
        print(f"{'us/step':>9} {'share':>6} {'calls/step':>10}  kernel", flush=True)
        for name, us in sorted(us_by_name.items(), key=lambda item: -item[1])[:table]:
            print(f"{us / n_steps:9.1f} {us / max(device_us, 1e-9):6.1%} {count_by_name[name] / n_steps:10.1f}  "
                  f"{name[:110]}")
        print(f"{device_us / n_steps:9.1f} {1:6.1%} {len(events) / n_steps:10.1f}  all device events", flush=True)
    return device_us, prof


def profile_table(profiler, limit, order="tottime"):
    """The `limit` functions of a profile with the most host time by `order` ('tottime': their own,
    'cumulative': with what they called), as pstats prints them."""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(limit)
    return text.getvalue()


def _driver_version():
    """The NVIDIA driver version from nvidia-smi, or None where it is not installed."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def environment(dtype=None):
    """What a result depends on: device (GPU name, or 'cpu'), driver, SMs and memory on a GPU,
    torch, triton, CUDA and Python versions, the dtype measured, and when."""
    import triton

    env = dict(device="cpu", driver=None, torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, python=platform.python_version(),
               dtype=None if dtype is None else str(dtype).removeprefix("torch."),
               time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if on_gpu():
        prop = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device=prop.name, driver=_driver_version(), sms=prop.multi_processor_count,
                   memory_gb=round(prop.total_memory / 1e9, 1))
    return env


def commit():
    """The commit a result was measured at: $MLA_COMMIT where set (a copy of the tree without its git
    folder, as on a lent GPU machine), else `git rev-parse --short HEAD`, '+dirty' with local changes."""
    if os.environ.get("MLA_COMMIT"):
        return os.environ["MLA_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def add_out_argument(parser, script):
    """The --out option every script takes, with the rule of where results go by default."""
    default = DEFAULT_DIR / f"{script}_<device>.json"
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON, its plot beside it (default: {default}; "
                             "bench/results/ is written only when --out names it)")


def results_path(out, script):
    """The results JSON: --out when given, else <tmp>/mla_bench/<script>_<device>.json."""
    path = Path(out) if out is not None else DEFAULT_DIR / f"{script}_{device_tag()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def beside(path, suffix):
    """A file next to the results JSON: beside(x/decode_h200.json, '_memory.csv') is x/decode_h200_memory.csv."""
    return path.with_name(path.stem + suffix)


def read_rows(path):
    """The rows of an earlier results file, or [] when there is none."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else []


ROW_KEYS = ("benchmark", "provider", "metric", "value", "unit")
RUN_COLUMNS = ("gpu", "driver", "torch", "triton", "cuda", "python", "commit", "time")
SCALARS = (str, int, float, bool, type(None))


def result_rows(benchmark, measured, units, env, settings=None, measured_at=None):
    """Long-format rows: one per measurement and metric.

    measured: dicts, each one provider's numbers at one shape: `provider`, the metrics named in
    `units` ({metric: unit}; '' for ratios, counts, flags and text) and any other keys, the shape
    keys (scalars). settings: shape keys every row shares (model size, run settings); env's dtype
    is one unless a measurement names its own. env: `environment()`, giving each row its gpu,
    versions and time; measured_at: the commit (default `commit()`). A metric whose value is None
    was not measured and gets no row.
    """
    run = dict(gpu=env["device"], **{key: env.get(key) for key in RUN_COLUMNS[1:-2]},
               commit=measured_at or commit(), time=env.get("time"))
    defaults = {**(settings or {}), **({} if env.get("dtype") is None else {"dtype": env["dtype"]})}
    rows = []
    for m in measured:
        if "provider" not in m:
            raise ValueError(f"{benchmark}: a measurement without a provider: {m}")
        shape = {k: v for k, v in m.items() if k != "provider" and k not in units}
        shape.update({k: v for k, v in defaults.items() if k not in shape})
        clash = set(shape) & {*ROW_KEYS, *RUN_COLUMNS}
        if clash:
            raise ValueError(f"{benchmark}: shape keys {sorted(clash)} are names of the schema's columns")
        odd = {k: v for k, v in shape.items() if not isinstance(v, SCALARS)}
        if odd:
            raise TypeError(f"{benchmark}: shape keys must be scalars, got {odd}")
        for metric, unit in units.items():
            if m.get(metric) is not None:
                rows.append(dict(benchmark=benchmark, provider=m["provider"], **shape, metric=metric,
                                 value=m[metric], unit=unit, **run))
    return rows


def measurements(rows):
    """The inverse of `result_rows`: one dict per benchmark, provider, shape and run, its metrics
    as keys (units dropped), in the order the rows first name them."""
    merged = {}
    for row in rows:
        key = tuple((k, v) for k, v in row.items() if k not in ("metric", "value", "unit"))
        merged.setdefault(key, dict(key))[row["metric"]] = row["value"]
    return list(merged.values())


def is_result_rows(rows):
    """True for a list of rows in the long-format schema."""
    return isinstance(rows, list) and bool(rows) and all(
        isinstance(r, dict) and {*ROW_KEYS, *RUN_COLUMNS} <= r.keys() for r in rows)


def write_results(path, rows, plot=None):
    """rows (`result_rows`) to the results JSON at path, one row per line; with plot, also
    plot(measurements(rows), <stem>.png), which may draw nothing. Prints what it wrote."""
    path = Path(path)
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")
    png = beside(path, ".png")
    if plot is not None and rows:
        plot(measurements(rows), png)
    report_written(path, *([png] if plot is not None else []))
    return path


def report_written(*paths):
    """Print where a run wrote (only the files that exist: a plot may be skipped)."""
    written = [str(p) for p in paths if Path(p).exists()]
    print("wrote " + ", ".join(written), flush=True)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
