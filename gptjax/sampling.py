"""Sampling: `sample_logits` (temperature, top-k, top-p) and KV-cache decoding with `generate`.

Decoding runs the prompt through the model once (prefill), filling each layer's key/value cache, then feeds one new
token per step. Steps run inside one compiled loop (`decode_steps`, up to `chunk` steps per call);
`generate_chunks` yields after each call so a command line can print text as it appears, and `generate` collects
everything. When the cache is full (the context window is reached) the last 3/4 of the window is run through the
model again from position 0 and decoding continues: the window slides instead of failing.
"""

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gptjax import kernels
from gptjax.model import GPT, ModelConfig, mask_padded_vocab


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Draws one token id per row. temperature 0 = greedy; top_k keeps the k best; top_p keeps the nucleus.

    temperature, top_k and top_p are Python numbers (static under jit). Works on any [B, V] logits.
    """
    if temperature == 0:
        return kernels.argmax(logits_BxV)  # jnp.argmax(logits, axis=-1): see gptjax/kernels/decoding.py
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k:  # the k best become the candidates, largest first: the draw then touches k entries instead of V
        logits_BxK, ids_BxK = jax.lax.top_k(logits_BxV, top_k)
    else:
        logits_BxK = logits_BxV
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probabilities add up to at least top_p.
        sorted_BxK = logits_BxK if top_k else jnp.sort(logits_BxK, axis=-1)[:, ::-1]
        probs_BxK = jax.nn.softmax(sorted_BxK, axis=-1)
        keep_count_B = jnp.sum(jnp.cumsum(probs_BxK, axis=-1) - probs_BxK < top_p, axis=-1)
        threshold_Bx1 = jnp.take_along_axis(sorted_BxK, keep_count_B[:, None] - 1, axis=-1)
        logits_BxK = jnp.where(logits_BxK < threshold_Bx1, jnp.finfo(jnp.float32).min, logits_BxK)
    # The Gumbel-max trick, as jax.random.categorical does it.
    choice_B = kernels.argmax(logits_BxK + jax.random.gumbel(rng, logits_BxK.shape))
    return jnp.take_along_axis(ids_BxK, choice_B[:, None], axis=-1)[:, 0] if top_k else choice_B


@struct.dataclass
class DecodeState:
    tokens_BxL: jax.Array  # the prompt and everything generated so far, in a preallocated buffer
    length: jax.Array  # how many entries of tokens_BxL are filled
    cache_position: jax.Array  # how many tokens the KV cache holds = absolute position of the next token
    logits_BxV: jax.Array  # the model's prediction for the next token
    cache: dict  # per layer: key and value [BN, max_len, H], one row per (sample, head)
    done_B: jax.Array  # True once a sample has emitted end-of-text
    rng: jax.Array


def empty_cache(model_config: ModelConfig, batch_size: int):
    """Zeroed KV cache for `batch_size` rows; shapes come from an abstract init, so nothing is computed."""
    model = GPT(model_config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32),
                                               decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prefill(params, model_config: ModelConfig, tokens_BxP: jax.Array, length=None):
    """Runs P tokens through the model from position 0: (logits for the token after the first `length` [B, V],
    filled cache). `length` (default P) lets prompts of many lengths share one compilation, padded to a few sizes:
    the padding's cache slots lie after `length`, where the causal mask hides them until decoding overwrites them."""
    model = GPT(model_config)
    P = tokens_BxP.shape[1]
    cache = empty_cache(model_config, tokens_BxP.shape[0])
    hidden_BxPxD, variables = model.apply({"params": params, "cache": cache}, tokens_BxP, jnp.arange(P),
                                          decode=True, mutable=["cache"], method=GPT.hidden_states)
    last_Bx1xD = jax.lax.dynamic_slice_in_dim(hidden_BxPxD, (P if length is None else length) - 1, 1, axis=1)
    logits_Bx1xV = model.apply({"params": params}, last_Bx1xD, method=GPT.output_logits)
    return logits_Bx1xV[:, 0], variables["cache"]


@functools.partial(jax.jit, static_argnums=(1, 4))
def start_decoding(params, model_config: ModelConfig, tokens_BxP: jax.Array, length, head_dtype: str):
    """`prefill`, and the output layer laid out for the decoding steps (`kernels.output_head`): one compiled program
    per prompt bucket, instead of a second small one that a compilation cache might or might not keep."""
    logits_BxV, cache = prefill(params, model_config, tokens_BxP, length)
    return logits_BxV, cache, kernels.output_head(params, model_config, head_dtype)


def slide_window(model_config: ModelConfig) -> int:
    """Tokens kept when the window slides: 3/4 of the context (the new token among them), so once the window is
    full a slide happens every max_len // 4 + 1 tokens."""
    return max(1, model_config.max_len - model_config.max_len // 4)


@functools.partial(jax.jit, static_argnames=("model_config", "slide", "temperature", "top_k", "top_p", "eos_id"))
def decode_steps(params, head, state: DecodeState, steps: jax.Array, *, model_config: ModelConfig, slide: bool,
                 temperature: float, top_k: int, top_p: float, eos_id: int) -> DecodeState:
    """`steps` decoding steps: sample a token from the current logits, append it, feed it to the model.

    `steps` is a traced number (a `fori_loop` that XLA runs as a while loop), so chunks of any length share one
    compilation. The caller keeps the cache from overflowing: with `slide=True` (one step, when the cache is full)
    the new token is not fed alone; the last 3/4 of the window, ending with it, is run again from position 0.
    """
    model = GPT(model_config)
    keep = slide_window(model_config)

    def feed_one(state: DecodeState, token_B):
        hidden_Bx1xD, variables = model.apply({"params": params, "cache": state.cache}, token_B[:, None],
                                              state.cache_position[None], decode=True, mutable=["cache"],
                                              method=GPT.hidden_states)
        # GPT.output_logits, reading the output layer as `head` lays it out (gptjax/kernels/decoding.py)
        logits_BxV = mask_padded_vocab(kernels.head_logits(hidden_Bx1xD[:, 0], head), model_config.vocab_size)
        return state.replace(logits_BxV=logits_BxV, cache=variables["cache"],
                             cache_position=state.cache_position + 1)

    def refill_window(state: DecodeState, token_B):
        del token_B  # already in tokens_BxL, the last of the `keep` tokens re-read here
        window_BxP = jax.lax.dynamic_slice_in_dim(state.tokens_BxL, state.length - keep, keep, axis=1)
        logits_BxV, cache = prefill(params, model_config, window_BxP)
        return state.replace(logits_BxV=logits_BxV, cache=cache, cache_position=jnp.asarray(keep, jnp.int32))

    def step(_, state: DecodeState) -> DecodeState:
        rng, sample_rng = jax.random.split(state.rng)
        token_B = sample_logits(state.logits_BxV, sample_rng, temperature, top_k, top_p)
        token_B = jnp.where(state.done_B, eos_id, token_B).astype(state.tokens_BxL.dtype)
        tokens_BxL = jax.lax.dynamic_update_slice_in_dim(state.tokens_BxL, token_B[:, None], state.length, axis=1)
        state = state.replace(tokens_BxL=tokens_BxL, length=state.length + 1, rng=rng,
                              done_B=state.done_B | (token_B == eos_id))
        # A Python choice, not a lax.cond: a cond's two branches would each return the cache, and XLA then copies
        # the whole cache at every step (4 of 12 ms per step at batch 8 on the m1 shape).
        return refill_window(state, token_B) if slide else feed_one(state, token_B)

    return jax.lax.fori_loop(0, steps, step, state)


def generate_chunks(params, model_config: ModelConfig, prompt_ids: list[int] | np.ndarray, rng: jax.Array, *,
                    num_samples: int = 1, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, eos_id: int = 50256, chunk: int = 16,
                    head_dtype: str = "float32") -> Iterator[np.ndarray]:
    """Yields the new tokens [num_samples, n <= chunk] chunk by chunk; stops early once every sample has ended.

    The prompt must fit the context window (see `fit_prompt`); it is shared by all samples. head_dtype='bfloat16'
    reads the output layer in bfloat16 after the prompt (see `output_head`): faster on a CPU, logits rounded.
    """
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    assert 0 < len(prompt) <= model_config.max_len, "use fit_prompt() first"
    # Shapes come in a few sizes, so that a new prompt length or max_new_tokens reuses the compiled programs: the
    # prompt is padded to a power of two (at most the window), the token buffer holds a power-of-two number of
    # windows (at least one, so the slide's slice is always in bounds).
    prompt_slots = min(model_config.max_len, next_power_of_two(len(prompt)))
    tokens_BxL = np.zeros((num_samples, model_config.max_len * next_power_of_two(
        -(-(len(prompt) + max_new_tokens) // model_config.max_len))), np.int32)
    tokens_BxL[:, : len(prompt)] = prompt
    logits_BxV, cache, head = start_decoding(params, model_config, jnp.asarray(tokens_BxL[:, :prompt_slots]),
                                             jnp.asarray(len(prompt), jnp.int32), head_dtype)
    state = DecodeState(tokens_BxL=jnp.asarray(tokens_BxL), length=jnp.asarray(len(prompt), jnp.int32),
                        cache_position=jnp.asarray(len(prompt), jnp.int32), logits_BxV=logits_BxV, cache=cache,
                        done_B=jnp.asarray(np.zeros((num_samples,), bool)), rng=rng)
    options = dict(model_config=model_config, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
    # The host follows the cache position (it only counts), so it knows when the cache is full without asking
    # the device, and slides the window at exactly that step.
    produced, cache_position = 0, len(prompt)
    while produced < max_new_tokens:
        slide = cache_position == model_config.max_len
        steps = 1 if slide else min(chunk, max_new_tokens - produced, model_config.max_len - cache_position)
        state = decode_steps(params, head, state, jnp.asarray(steps, jnp.int32), slide=slide, **options)
        cache_position = slide_window(model_config) if slide else cache_position + steps
        start = len(prompt) + produced
        yield np.asarray(state.tokens_BxL)[:, start: start + steps]  # sliced on the host: no program per slice
        produced += steps
        if np.asarray(state.done_B).all():
            return


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def generate(params, model_config: ModelConfig, prompt_ids, rng: jax.Array, **options) -> np.ndarray:
    """All new tokens [num_samples, <= max_new_tokens] (see generate_chunks for the options)."""
    return np.concatenate(list(generate_chunks(params, model_config, prompt_ids, rng, **options)), axis=1)


def fit_prompt(prompt_ids: list[int], model_config: ModelConfig, eos_id: int) -> tuple[list[int], int]:
    """(ids that fit the window, how many were dropped): an empty prompt starts from end-of-text, a long one keeps
    its last max_len tokens."""
    if not prompt_ids:
        return [eos_id], 0
    dropped = max(0, len(prompt_ids) - model_config.max_len)
    return list(prompt_ids[dropped:]), dropped


def truncate_at_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """A sample's tokens up to (not including) its first end-of-text."""
    ends = np.flatnonzero(tokens == eos_id)
    return tokens[: ends[0]] if len(ends) else tokens


@functools.partial(jax.jit, static_argnames=("model_config",))
def _next_logits_uncached(params, window_BxS, length, *, model_config: ModelConfig):
    logits_BxSxV = GPT(model_config).apply({"params": params}, window_BxS)
    return jax.lax.dynamic_index_in_dim(logits_BxSxV, length - 1, axis=1, keepdims=False)


def generate_greedy_uncached(params, model_config: ModelConfig, prompt_ids, max_new_tokens: int,
                             num_samples: int = 1) -> np.ndarray:
    """The slow reference: greedy decoding that recomputes the whole window for every token (no cache).

    The window follows the rule `generate` documents, written out here rather than shared (`slide_window`), so a
    change to the cached decoder's rule shows as a difference: it starts at the prompt and grows by one token a step;
    a token that would make it longer than max_len makes it slide to its last max_len - max_len // 4 tokens,
    positions counted from 0 again. Used by tests (it must agree with `generate`, token for token) and benchmarks
    (to show what the cache saves).
    """
    S = model_config.max_len
    keep = S - S // 4  # (at least 1 for any S >= 1)
    history = np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1))
    start = 0  # the window is history[:, start:]
    new = []
    for _ in range(max_new_tokens):
        window = history[:, start:]
        padded = np.zeros((num_samples, S), np.int32)
        padded[:, : window.shape[1]] = window
        logits = _next_logits_uncached(params, jnp.asarray(padded), window.shape[1], model_config=model_config)
        token = np.asarray(jnp.argmax(logits, axis=-1), np.int32)[:, None]
        history = np.concatenate([history, token], axis=1)
        if history.shape[1] - start > S:
            start = history.shape[1] - keep
        new.append(token)
    return np.concatenate(new, axis=1)
