#!/usr/bin/env bash
# The GPU measurements that need the H200, each capped in time, results in $OUT.
#   bash bench/run_h200.sh [section ...]    (on the device; OUT is the folder that comes back)
# Sections (default: all but generate-caches, in this order): append decode generate convert attention svd finetune
# fp8_scales model_check; generate-caches (bench/generate.py --caches: every cache at prompts 1024-32768), norms
# (the fused add + layer norm's test and A/B) and linears (decode_linear's test, its tile sweep, its A/B)
# on request.
# Their time caps add up to about 33 minutes: split them over four device calls (finetune alone takes one).
# Each writes $OUT/<name>_h200.json (its PNG beside it) and its log; copy them into
# bench/results/ to replace that GPU's previous results.
# DECODE_SPLITS=1 (or a list, DECODE_SPLITS='1 4') times only those split counts and the heuristic's
# instead of the whole sweep.
# At most 8 files come back from a device call: tar $out into one there.
# Set MLA_COMMIT=<the commit measured> where the tree has no git folder of its own (a lent GPU machine):
# results rows carry it.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:?OUT must name the results folder}
sections=${*:-append decode generate convert attention svd finetune fp8_scales model_check}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/env.txt"

run() {  # run SECONDS LOG COMMAND...: one capped measurement, its exit status on stdout
    local seconds=$1 log=$2
    shift 2
    timeout "$seconds" "$@" > "$out/$log" 2>&1
    echo "$log rc $? after ${SECONDS}s"
}

for section in $sections; do
    case $section in
    append)  # the decode step's latent projection written into the cache: bf16 check, fused vs cuBLAS + copy
        run 90 append_h200.log python bench/append.py --out "$out/append_h200.json" ;;
    decode)  # both modes, every split count the heuristic weighs, peers in the same run
        # shellcheck disable=SC2086  # DECODE_SPLITS is a list of words
        run 200 decode_h200.log python bench/decode.py --shapes 32x8192 32x32768 64x4096 1x131072 --modes default joint \
            --splits ${DECODE_SPLITS:-1 2 3 4 5 8 16 17 22 32 64 128 256} --out "$out/decode_h200.json" ;;
    generate)  # B 1, 32, 128: CUDA-graph steps fused / unfused / fp8 / ragged, standard cache, recompute
        run 240 generate_h200.log python bench/generate.py --new_tokens 128 --batch_sizes 1 32 128 \
            --out "$out/generate_h200.json" ;;
    generate-caches)  # every cache at prompts 1024 / 8192 / 32768, B 1 and 32: decode step ms, tokens/s, GB/s
        run 540 generate_caches_h200.log python bench/generate.py --caches --batch_sizes 1 32 --new_tokens 128 \
            --profile_kernels 12 --out "$out/generate_caches_h200.json" ;;
    norms)  # generation's fused residual add + layer norm: its bf16 test, the A/B at prompt 8192, graphed generation's tests
        run 40 pytest_gpu_layer_norm_h200.log python -m pytest tests/gpu/test_layer_norm_bf16.py -q
        run 150 generate_norms_h200.log python bench/generate.py --caches --prompts 8192 --batch_sizes 32 1 \
            --new_tokens 64 --norms fused unfused --profile_kernels 8 --out "$out/generate_norms_h200.json"
        run 70 pytest_gpu_generate_h200.log python -m pytest tests/gpu/test_generate_graph.py \
            tests/gpu/test_fp8_cache_model.py -q ;;
    linears)  # a decode step's linear layers on decode_linear: bf16 test, against cuBLAS cold, tile sweep, A/B at 8192
        run 60 pytest_gpu_linear_h200.log python -m pytest tests/gpu/test_linear_bf16.py -q
        run 60 linear_h200.log python bench/linear.py --out "$out/linear_h200.json"
        run 120 linear_tiles_h200.log python bench/linear.py --tiles --out "$out/linear_tiles_h200.json"
        run 180 generate_linears_h200.log python bench/generate.py --caches --prompts 8192 --batch_sizes 32 1 \
            --new_tokens 64 --linears fused cublas --profile_kernels 10 --out "$out/generate_linears_h200.json"
        run 90 pytest_gpu_generate_linears_h200.log python -m pytest tests/gpu/test_generate_graph.py \
            tests/gpu/test_fp8_cache_model.py tests/gpu/test_layer_norm_bf16.py -q ;;
    convert)  # checkpoint conversion, 12 layers x 768 wide (Triton compiles in the warm-up conversion)
        run 90 convert_timing_h200.log python bench/convert.py --timing --out "$out/convert_timing_h200.json" ;;
    attention)  # core and layer against SDPA / FlexAttention / plain-PyTorch MLA
        run 240 attention_h200.log python bench/attention.py --out "$out/attention_h200.json" ;;
    svd)  # randomized SVD kernels against torch.svd_lowrank / torch.linalg.svd
        run 120 svd_h200.log python bench/svd.py --out "$out/svd_h200.json" ;;
    finetune)  # a GPT-2-small-shaped model converted to MLA and fine-tuned (the bring-your-own-model report)
        run 540 finetune_converted_h200.log python bench/finetune_converted.py \
            --out "$out/finetune_converted_h200.json" ;;
    fp8_scales)  # fp8 latent cache: val loss per scale granularity on two trained GPT-2-small-shaped models
        run 300 fp8_scales_h200.log python bench/fp8_scales.py --out "$out/fp8_scales_h200.json" ;;
    model_check)  # the whole GPT on the kernels against float64, and its fullgraph compile
        run 150 model_check_h200.log python bench/model_check.py --out "$out/model_check_h200.json" ;;
    *) echo "unknown section $section (allowed: append decode generate generate-caches norms linears convert attention svd finetune fp8_scales model_check)"
       exit 2 ;;
    esac
done
