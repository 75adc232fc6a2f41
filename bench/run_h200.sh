#!/usr/bin/env bash
# One device call: the GPU measurements that need the H200, each capped in time, results in $OUT.
#   PYTHONPATH=. bash bench/run_h200.sh      (on the device; OUT is the folder that comes back)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:?OUT must name the results folder}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/env.txt"

# 1. end-to-end generation: latent cache (eager and CUDA graph), standard K/V cache, recompute
timeout 60 python bench/generate.py --new_tokens 128 --out "$out/generate_h200.json" \
    > "$out/generate_h200.log" 2>&1; echo "generate rc $?"

# 2. checkpoint conversion time, 12 layers x 768 wide
timeout 35 python bench/gpu_convert_timing.py --out "$out/convert_timing_h200.json" \
    > "$out/convert_timing_h200.log" 2>&1; echo "convert rc $?"

# 3. decode with the group-major cache (against the token-major layout), default mode
timeout 45 python bench/decode.py --shapes 64x4096,16x32768 --modes default --splits 4 \
    --out "$out" > "$out/decode_v3.log" 2>&1; echo "decode rc $?"

# 4. why the MLA layer trails its plain-PyTorch twin: core on strided inputs, kernel profiles
timeout 35 python bench/gpu_model_check.py --only_layer_diagnostics --out "$out/layer_diagnostics.json" \
    > "$out/layer_diagnostics.log" 2>&1; echo "layer diagnostics rc $?"

# 5. train briefly on the kernels, then sample through the CUDA-graph decode step
timeout 40 python -m mla_gpt.cli.train config/train_mla_test.py --device=cuda --out_dir=/tmp/out-mla-test \
    --max_iters=200 --eval_interval=200 --eval_iters=10 --log_interval=50 --compile=False --progress_bar=False \
    > "$out/train_sample_h200.log" 2>&1; echo "train rc $?"
timeout 20 python -m mla_gpt.cli.sample --out_dir=/tmp/out-mla-test --num_samples=2 --max_new_tokens=300 \
    >> "$out/train_sample_h200.log" 2>&1; echo "sample rc $?"
