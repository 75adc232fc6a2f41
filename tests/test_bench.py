"""Every bench/ script on a CPU at its smallest settings: it runs, writes its rows where --out says
(and, without --out, to the temp folder, never into bench/results/) in the results schema with the
metrics it promises; the committed results are in that schema and bench/plot.py draws them."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mla_gpt.model.config import MLA_PATHS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SCRIPT_TIMEOUT_S = 300
# the scripts whose results bench/results/ holds, as <script>_*.json (tiles_sm90.py writes the schema too, into
# the temp folder only)
SCHEMA_SCRIPTS = ("append", "attention", "backends", "configs", "convert", "decode", "decode_sass",
                  "finetune_converted", "fp8_scales", "generate", "launch_overhead", "model_check", "svd", "tiles",
                  "train")
# scripts that draw no plot
NO_PLOT = {"append", "model_check", "launch_overhead", "decode_sass", "tiles", "tiles_sm90", "configs", "backends"}


def _harness():
    spec = importlib.util.spec_from_file_location("harness", REPO / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _harness()


def run_script(name, *args, tmpdir=None):
    """python bench/<name>.py ARGS, kernels on their CPU reference (no interpreter: these runs check
    the scripts, the kernel tests check the kernels), without PYTHONPATH (the harness finds the
    repository); with tmpdir, run there with it as the system temp folder. -> stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    result = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, env=env, cwd=tmpdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def read_results(path, benchmark, metrics):
    """A results JSON in the schema: every row has the schema's columns, this benchmark, a unit, the
    run's commit, and one of exactly `metrics`. -> its measurements (harness.measurements)."""
    rows = json.loads(path.read_text())
    assert harness.is_result_rows(rows), rows[:1]
    assert {row["benchmark"] for row in rows} == {benchmark}
    assert {row["metric"] for row in rows} == set(metrics)
    for row in rows:
        assert isinstance(row["unit"], str) and row["commit"] and row["torch"] and row["gpu"] == "cpu"
    return harness.measurements(rows)


def schema_results():
    """Every committed results file: each is in the schema."""
    return sorted(RESULTS.glob("*.json"))


def results_listing():
    """What bench/results/ holds: names and modification times."""
    return sorted((p.name, p.stat().st_mtime_ns) for p in RESULTS.iterdir())


def test_default_output_goes_to_the_temp_folder(tmp_path):
    before = results_listing()
    out = run_script("launch_overhead", "--calls", 1, "--rounds", 1, tmpdir=tmp_path)
    written = tmp_path / "mla_bench" / "launch_overhead_cpu.json"
    assert f"wrote {written}" in out
    rows = read_results(written, "launch_overhead", {"us_per_call"})
    assert {row["provider"] for row in rows} == {"flash_attention eager", "sdpa eager"}
    assert results_listing() == before


def test_attention(tmp_path):
    out = tmp_path / "attention.json"
    stdout = run_script("attention", "--seqlens", 32, "--layer_seqlens", 32, "--core_heads", 2,
                        "--core_shapes", "d16", "d16-kv1", "d16-dv8", "--heads", 2, "--head_sizes", 16,
                        "--latents", "r8", "g1-r16-joint", "--out", out)
    rows = read_results(out, "attention", {f"{step}_{metric}" for step in ("fwd", "bwd", "fwd_bwd")
                                           for metric in ("ms", "tflops")})  # no memory nor graph on a CPU
    core = [row for row in rows if row["table"] == "core"]
    assert {(r["provider"], r["kv_heads"], r["d"], r["dv"]) for r in core} == {
        (p, kv, d, dv) for p in ("reference", "sdpa_math") for kv, d, dv in ((2, 16, 16), (1, 16, 16), (2, 16, 8))}
    layer = [row for row in rows if row["table"] == "layer"]
    assert {(r["g"], r["r"], r["joint"]) for r in layer} == {(2, 8, False), (1, 16, True)}
    forms = {f"mla_sdpa_{path}" for path in MLA_PATHS if path != "auto"}  # every form the model offers
    assert {r["provider"] for r in layer} == {"std_sdpa_math", "mla_plain_math", "mla_reference", *forms}
    assert "[1/" in stdout and f"[{len(rows)}/{len(rows)}]" in stdout
    assert (tmp_path / "attention.png").stat().st_size > 0


@pytest.mark.parametrize("flags, message", [(["--core_shapes", "64"], "is not d<D>"),
                                            (["--core_shapes", "d32-kv5"], "do not divide"),
                                            (["--latents", "r32-g1"], "is not [g<G>-]r<R>"),
                                            (["--core_shapes", "d32", "--flex_shapes", "d64"], "not among")])
def test_attention_bad_flags(flags, message):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "attention.py"), *flags], capture_output=True,
                            text=True, timeout=SCRIPT_TIMEOUT_S)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_decode(tmp_path):
    out = tmp_path / "decode.json"
    run_script("decode", "--shapes", "2x256", "--modes", "default", "--out", out)
    rows = read_results(out, "decode", {"us", "GBps", "tokens_per_s", "bytes_per_token_layer_analytic",
                                        "bytes_per_token_layer_measured", "max_context_B1", "max_batch_L1024",
                                        "max_batch_L4096", "saving_vs_mha"})
    providers = {row["provider"] for row in rows if row["table"] == "timing"}
    assert providers == {"torch_latent_math", "torch_latent", "reference"}
    memory = {row["provider"]: row for row in rows if row["table"] == "memory"}
    assert len(memory) == 5
    assert memory["MLA default, fp8"]["bytes_per_token_layer_measured"] == 12 * 64 + 12 * 2 * 4  # values + scales
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_append(tmp_path):
    out = tmp_path / "append.json"
    run_script("append", "--out", out)
    rows = read_results(out, "append", {"rel_err_q", "rel_err_k", "rel_err_cublas", "untouched_slots_nan", "passed",
                                        "us", "GBps"})
    assert all(row["passed"] for row in rows if row["table"] == "correctness")
    assert {(row["mode"], row["provider"]) for row in rows if row["table"] == "timing"} == {
        (mode, provider) for mode in ("default", "joint") for provider in ("fused", "unfused")}


def test_linear(tmp_path):
    out = tmp_path / "linear.json"
    run_script("linear", "--out", out)
    rows = read_results(out, "linear", {"rel_err", "rel_err_cublas", "passed", "us", "GBps", "vs_cublas"})
    assert all(row["passed"] for row in rows if row["table"] == "correctness")
    assert {(row["shape"], row["provider"]) for row in rows if row["table"] == "timing"} == {
        (shape, provider) for shape in ("c_fc", "c_proj", "mla_out_r32") for provider in ("ours", "cublas")}
    assert harness.beside(out, ".png").exists()


def test_svd(tmp_path):
    out = tmp_path / "svd.json"
    stdout = run_script("svd", "--out", out)
    rows = read_results(out, "svd", {"finite", "s_rel_diff", "err", "err_ref", "u_orth", "v_orth", "ok", "ms",
                                     "rel_err", "optimal_rel_err"})
    assert {row["table"] for row in rows} == {"correctness", "shape", "model"}
    assert all(row["oversample"] == 8 and row["n_iter"] == 2 for row in rows)
    assert "checks ok: True" in stdout
    assert (tmp_path / "svd.png").stat().st_size > 0


def test_generate(tmp_path):
    out = tmp_path / "generate.json"
    run_script("generate", "--prompt", 8, "--new_tokens", 4, "--check_tokens", 4, "--out", out)
    rows = read_results(out, "generate", {"seconds", "tokens_per_s", "fraction"})  # no peak memory on a CPU
    speed = {row["provider"] for row in rows if row["table"] == "speed"}
    assert speed == {"mla-recompute", "mla-latent-cache", "standard-kv-cache", "mla-latent-cache-ragged"}
    assert all(row["fraction"] == 1.0 for row in rows if row["table"] == "check")
    assert all(row["n_layer"] == 2 and row["n_embd"] == 128 for row in rows)
    assert (tmp_path / "generate.png").stat().st_size > 0


def test_generate_caches(tmp_path):
    out = tmp_path / "generate_caches.json"
    run_script("generate", "--caches", "--prompts", 8, 16, "--new_tokens", 3, "--out", out)
    rows = read_results(out, "generate", {"tokens_per_s", "step_ms", "cache_bytes_per_token_layer", "cache_GBps"})
    caches = ["standard", "mla", "mla-fp8", "mla-joint-g1-r256"]
    assert [(r["provider"], r["prompt"]) for r in rows] == [(c, p) for p in (8, 16) for c in caches]
    per_token = {r["provider"]: r["cache_bytes_per_token_layer"] for r in rows}
    # float32 on the CPU: K and V of 128 channels; MLA's default halves it; fp8 values plus float32 scales
    assert per_token["standard"] == 2 * 128 * 4 and per_token["mla"] == 128 * 4
    assert per_token["mla-fp8"] < per_token["mla"] and per_token["mla-joint-g1-r256"] == 64 * 4
    assert (tmp_path / "generate_caches.png").stat().st_size > 0


def test_convert_timing(tmp_path):
    out = tmp_path / "convert_timing.json"
    run_script("convert", "--timing", "--out", out)
    rows = read_results(out, "convert", {"factor_seconds", "factor_all", "convert_model_seconds", "convert_model_all",
                                         "kv_cache_saving", "rel_error", "optimal_rel_error",
                                         "full_rank_max_logit_diff"})
    assert {(row["latent_dim"], row["calibrated"]) for row in rows} == {(16, False), (16, True), (32, False),
                                                                        (32, True)}
    assert next(row for row in rows if row["latent_dim"] == 32 and not row["calibrated"])[
        "full_rank_max_logit_diff"] < 1e-4


def test_convert_quality(tmp_path):
    out = tmp_path / "convert_quality.json"
    run_script("convert", "--iters", 4, "--eval_iters", 1, "--work_dir", tmp_path / "work", "--out", out)
    rows = read_results(out, "convert", {"kv_cache_saving", "rel_error_k", "rel_error_v", "optimal_rel_error",
                                         "convert_seconds", "original_val_loss", "converted_val_loss",
                                         "scratch_val_loss", "scratch_seconds", "ft5pct_val_loss", "ft10pct_val_loss",
                                         "gap_after_10pct", "target_met", "best_gap_r_half_after_10pct",
                                         "total_seconds"})
    quality = [row for row in rows if row["table"] == "quality"]
    assert {(row["latent_dim"], row["calibration_batches"]) for row in quality} == {
        (r, calib) for r in (32, 16, 8) for calib in (0, 8)}
    assert next(row for row in rows if row["table"] == "summary")["iters"] == 4
    assert (tmp_path / "convert_quality.png").stat().st_size > 0


def test_model_check(tmp_path):
    out = tmp_path / "model_check.json"
    run_script("model_check", "--out", out)
    rows = read_results(out, "model_check", {"err_kernels", "err_torch_bf16", "passed"})
    checks = [row for row in rows if row["table"] == "correctness"]
    assert [row["config"] for row in checks] == ["default", "mla_latent_dim=96",
                                                 "mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=64",
                                                 "use_svd=True, svd_rank=16"]
    assert all(row["passed"] for row in rows)
    tensors = [row for row in rows if row["table"] == "tensor"]
    assert {row["config"] for row in tensors} == {row["config"] for row in checks}
    assert {"loss", "transformer.wte.weight"} <= {row["tensor"] for row in tensors}


def test_train(tmp_path):
    out = tmp_path / "train.json"
    stdout = run_script("train", "--shapes", "char", "gpt2s-char", "--latents", "r32", "g1-r256", "--steps", 2,
                        "--rounds", 1, "--warmup", 0, "--out", out)
    assert "these numbers say nothing about speed" in stdout
    rows = read_results(out, "train", {"ms_per_step", "tokens_per_s", "first_step_s", "startup_s",
                                       "flop_ceiling_vs_mha"})
    variants = ["mha"] + [f"{v}-{latent}" for v in ("mla", "mla_sdpa_absorbed", "mla_sdpa_materialized")
                          for latent in ("r32", "g1-r256")]
    assert {(r["shape"], r["provider"]) for r in rows} == {(s, v) for s in ("char", "gpt2s-char") for v in variants}
    for row in rows:
        assert row["mode"] == "eager" and row["tokens_per_s"] > 0
        assert row["flop_ceiling_vs_mha"] == 1.0 if row["provider"] == "mha" else row["flop_ceiling_vs_mha"] > 0
    assert (tmp_path / "train.png").stat().st_size > 0


def test_backends(tmp_path):
    out = tmp_path / "backends.json"
    stdout = run_script("backends", "--out", out)
    assert "these numbers say nothing about speed" in stdout
    rows = read_results(out, "backends", {"fwd_ms", "fwd_bwd_ms"})
    assert [(r["provider"], r["layer"], r["T"]) for r in rows] == [("absorbed/reference", "test-r16", 64)]
    assert rows[0]["fwd_bwd_ms"] > 0


@pytest.mark.parametrize("script", ["run_h200.sh", "run_train_h200.sh"])
def test_run_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "bench" / script)], check=True)


def test_finetune_converted(tmp_path):
    out = tmp_path / "finetune.json"
    run_script("finetune_converted", "--iters", 6, "--ft_steps", 2, "--eval_iters", 1, "--work_dir", tmp_path / "w",
               "--out", out)
    rows = read_results(out, "finetune_converted", {
        "kv_cache_saving", "original_val_loss", "standard_finetuned_val_loss", "standard_finetuned_best_val_loss",
        "converted_val_loss", "finetuned_val_loss", "finetuned_best_val_loss", "gap_to_standard_finetuned"})
    assert [row["provider"] for row in rows] == ["r16", "r8", "r4", "g1-joint-r64"]
    assert all(math.isfinite(row["finetuned_val_loss"]) and math.isfinite(row["standard_finetuned_val_loss"])
               for row in rows)
    assert (tmp_path / "finetune.png").stat().st_size > 0


def test_fp8_scales(tmp_path):
    out = tmp_path / "fp8_scales.json"
    run_script("fp8_scales", "--iters", 4, "--windows", 2, "--work_dir", tmp_path / "w", "--out", out)
    rows = read_results(out, "fp8_scales", {"bytes_per_token_layer", "latent_rel_err", "val_loss",
                                            "val_loss_change_vs_bf16"})
    by_layout = {layout: [r for r in rows if r["layout"] == layout] for layout in ("default", "joint")}
    # the CPU model: n_embd 128, 4 heads (hs 32): default r 16 in 4 groups, joint r 64 in one
    assert [r["provider"] for r in by_layout["default"]] == ["bf16", "position-16", "tile-16", "tile-64"]
    assert [r["provider"] for r in by_layout["joint"]] == ["bf16", "position-64", "position-32", "position-16",
                                                           "tile-16", "tile-64"]
    bytes_of = {(r["layout"], r["provider"]): r["bytes_per_token_layer"] for r in rows}
    assert bytes_of["default", "bf16"] == 2 * 2 * 4 * 16 and bytes_of["default", "position-16"] == 128 + 4 * 2 * 4
    assert bytes_of["joint", "position-32"] == 64 + 4 * 2 and bytes_of["joint", "tile-64"] == 64 + 4 / 64
    for row in rows:
        assert math.isfinite(row["val_loss"]) and 0 < row["latent_rel_err"] < (1e-2 if row["provider"] == "bf16"
                                                                                else 0.1)
    assert (tmp_path / "fp8_scales.png").stat().st_size > 0


def test_decode_sass(tmp_path):
    """The decode kernel compiled for sm_90 on this machine: its main loop counted per candidate."""
    out = tmp_path / "decode_sass.json"
    run_script("decode_sass", "--out", out)
    rows = read_results(out, "decode_sass", {"loop_instructions", "warp_instructions_per_byte", "registers",
                                             "stack_bytes", "top_opcodes"})
    assert {(r["layout"], r["cache"]) for r in rows} == {(layout, cache) for layout in ("default", "joint")
                                                         for cache in ("bf16", "fp8")}
    for row in rows:
        assert row["target"] == "cuda sm_90"
        assert row["loop_instructions"] > 0 and 0 < row["warp_instructions_per_byte"] < 10
        assert 0 < row["registers"] <= 255 and sum(row["top_opcodes"].values()) <= row["loop_instructions"]


def test_tiles_sm90(tmp_path):
    """Every attention tile candidate the prune hook keeps fits an H200's shared memory, compiled for
    sm_90 on this machine; at head dim 256 some that it drops would not (the limit is needed)."""
    out = tmp_path / "tiles_sm90.json"
    run_script("tiles_sm90", "--head_dims", 128, 256, "--out", out)
    rows = read_results(out, "tiles_sm90", {"shared_bytes", "kept", "fits"})
    assert {(r["provider"], r["head_dim"]) for r in rows} == {(k, d) for k in ("fwd", "fwd-expand", "dkdv", "dq")
                                                            for d in (128, 256)}
    assert all(r["fits"] for r in rows if r["kept"])
    assert {r["provider"] for r in rows if r["head_dim"] == 256 and not r["fits"]} == {"fwd-expand", "dkdv", "dq"}


def test_committed_results_in_the_schema():
    """Every results file of the scripts that write the schema holds schema rows of one benchmark, each
    with the commit it was measured at."""
    # backends.py's results are the model's table (mla_gpt/model/tables/, tests/test_plan.py)
    assert {json.loads(p.read_text())[0]["benchmark"] for p in schema_results()} >= set(SCHEMA_SCRIPTS) - {"backends"}
    for path in schema_results():
        rows = json.loads(path.read_text())
        assert harness.is_result_rows(rows), path.name
        assert all(row["commit"] and row["commit"] != "unknown" for row in rows), path.name
        assert len({row["benchmark"] for row in rows}) == 1, path.name


def test_plot_draws_every_results_file(tmp_path):
    """bench/plot.py redraws the committed results' plots from their rows (copies, in a temp folder)."""
    files = [shutil.copy(path, tmp_path) for path in schema_results()]
    stdout = run_script("plot", *files, tmpdir=tmp_path)
    for path in map(Path, files):
        benchmark = json.loads(path.read_text())[0]["benchmark"]
        drawn = harness.beside(path, ".png").exists()
        assert drawn == (benchmark not in NO_PLOT and path.name != "convert_timing_h200.json"), (path.name, stdout)
    with pytest.raises(AssertionError, match="no such results file"):
        run_script("plot", tmp_path / "missing.json")
