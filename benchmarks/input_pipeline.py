"""Input pipeline speed: (a) tokenizing raw text, (b) reading the token cache into training batches, (c) the same
from a cache the size of English Wikipedia (20M windows).

    python -m benchmarks.input_pipeline [--text FILE] [--batch_size 128 --seq_len 256]

Prints one JSON object. The m1 run needs about 80k tokens/s on an M1 Max; both numbers should be far above it.
"""

import json
import os
import tempfile
import time

import numpy as np


def corpus_text(path: str | None, min_chars: int = 4_000_000) -> list[str]:
    """Documents to tokenize: a file split at blank lines, or the Python docs shipped with Python, repeated."""
    if path:
        with open(path, encoding="utf-8") as f:
            documents = [d for d in f.read().split("\n\n") if d.strip()]
    else:
        from pydoc_data.topics import topics

        documents = [topics[name] for name in sorted(topics)]
    repeats = max(1, -(-min_chars // sum(map(len, documents))))
    return documents * repeats


def tokenize_speed(documents: list[str]) -> dict:
    from gptjax.input_pipeline import DOCUMENTS_PER_TOKENIZER_CALL, tokenizer_encode_batch
    from gptjax.tokenizer import load_tokenizer

    encode_batch, _ = tokenizer_encode_batch("gpt2")
    encode_batch(documents[:8])  # warm up
    start = time.perf_counter()
    num_tokens = 0
    for i in range(0, len(documents), DOCUMENTS_PER_TOKENIZER_CALL):
        num_tokens += sum(map(len, encode_batch(documents[i: i + DOCUMENTS_PER_TOKENIZER_CALL])))
    bulk_seconds = time.perf_counter() - start

    tokenizer = load_tokenizer()
    sample = documents[: max(1, len(documents) // 8)]
    start = time.perf_counter()
    hf_tokens = sum(len(ids) for ids in tokenizer(sample)["input_ids"])
    hf_seconds = time.perf_counter() - start
    return {"tokenize_tokens_per_second": num_tokens / bulk_seconds,
            "tokenize_hf_tokens_per_second": hf_tokens / hf_seconds, "tokenized_tokens": num_tokens}


def cache_read_speed(batch_size: int, seq_len: int, steps: int) -> dict:
    from gptjax import input_pipeline

    with tempfile.TemporaryDirectory() as directory:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 50257, size=(batch_size * seq_len * 64,), dtype=np.uint16)
        shards = []
        for i, part in enumerate(np.array_split(tokens, 4)):
            path = os.path.join(directory, f"train_{i:05d}.bin")
            part.tofile(path)
            shards.append(np.memmap(path, dtype=np.uint16, mode="r"))
        stream = input_pipeline.TokenStream(shards)
        batches = input_pipeline.train_batches(stream, seq_len, batch_size, seed=0)
        next(batches)
        start = time.perf_counter()
        for _ in range(steps):
            next(batches)
        seconds = time.perf_counter() - start
        batches.close()
    return {"cache_read_tokens_per_second": steps * batch_size * seq_len / seconds}


def wikipedia_scale_read_speed(batch_size: int, seq_len: int, steps: int, num_windows: int = 20_000_000) -> dict:
    """Training batches from a token cache the size of English Wikipedia (~20M windows of 256 tokens, ~5B tokens).

    The cache is a sparse file under this benchmark's own temporary directory (10 GB that take no disk and read as
    token 0), so this measures what the pipeline itself costs per batch at that scale (the epoch's order, the window
    gather, tf.data), not the disk. Reports the first batch's latency (which includes computing the epoch's order)
    and the steady rate after it.
    """
    from gptjax import input_pipeline

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "train_00000.bin")
        num_tokens = num_windows * seq_len + 1
        with open(path, "wb") as f:
            f.truncate(2 * num_tokens)  # uint16 tokens
        stream = input_pipeline.TokenStream([input_pipeline.open_shard(path, "uint16")])
        start = time.perf_counter()
        batches = input_pipeline.train_batches(stream, seq_len, batch_size, seed=0)
        next(batches)
        first_batch_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            next(batches)
        seconds = time.perf_counter() - start
        batches.close()
    return {"scale_windows": stream.num_windows(seq_len), "scale_first_batch_seconds": first_batch_seconds,
            "scale_batches_per_second": steps / seconds,
            "scale_tokens_per_second": steps * batch_size * seq_len / seconds}


def run(text: str | None = None, batch_size: int = 128, seq_len: int = 256, steps: int = 200) -> dict:
    results = tokenize_speed(corpus_text(text))
    results.update(cache_read_speed(batch_size, seq_len, steps))
    results.update(wikipedia_scale_read_speed(batch_size, seq_len, steps))
    results.update({"batch_size": batch_size, "seq_len": seq_len, "cpu_count": os.cpu_count()})
    return results


if __name__ == "__main__":
    from gptjax import cli
    from gptjax.errors import exit_on_user_error

    from absl import flags

    args = flags.FlagValues()
    flags.DEFINE_string("text", None, "a UTF-8 text file to tokenize (default: the Python docs)", flag_values=args)
    flags.DEFINE_integer("batch_size", 128, "sequences per batch read from the cache", flag_values=args)
    flags.DEFINE_integer("seq_len", 256, "tokens per sequence", flag_values=args)
    flags.DEFINE_integer("steps", 200, "batches read", flag_values=args)
    cli.parse_own_flags(args, None, __doc__.splitlines()[0])
    with exit_on_user_error():
        for name in ("batch_size", "seq_len", "steps"):
            cli.require(getattr(args, name) >= 1, f"--{name}={getattr(args, name)} must be >= 1")
        cli.require(args.text is None or os.path.isfile(args.text), f"--text {args.text!r} is not a file")
    print(json.dumps(run(args.text, args.batch_size, args.seq_len, args.steps), indent=1))
