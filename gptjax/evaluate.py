"""`python -m gptjax.evaluate --workdir runs/m1`: loss, perplexity and bits per byte of a checkpoint.

By default it reads the run's own held-out split with the same batches as the evaluation during training, so the
number equals the logged eval_loss; `--max_batches 0` uses the whole split, and `--source/--path/--name` measure
any corpus the input pipeline reads. Prints a final JSON line.
"""

import json
import math

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import PartitionSpec
from tqdm import tqdm

from gptjax import cli, input_pipeline
from gptjax import train_step as steps_lib
from gptjax.checkpoints import load_for_inference
from gptjax.errors import UserError


def evaluate_loss(params, eval_step, stream, seq_len: int, batch_size: int, max_batches: int, mesh,
                  token_bytes: np.ndarray | None = None, progress: bool = False) -> dict:
    """Token-weighted mean next-token loss over held-out windows (all of them when max_batches is 0).

    The last batch is padded to the full batch size with weight-0 rows, so every device sees the same shape.
    With `token_bytes` (UTF-8 bytes of each token id) it also reports bits per byte, comparable across tokenizers.
    """
    loss_sum, tokens, num_bytes = 0.0, 0.0, 0
    rows = input_pipeline.process_rows(batch_size, jax.process_index(), jax.process_count())
    batches = input_pipeline.eval_batches(stream, seq_len, batch_size, max_batches)
    for windows in tqdm(batches, desc="evaluating", unit=" batches", disable=not progress):
        weights = np.zeros((batch_size,), np.float32)
        weights[: len(windows)] = 1.0
        padded = np.zeros((batch_size, seq_len + 1), np.int32)
        padded[: len(windows)] = windows
        out = eval_step(params, steps_lib.global_batch(padded[rows], mesh, PartitionSpec("data")),
                        steps_lib.global_batch(weights[rows], mesh, PartitionSpec("data")))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
        if token_bytes is not None:
            num_bytes += int(token_bytes[windows[:, 1:]].sum())
    if tokens == 0:
        raise UserError("no held-out windows to evaluate; use a larger corpus or data.eval_fraction")
    loss = loss_sum / tokens
    results = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}
    if token_bytes is not None and num_bytes:
        results["eval_bits_per_byte"] = loss_sum / math.log(2) / num_bytes
    return results


def token_byte_lengths(tokenizer_name: str, vocab_size: int) -> np.ndarray:
    """UTF-8 length of every token id (end-of-text counts 0 bytes: it separates documents, it is not text)."""
    from gptjax.tokenizer import END_OF_TEXT_ID, load_bulk_encoder, load_tokenizer

    lengths = np.zeros((vocab_size,), np.int64)
    if tokenizer_name == "gpt2":
        encoder = load_bulk_encoder()
        for i in range(min(vocab_size, encoder.n_vocab)):
            if i != END_OF_TEXT_ID:
                lengths[i] = len(encoder.decode_single_token_bytes(i))
        return lengths
    tokenizer = load_tokenizer(tokenizer_name)
    for i in range(min(vocab_size, len(tokenizer))):
        if i != tokenizer.eos_token_id:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def define_flags():
    """Command-line flags, defined only when this module runs as the program (others import its functions)."""
    flags.DEFINE_string("workdir", "runs/default", "Run directory whose checkpoint to evaluate.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("split", "validation", "Which split of the corpus: 'validation' or 'train'.")
    flags.DEFINE_integer("max_batches", None, "Batches to evaluate; default: as during training (train.eval_steps); "
                         "0 = the whole split.")
    flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the training micro-batch).")
    flags.DEFINE_string("source", None, "Evaluate another corpus: data.source ('text', 'tfds', 'hf', 'python_docs').")
    flags.DEFINE_string("path", None, "data.path for --source text (a path or glob).")
    flags.DEFINE_string("name", None, "data.name for --source tfds / hf.")


FLAGS = flags.FLAGS


def main():
    cli.require(FLAGS.split in ("validation", "train"), f"--split={FLAGS.split!r} must be 'validation' or 'train'")
    cli.require(FLAGS.batch_size is None or FLAGS.batch_size >= 1, f"--batch_size={FLAGS.batch_size} must be >= 1")
    cli.require(FLAGS.max_batches is None or FLAGS.max_batches >= 0,
                f"--max_batches={FLAGS.max_batches} must be >= 0 (0 = the whole split)")
    params, model_config, meta = load_for_inference(FLAGS.workdir, FLAGS.step)
    config = ml_collections.ConfigDict(meta["config"])
    for key in ("source", "path", "name"):
        if getattr(FLAGS, key) is not None:
            config.data[key] = getattr(FLAGS, key)
    cache = input_pipeline.prepare(config, FLAGS.workdir)
    train = config.train
    batch_size = FLAGS.batch_size or train.batch_size // train.grad_accum_steps
    max_batches = train.eval_steps if FLAGS.max_batches is None else FLAGS.max_batches
    mesh = steps_lib.data_mesh()
    if batch_size % mesh.size:
        raise UserError(f"--batch_size={batch_size} is not divisible by the {mesh.size} devices")
    params_sharding = steps_lib.replicated_sharding(params, mesh)
    eval_step = steps_lib.make_eval_step(model_config, mesh, params_sharding)
    results = evaluate_loss(params, eval_step, cache.stream(FLAGS.split), config.data.seq_len, batch_size,
                            max_batches, mesh, token_byte_lengths(config.data.tokenizer,
                                                                  model_config.padded_vocab_size),
                            progress=True)
    print(json.dumps({"step": meta["step"], "split": FLAGS.split, "source": config.data.source, **results}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
