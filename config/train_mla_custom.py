# The original design's example MLA model: GPT-2 small's shape (12 layers, 12 heads, 768 wide) with a
# 192-wide latent per head group (head size 64 -> compressed K/V latents) and rank-32 SVD of the values.
# Sized for GPUs; on character-level Shakespeare by default. Multi-GPU:
#   torchrun --standalone --nproc_per_node=8 -m mla_gpt.cli.train config/train_mla_custom.py

out_dir = "out-mla-custom"
eval_interval = 500
eval_iters = 100
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 8  # divided between the processes
batch_size = 16
block_size = 512

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.1
bias = False

use_mla = True
mla_latent_dim = 192
use_svd = True
svd_rank = 32

learning_rate = 6e-4
max_iters = 10000
lr_decay_iters = 10000
min_lr = 6e-5
beta2 = 0.99
warmup_iters = 500
