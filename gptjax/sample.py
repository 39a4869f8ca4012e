"""`python -m gptjax.sample --workdir runs/m1 --prompt "The history of"`: generate text from a trained run.

Restores only the parameters and the model config of the latest checkpoint (or --step), never the optimizer state,
and decodes with the KV cache. One sample streams to the terminal as it is generated; several samples share one
batched decoding loop and print when done. A sample ends at end-of-text or after --max_new_tokens.
"""

import sys

import jax
from absl import flags

from gptjax import cli, hardware, kernels, sampling
from gptjax.checkpoints import load_for_inference
from gptjax.errors import UserError
from gptjax.tokenizer import load_text_codec

def define_flags():
    """Command-line flags, defined only when this module runs as the program (others import its functions)."""
    flags.DEFINE_string("workdir", "runs/default", "Run directory whose checkpoints to sample from.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("prompt", "", "Text to continue ('' starts from end-of-text, i.e. a new document).")
    flags.DEFINE_string("prompt_file", None, "Read the prompt from this file instead.")
    flags.DEFINE_integer("num_samples", 1, "Samples to draw for the prompt (decoded together as one batch).")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample at most.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy (always the most likely token).")
    flags.DEFINE_integer("top_k", 200, "Sample only among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Sample only within the smallest set of tokens with this total probability.")
    flags.DEFINE_integer("seed", 0, "Random seed: the same seed and options give the same samples.")
    flags.DEFINE_string("platform", "", "JAX platform, as train.platform: '' lets JAX choose; 'cpu', 'gpu', 'METAL' "
                        "(jax-metal) or 'mps' (jax-mps) force one.")
    flags.DEFINE_enum("head_dtype", "float32", kernels.HEAD_DTYPES,
                      "Precision the output layer (the [vocab, d_model] embedding) is read in while decoding: "
                      "bfloat16 halves its bytes: up to 1.45x faster at one sample on a CPU, logits rounded.")


FLAGS = flags.FLAGS


def check_options(vocab_size: int) -> None:
    if not 0.0 < FLAGS.top_p <= 1.0:
        raise UserError(f"--top_p={FLAGS.top_p} must be in (0, 1]; 1 disables nucleus sampling")
    if FLAGS.temperature < 0:
        raise UserError(f"--temperature={FLAGS.temperature} must be >= 0 (0 = greedy)")
    if not 0 <= FLAGS.top_k <= vocab_size:
        raise UserError(f"--top_k={FLAGS.top_k} must be between 0 (off) and the vocabulary size {vocab_size}")
    if FLAGS.num_samples < 1 or FLAGS.max_new_tokens < 1:
        raise UserError("--num_samples and --max_new_tokens must be at least 1")


def read_prompt() -> str:
    if FLAGS.prompt_file is None:
        return FLAGS.prompt
    try:
        with open(FLAGS.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompt_file {FLAGS.prompt_file!r} ({e.__class__.__name__}); pass a UTF-8 "
                        f"text file") from None


def main():
    hardware.use_platform(FLAGS.platform)
    hardware.use_compilation_cache()
    params, model_config, meta = load_for_inference(FLAGS.workdir, FLAGS.step)
    check_options(model_config.vocab_size)
    tokenizer = load_text_codec(meta["tokenizer"])
    eos = tokenizer.eos_token_id
    prompt_text = read_prompt()
    prompt_ids, dropped = sampling.fit_prompt(tokenizer.encode(prompt_text), model_config, eos)
    if dropped:
        print(f"note: the prompt has {dropped + len(prompt_ids)} tokens; keeping its last {len(prompt_ids)} "
              f"(the context window)", file=sys.stderr)
    print(f"[step {meta['step']} of {FLAGS.workdir}]", file=sys.stderr)
    options = dict(num_samples=FLAGS.num_samples, max_new_tokens=FLAGS.max_new_tokens,
                   temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, eos_id=eos,
                   head_dtype=FLAGS.head_dtype)
    chunks = sampling.generate_chunks(params, model_config, prompt_ids, jax.random.key(FLAGS.seed), **options)
    if FLAGS.num_samples == 1:
        stream_one(chunks, tokenizer, prompt_text, eos)
    else:
        import numpy as np

        samples = np.concatenate(list(chunks), axis=1)
        for i, tokens in enumerate(samples):
            text = tokenizer.decode(sampling.truncate_at_eos(tokens, eos))
            print(f"--- sample {i + 1} ---\n{prompt_text}{text}")


def stream_one(chunks, tokenizer, prompt_text: str, eos: int) -> None:
    """Prints the prompt, then the sample as each chunk arrives (decoding the whole sample each time, so
    characters split across tokens appear once complete)."""
    import numpy as np

    print(prompt_text, end="", flush=True)
    tokens, printed = np.zeros((0,), np.int32), ""
    for chunk in chunks:
        tokens = np.concatenate([tokens, chunk[0]])
        text = tokenizer.decode(sampling.truncate_at_eos(tokens, eos))
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            continue
        print(text[len(printed):], end="", flush=True)
        printed = text
        if eos in tokens:
            break
    text = tokenizer.decode(sampling.truncate_at_eos(tokens, eos))
    print(text[len(printed):])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
