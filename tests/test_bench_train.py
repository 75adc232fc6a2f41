"""bench/train.py on a CPU: tiny shapes, every variant, the results schema the GPU run writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"variant", "shape", "T", "B", "mode", "ms_per_step", "tokens_per_s", "device_ms_per_step",
            "host_bound_share", "peak_memory_mb", "mfu", "first_step_s", "startup_s", "device", "torch"}


def test_bench_train_runs_on_cpu_and_writes_rows(tmp_path):
    out = tmp_path / "train_cpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # 'triton' without the interpreter falls back to the reference
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train.py"), "--steps", "2", "--rounds", "1", "--warmup", "0",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "these numbers say nothing about speed" in result.stdout
    rows = json.loads(out.read_text())
    assert {(r["shape"], r["variant"]) for r in rows} == {
        (shape, variant) for shape in ("char", "gpt2s") for variant in ("mha", "mla_kernels", "mla_sdpa")
    }
    for row in rows:
        assert ROW_KEYS <= set(row) and row["mode"] == "eager" and row["tokens_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
