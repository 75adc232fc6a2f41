# A small MLA GPT on character-level Shakespeare that trains on a laptop CPU (2 cores) in a few
# minutes and still writes readable pseudo-Shakespeare. Same family as train_shakespeare_char.py.
#   python -m mla_gpt.cli.train config/train_mla_test.py && python -m mla_gpt.cli.sample --out_dir=out-mla-test

out_dir = "out-mla-test"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

use_mla = True
mla_latent_dim = 16  # head size 32 -> half-width latents: the K/V cache is half of standard attention's

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
