#!/usr/bin/env bash
# End-to-end training measurements on the H200, each capped in time, results in $OUT.
#   bash bench/run_train_h200.sh SECTION...   (on the device; OUT is the folder that comes back)
# Sections: forms (every MLA form and core in bf16), backends (the plan's table, $OUT/nvidia_h200.json), e2e and
# e2e-compiled (bench/train.py's end-to-end rows), launch (host time per attention call, $OUT/launch_overhead_h200.json), gputests-kernels and gputests-model
# (tests/gpu but the configs: about 10 minutes, one device call),
# compiled (tests/gpu/test_compiled_launch.py alone), profile (host-time tables of the graphed char step),
# configs-eager / configs-compiled / configs-compiler-graphs / configs-default (tests/gpu: every config trained through the
# CLI in one step mode; configs-all: the four at once; gputests-all: all of tests/gpu at once), char, gpt2s-1k, gpt2s-4k, gpt2s-8k
# (bench/train.py rows, merged into $OUT/train_h200.json), tiles (bench/tiles.py), splits (its head-split sweep alone), first-step (time to
# the first step per variant from empty caches, the kernels with and without autotuning), first-step-profile (where
# the first step's seconds go). One device call holds about 9 minutes
# of them: gputests-kernels + gputests-model, then char + launch, then the gpt2s lengths, then the configs in two calls.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:?OUT must name the results folder}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/env.txt"

run() {  # run SECONDS LOG COMMAND...: one capped measurement, appended to its log
    local seconds=$1 log=$2
    shift 2
    timeout "$seconds" "$@" >> "$out/$log" 2>&1
    echo "$log rc $? after ${SECONDS}s"
}

# --timeout is pytest-timeout (installed on the device); the flags are split into words where used
PYTEST_GPU_FLAGS="-v -rA --durations=20 --timeout=150"

train_rows() {  # train_rows SECONDS ARGS...: bench/train.py rows into one results file
    local seconds=$1
    shift
    # the autotuner's pick per kernel and shape: which tile candidates never win (time to the first step)
    run "$seconds" train.log env TRITON_PRINT_AUTOTUNING=1 python bench/train.py --out "$out/train_h200.json" "$@"
}

first_step() {  # first_step SECONDS LOG VARIANT ARGS...: bench/train.py's first steps at the char shape, in a
    # process of its own with empty compile caches (the environment, e.g. MLA_KERNELS_AUTOTUNE, passes through)
    local seconds=$1 log=$2 variant=$3 caches
    shift 3
    caches=$(mktemp -d)
    run "$seconds" "$log" env TRITON_CACHE_DIR="$caches/triton" TORCHINDUCTOR_CACHE_DIR="$caches/inductor" \
        python bench/train.py --shapes char --modes step_graph --variants "$variant" --steps 3 --rounds 1 \
        --warmup 0 --profile_steps 1 --latents r32 "$@"
}

# shellcheck disable=SC2086  # PYTEST_GPU_FLAGS is a list of words
for section in "$@"; do
    case $section in
        launch) run 90 launch_overhead.log python bench/launch_overhead.py --profile 40 --out "$out/launch_overhead_h200.json" ;;
        gputests-kernels)  # each kernel against float64 (~5 minutes); a test running past --timeout fails alone
            run 280 pytest_gpu.log python -m pytest tests/gpu/test_{append,attention,decode}_bf16.py \
                tests/gpu/test_svd_float32.py tests/gpu/test_compiled_launch.py $PYTEST_GPU_FLAGS ;;
        gputests-model)  # the whole GPT: bf16 loss and generation, the graphed step, the fp8 cache (~5 minutes)
            run 280 pytest_gpu.log python -m pytest tests/gpu/test_model_bf16.py tests/gpu/test_graphed_step.py \
                tests/gpu/test_fp8_cache_model.py $PYTEST_GPU_FLAGS ;;
        compiled) run 120 pytest_gpu.log python -m pytest tests/gpu/test_compiled_launch.py -q -rA ;;
        graphed) run 150 pytest_gpu.log python -m pytest tests/gpu/test_graphed_step.py -q -rA ;;
        tiles) run 200 tiles.log python bench/tiles.py --out "$out/tiles_h200.json" ;;
        splits) run 120 tiles.log python bench/tiles.py --splits_only --out "$out/splits_h200.json" ;;
        first-step)  # time to the first step, each variant (FIRST_STEP_CASES: variant:autotune ...)
            for case in ${FIRST_STEP_CASES:-mha:1 mla:1 mla:0 mla_sdpa_absorbed:1}; do
                MLA_KERNELS_AUTOTUNE="${case#*:}" first_step 120 first_step.log "${case%:*}" \
                    --out "$out/first_step_autotune${case#*:}_h200.json"
            done ;;
        first-step-profile)  # where the first step's seconds go: compile phases and a cProfile of the step,
            # MLA on the kernels against MLA on SDPA
            for variant in mla mla_sdpa_absorbed; do
                first_step 150 first_step_profile.log "$variant" --first_step_profile 60 \
                    --out "$out/first_step_profile_h200.json"
            done ;;
        forms)  # every (form, core) of an MLA layer, and the planned one, against float64 in bf16
            run 170 pytest_gpu_forms.log python -m pytest tests/gpu/test_model_bf16.py -k every_form -q -n 4 ;;
        backends)  # the table mla_gpt.model.plan chooses from: copy $OUT/nvidia_h200.json to mla_gpt/model/tables/
            run 420 backends.log python bench/backends.py --out "$out/nvidia_h200.json" ;;
        e2e)  # every MLA latent against MHA and plain-PyTorch MLA, 12 L 768 char vocabulary, T 256-16384, graphed
            train_rows 560 --shapes char gpt2s-char --modes eager_step_graph --steps 5 --rounds 3 --warmup 2 \
                --profile_steps 0 ;;
        e2e-compiled)  # the trainer's default step (compiled, one graph) for the default latent, both vocabularies
            train_rows 560 --shapes gpt2s-char gpt2s --T 1024 4096 16384 --modes step_graph --latents r32 \
                --variants mha mla mla_sdpa_absorbed --steps 5 --rounds 3 --warmup 2 --profile_steps 0 ;;
        char-graphs) train_rows 200 --shapes char --modes step_graph --device_table 25 ;;
        gpt2s-1k-graphs) train_rows 200 --shapes gpt2s --T 1024 --modes step_graph --device_table 25 ;;
        gpt2s-4k-graphs) train_rows 200 --shapes gpt2s --T 4096 --modes step_graph --device_table 25 ;;
        gpt2s-8k-graphs) train_rows 200 --shapes gpt2s --T 8192 --modes step_graph ;;
        profile)  # where the graphed char step of MLA on the kernels spends host time, against MLA on SDPA
            run 240 train_profile.log env TORCH_LOGS=perf_hints TRITON_PRINT_AUTOTUNING=1 \
                python bench/train.py --shapes char --modes compiler_graphs step_graph \
                --variants mla mla_sdpa_absorbed --latents r32 --host_table --out "$out/train_profile.json" ;;
        configs-eager|configs-compiled|configs-compiler-graphs|configs-default)  # ~4-5 minutes each
            run 330 pytest_gpu_configs.log python -m pytest tests/gpu/test_train_configs.py -q -rA -k "${section#configs-}" ;;
        configs-all|gputests-all)  # the four config step modes (gputests-all: and the rest of tests/gpu) side by
            # side, one process each (~8 minutes on 16 cores; correctness only, nothing timed)
            python -c "from mla_gpt.data.prepare import ensure_prepared; ensure_prepared('shakespeare_char')"
            for mode in eager compiled compiler-graphs default; do
                run 500 "pytest_gpu_configs_$mode.log" python -m pytest tests/gpu/test_train_configs.py -q -rA \
                    -k "$mode" --basetemp="$(mktemp -d)" &
            done
            if [ "$section" = gputests-all ]; then
                run 500 pytest_gpu_kernels.log python -m pytest tests/gpu/test_{append,attention,decode}_bf16.py \
                    tests/gpu/test_svd_float32.py tests/gpu/test_compiled_launch.py $PYTEST_GPU_FLAGS \
                    --basetemp="$(mktemp -d)" &
                run 500 pytest_gpu_model.log python -m pytest tests/gpu/test_model_bf16.py tests/gpu/test_graphed_step.py \
                    tests/gpu/test_fp8_cache_model.py $PYTEST_GPU_FLAGS --basetemp="$(mktemp -d)" &
            fi
            wait
            # one file, headed by the GPU and versions: a device call brings back at most 8
            sed 's/^/# /' "$out/env.txt" >> "$out/pytest_gpu.log"
            for log in "$out"/pytest_gpu_configs_*.log "$out"/pytest_gpu_kernels.log "$out"/pytest_gpu_model.log; do
                [ -f "$log" ] && { echo "########## $(basename "$log")"; cat "$log"; rm "$log"; }
            done >> "$out/pytest_gpu.log" ;;
        shipped)  # tests/gpu/test_train_configs.py: every config as shipped, every step mode, 4 processes
            python -c "from mla_gpt.data.prepare import ensure_prepared; ensure_prepared('shakespeare_char')"
            sed 's/^/# /' "$out/env.txt" > "$out/pytest_gpu_configs.log"
            run 420 pytest_gpu_configs.log python -m pytest tests/gpu/test_train_configs.py -q -rA -n 4 \
                --durations=30 ;;
        configs-bench)  # bench/configs.py: each config as shipped, default and 'off' step modes
            run 400 configs.log python bench/configs.py --out "$out/configs_h200.json" ;;
        configs-first-step)  # the default mode's first step with the attention ops opaque to Inductor
            run 300 configs.log env MLA_KERNELS_OP=custom_op python bench/configs.py --modes default \
                --out "$out/configs_custom_op_h200.json" ;;
        char) train_rows 330 --shapes char ;;
        gpt2s-1k) train_rows 300 --shapes gpt2s --T 1024 --modes compile compiler_graphs step_graph ;;
        gpt2s-4k) train_rows 300 --shapes gpt2s --T 4096 --modes compile compiler_graphs step_graph ;;
        gpt2s-8k) train_rows 300 --shapes gpt2s --T 8192 --modes compile compiler_graphs step_graph ;;
        *) echo "unknown section $section" ;;
    esac
done
tail -n 30 "$out/train.log" 2>/dev/null
