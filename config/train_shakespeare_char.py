# nanoGPT's baby GPT on character-level Shakespeare: 6 layers, 6 heads, 384 wide, context 256.
# Standard attention; add --use_mla=True for the MLA variant. About 3 minutes on one A100-class GPU.

out_dir = "out-shakespeare-char"
eval_interval = 250  # frequent: this small model overfits
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep the best val loss only

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small model can take a higher rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # many tokens per iteration relative to the model size
warmup_iters = 100
