"""`python -m gptjax.evaluate --workdir runs/m1`: loss, perplexity and bits per byte of a checkpoint.

By default it reads the run's own held-out split with the same batches as the evaluation during training, so the
number equals the logged eval_loss; `--max_batches 0` uses the whole split, and `--source/--path/--name` measure
any corpus the input pipeline reads. Prints a final JSON line. Two standard measures on top:

- `--words`: word-level perplexity, exp(total NLL / words), for word-tokenized sets such as WikiText (the GPT-2
  paper's convention), with the words counted as the whitespace-separated pieces of the evaluated text. gptjax
  evaluates non-overlapping windows (each token sees only its window's tokens before it), so expect numbers above
  a sliding-window evaluation's.
- `--lambada FILE.jsonl`: last-word accuracy (Paperno et al. 2016): from each record's text (--text_field), predict
  its last word from the rest; a hit is the greedy prediction of every token of that word.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from gptjax import cli, hardware, input_pipeline, kernels
from gptjax.model import GPT, ModelConfig
from gptjax.sampling import next_power_of_two
from gptjax import train_step as steps_lib
from gptjax.checkpoints import load_for_inference
from gptjax.errors import UserError
from gptjax.train import evaluate_loss


def count_words(tokenizer, tokens: np.ndarray) -> int:
    """Whitespace-separated words in the text of `tokens` (end-of-text separators are not words)."""
    return len(tokenizer.decode(tokens[tokens != tokenizer.eos_token_id]).split())


def read_last_word_examples(path: str, text_field: str) -> list[str]:
    """The texts of a LAMBADA-style jsonl file; each needs a last word and something before it."""
    if not os.path.isfile(path):
        raise UserError(f"--lambada {path!r} is not a file; pass a .jsonl file with a {text_field!r} field per line")
    texts = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                where = f"{path} line {number}"
                text = input_pipeline.field_of(input_pipeline.json_record(line, where), text_field, where,
                                               fix="pass --text_field").strip()
                if len(text.split()) < 2:
                    raise UserError(f"{where} has fewer than two words; each example needs a context and a last word")
                texts.append(text)
    if not texts:
        raise UserError(f"--lambada {path!r} has no examples")
    return texts


def last_word_accuracy(params, model_config: ModelConfig, tokenizer, texts: list[str], batch_size: int = 16) -> dict:
    """LAMBADA's measure: the share of texts whose last word the model predicts greedily, token by token, from the
    text before it (the GPT-2 paper's protocol, without its stop-word filter). Texts longer than the context keep
    their end."""
    rows, word_lengths = [], []
    for text in texts:
        context, word = text.rsplit(maxsplit=1)  # the last word, after any whitespace
        word_ids = tokenizer.encode(" " + word)
        rows.append((tokenizer.encode(context) + word_ids)[-model_config.max_len:])
        word_lengths.append(len(word_ids))
    hits = greedy_hits(params, model_config, rows, word_lengths, batch_size)
    return {"lambada_accuracy": float(np.mean(hits)), "lambada_examples": len(rows)}


def greedy_hits(params, model_config: ModelConfig, rows: list[list[int]], word_lengths: list[int],
                batch_size: int = 16) -> np.ndarray:
    """[len(rows)] bool: whether the greedy prediction of each row's last `word_lengths[i]` tokens, each from the
    tokens before it, is those tokens. A batch is padded to its longest row (rounded up to a power of two, so a few
    shapes are compiled) and the output layer runs only at the positions that predict a word token: not the
    [B, max_len, V] logits of every position."""
    hits = np.zeros((len(rows),), bool)
    for start in range(0, len(rows), batch_size):
        batch, lengths = rows[start: start + batch_size], word_lengths[start: start + batch_size]
        T = min(model_config.max_len, next_power_of_two(max(map(len, batch))))
        W = next_power_of_two(max(lengths))
        tokens_BxT = np.zeros((batch_size, T), np.int32)  # right padding: a causal model never sees it
        positions_BxW = np.zeros((batch_size, W), np.int32)  # position t predicts token t + 1
        for i, (ids, n) in enumerate(zip(batch, lengths)):
            tokens_BxT[i, : len(ids)] = ids
            positions_BxW[i, :n] = np.arange(len(ids) - n - 1, len(ids) - 1)
        predicted_BxW = np.asarray(_greedy_at(params, tokens_BxT, positions_BxW, model_config=model_config))
        for i, (ids, n) in enumerate(zip(batch, lengths)):
            hits[start + i] = (predicted_BxW[i, :n] == ids[len(ids) - n:]).all()
    return hits


@functools.partial(jax.jit, static_argnames=("model_config",))
def _greedy_at(params, tokens_BxT, positions_BxW, *, model_config: ModelConfig):
    model = GPT(model_config)
    hidden_BxTxD = model.apply({"params": params}, tokens_BxT, method=GPT.hidden_states)
    hidden_BxWxD = jnp.take_along_axis(hidden_BxTxD, positions_BxW[:, :, None], axis=1)
    return model.apply({"params": params}, hidden_BxWxD, method=GPT.output_logits).argmax(axis=-1)


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
    flags.DEFINE_boolean("words", False, "Also report word-level perplexity (total NLL over whitespace-separated "
                         "words), for word-tokenized sets such as WikiText.")
    flags.DEFINE_string("lambada", None, "A .jsonl file of texts (data.text_field): report last-word accuracy instead.")
    flags.DEFINE_string("text_field", None, "The field of --lambada's records that holds the text (default: the "
                        "run's data.text_field).")
    flags.DEFINE_string("platform", "", "JAX platform, as train.platform: '' lets JAX choose; 'cpu', 'gpu', 'METAL' "
                        "(jax-metal) or 'mps' (jax-mps) force one.")


FLAGS = flags.FLAGS


def main():
    cli.require(FLAGS.split in ("validation", "train"), f"--split={FLAGS.split!r} must be 'validation' or 'train'")
    cli.require(FLAGS.batch_size is None or FLAGS.batch_size >= 1, f"--batch_size={FLAGS.batch_size} must be >= 1")
    cli.require(FLAGS.max_batches is None or FLAGS.max_batches >= 0,
                f"--max_batches={FLAGS.max_batches} must be >= 0 (0 = the whole split)")
    hardware.use_platform(FLAGS.platform)
    hardware.use_compilation_cache()
    params, model_config, meta = load_for_inference(FLAGS.workdir, FLAGS.step)
    config = ml_collections.ConfigDict(meta["config"])
    if FLAGS.lambada:
        from gptjax.tokenizer import load_text_codec

        texts = read_last_word_examples(FLAGS.lambada, FLAGS.text_field or config.data.text_field)
        results = last_word_accuracy(params, model_config, load_text_codec(config.data.tokenizer), texts)
        print(json.dumps({"step": meta["step"], "lambada": FLAGS.lambada, **results}))
        return
    for key in ("source", "path", "name"):
        if getattr(FLAGS, key) is not None:
            config.data[key] = getattr(FLAGS, key)
            config.data.eval_path = ""  # another corpus: its own documents, split by data.eval_fraction
    cache = input_pipeline.prepare(config, FLAGS.workdir)
    train = config.train
    batch_size = FLAGS.batch_size or train.batch_size // train.grad_accum_steps
    max_batches = train.eval_steps if FLAGS.max_batches is None else FLAGS.max_batches
    mesh = steps_lib.data_mesh()
    if batch_size % mesh.size:
        raise UserError(f"--batch_size={batch_size} is not divisible by the {mesh.size} devices")
    params_sharding = steps_lib.replicated_sharding(params, mesh)
    eval_chunk = kernels.eval_loss_chunk_tokens(train.get("loss_chunk_tokens", -1))
    eval_step = steps_lib.make_eval_step(model_config, mesh, params_sharding, loss_chunk=eval_chunk)
    if FLAGS.split == "validation" and input_pipeline.holds_out_nothing(config.data) and FLAGS.path is None:
        raise UserError(f"the run in {FLAGS.workdir} was trained with data.eval_fraction=0: it held out no documents "
                        f"to evaluate on; pass --split train to read its training text, or a corpus of its own "
                        f"whole: --source text --path FILE --split train")
    stream = cache.stream(FLAGS.split)
    results = evaluate_loss(params, eval_step, stream, config.data.seq_len, batch_size,
                            max_batches, mesh, token_byte_lengths(config.data.tokenizer,
                                                                  model_config.padded_vocab_size),
                            progress=True)
    if FLAGS.words:  # the evaluated windows' targets are the tokens 1 .. eval_tokens of the stream, in order
        from gptjax.tokenizer import load_text_codec

        words = count_words(load_text_codec(config.data.tokenizer), stream.read(1, results["eval_tokens"]))
        total_nll = results["eval_loss"] * results["eval_tokens"]
        results.update({"eval_words": words, "eval_word_perplexity": math.exp(min(total_nll / max(1, words), 50.0))})
    print(json.dumps({"step": meta["step"], "split": FLAGS.split, "source": config.data.source, **results}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
