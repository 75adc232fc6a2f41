"""Sample from a trained model, streaming tokens as they are generated (latent KV cache).

    python -m mla_gpt.cli.sample --out_dir=out-mla-test
    python -m mla_gpt.cli.sample --out_dir=out-mla --start="ROMEO:" --num_samples=2 --max_new_tokens=300
    python -m mla_gpt.cli.sample --out_dir=out-mla --start=FILE:prompt.txt --temperature=0.9 --top_k=50
    python -m mla_gpt.cli.sample --out_dir=out-mla --start=FILE:prompts.txt --batch   # one prompt per line

`--help` lists every key. Samples go to stdout; timings (tokens/s) to stderr.
"""

import codecs
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, model_from_checkpoint
from mla_gpt.cli.configurator import ConfigError, help_text, load_config
from mla_gpt.train.runtime import resolve_device, resolve_dtype
from mla_kernels.reference import FP8_DTYPE


@dataclass
class SampleConfig:
    out_dir: str = field(default="out", metadata={"help": "folder holding ckpt.pt"})
    start: str = field(default="\n", metadata={"help": "prompt text, or FILE:path to read it from a file"})
    num_samples: int = field(
        default=3, metadata={"help": "samples to draw, one after the other (per prompt with batch)"}
    )
    batch: bool = field(
        default=False,
        metadata={"help": "every non-empty line of start is a prompt, and all of them (num_samples each) are "
                          "generated together in one batch, each row at its own position in the cache"},
    )
    max_new_tokens: int = field(default=500, metadata={"help": "tokens generated per sample"})
    temperature: float = field(
        default=0.8, metadata={"help": "1.0 as trained, lower is more conservative, 0 greedy"}
    )
    top_k: Optional[int] = field(
        default=200, metadata={"help": "sample among the k most likely tokens; None: all"}
    )
    seed: int = field(default=1337, metadata={"help": "sampling seed"})
    device: str = field(
        default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bfloat16 on capable GPUs, float32 on CPU), 'float32', 'bfloat16', 'float16'"
        },
    )
    attn_backend: Optional[str] = field(
        default=None, metadata={"help": "override the checkpoint's attention backend"}
    )
    cache_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "KV cache dtype: None -> the activations' dtype; 'fp8': float8_e4m3fn latents with a "
                          "float32 scale per position and group, read as stored by the decode kernel (0.56x "
                          "the bytes of bf16, but a slower decode step today)"},
    )
    cuda_graph: Optional[bool] = field(
        default=None,
        metadata={"help": "replay the one-token decode step as a CUDA graph; None -> on for CUDA"},
    )


class Tokenizer:
    """encode(str) -> list[int] and a streaming decoder, from the meta stored in the checkpoint."""

    def __init__(self, meta):
        if meta is None:
            raise CheckpointError(
                "the checkpoint has no tokenizer meta (trained on data without meta.pkl); "
                "cannot turn text into tokens"
            )
        self.meta = meta
        if meta["tokenizer"] == "char":
            self.stoi, self.itos = meta["stoi"], meta["itos"]
        elif meta["tokenizer"] == "tiktoken":
            from mla_gpt.data.prepare import load_tiktoken_encoding

            self.enc = load_tiktoken_encoding(meta["encoding"])
        else:
            raise CheckpointError(f"unknown tokenizer {meta['tokenizer']!r} in the checkpoint")

    def encode(self, text):
        if self.meta["tokenizer"] == "char":
            unknown = sorted(set(text) - set(self.stoi))
            if unknown:
                raise ConfigError(f"start: characters {unknown} are not in the model's vocabulary")
            return [self.stoi[c] for c in text]
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def stream_decoder(self):
        """A function token_id -> text to print; BPE bytes are held back until they form whole UTF-8 characters."""
        if self.meta["tokenizer"] == "char":
            return lambda token: self.itos[token]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: decoder.decode(self.enc.decode_single_token_bytes(token))


def read_start(start):
    """The prompt: literal text, or the contents of a file given as FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:") :])
    if not path.is_file():
        raise ConfigError(f"start: prompt file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")


def sample(cfg, out=None, err=None):
    """Draw cfg['num_samples'] samples, writing text to `out` (stdout) as it comes and timings to `err`
    (stderr). Returns the sample texts, prompt included."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    for key in ("num_samples", "max_new_tokens"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    device = resolve_device(cfg["device"])
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = resolve_dtype(cfg["dtype"], device_type)

    checkpoint = load_checkpoint(Path(cfg["out_dir"]) / CHECKPOINT_NAME, map_location="cpu")
    runtime = {"dropout": 0.0}
    if cfg["attn_backend"] is not None:
        runtime["attn_backend"] = cfg["attn_backend"]
    model = model_from_checkpoint(checkpoint, **runtime)
    tokenizer = Tokenizer(checkpoint.get("meta"))
    model.eval().to(device)
    cuda_graph = device_type == "cuda" if cfg["cuda_graph"] is None else cfg["cuda_graph"]
    if cuda_graph and device_type != "cuda":
        raise ConfigError(f"cuda_graph=True needs a CUDA device, got device={device!r}")
    # a captured graph must not read autocast's cached weight casts, which are freed on exit
    autocast = (
        nullcontext()
        if dtype == torch.float32
        else torch.amp.autocast(device_type, dtype=dtype, cache_enabled=not cuda_graph)
    )

    if cfg["cache_dtype"] not in (None, "fp8"):
        raise ConfigError(f"cache_dtype must be None (the activations' dtype) or 'fp8', got {cfg['cache_dtype']!r}")
    cache_dtype = FP8_DTYPE if cfg["cache_dtype"] == "fp8" else None
    prompt = read_start(cfg["start"])
    torch.manual_seed(cfg["seed"])
    if device_type == "cuda":
        torch.cuda.manual_seed(cfg["seed"])
    if cfg["batch"]:
        return sample_batch(cfg, model, tokenizer, prompt, device, autocast, cuda_graph, cache_dtype, out, err)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("start: the prompt encodes to no tokens; give at least one character")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)
    texts, total_tokens, total_time = [], 0, 0.0
    for k in range(cfg["num_samples"]):
        decode = tokenizer.stream_decoder()
        pieces = [prompt]
        out.write(prompt)
        out.flush()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            for token in model.generate_stream(
                x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"],
                cuda_graph=cuda_graph, cache_dtype=cache_dtype,
            ):
                piece = decode(int(token[0, 0]))
                pieces.append(piece)
                out.write(piece)
                out.flush()
        dt = time.perf_counter() - t0
        total_tokens += cfg["max_new_tokens"]
        total_time += dt
        texts.append("".join(pieces))
        out.write("\n---------------\n")
        out.flush()
        err.write(
            f"sample {k + 1}: {cfg['max_new_tokens']} tokens in {dt:.2f} s, {cfg['max_new_tokens'] / dt:.1f} tokens/s\n"
        )
    err.write(
        f"{total_tokens} tokens in {total_time:.2f} s: {total_tokens / total_time:.1f} tokens/s "
        f"(iter {checkpoint['iter_num']} checkpoint, {device}, {str(dtype).removeprefix('torch.')})\n"
    )
    return texts


def sample_batch(cfg, model, tokenizer, text, device, autocast, cuda_graph, cache_dtype, out, err):
    """cfg['batch']: each non-empty line of text is a prompt; all (num_samples each) in one batch.

    Writes each sample once the batch is done, prompt included, then the batch's rate to `err`.
    Returns the sample texts.
    """
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("start: with batch=True every non-empty line is a prompt, and there is none")
    rows = []
    for line in prompts:
        ids = tokenizer.encode(line)
        rows += [torch.tensor(ids, dtype=torch.long, device=device)] * cfg["num_samples"]
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        generated = model.generate(rows, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"],
                                   cuda_graph=cuda_graph, cache_dtype=cache_dtype)
    new_tokens = [tokens[prompt.numel():].tolist() for tokens, prompt in zip(generated, rows)]  # reads the device
    dt = time.perf_counter() - t0
    texts = []
    for k, tokens in enumerate(new_tokens):
        decode = tokenizer.stream_decoder()
        texts.append(prompts[k // cfg["num_samples"]] + "".join(decode(t) for t in tokens))
        out.write(texts[-1] + "\n---------------\n")
    out.flush()
    total = sum(len(tokens) for tokens in new_tokens)
    err.write(f"{len(rows)} samples ({len(prompts)} prompts x {cfg['num_samples']}) in one batch: {total} tokens "
              f"in {dt:.2f} s, {total / dt:.1f} tokens/s ({device})\n")
    return texts


USAGE = ("--out_dir=DIR [--start=TEXT|FILE:path] [--batch] [--num_samples=N] [--max_new_tokens=N] "
         "[--key=value ...]")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text("python -m mla_gpt.cli.sample", USAGE, SampleConfig))
        return 0
    try:
        sample(load_config(argv, SampleConfig))
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
