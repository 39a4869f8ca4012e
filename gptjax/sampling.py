"""Sampling: `sample_logits` (temperature, top-k, top-p) and KV-cache decoding with `generate`.

Decoding runs the prompt through the model once (prefill), filling each layer's key/value cache, then feeds one new
token per step. Steps run inside a compiled `lax.scan` of `chunk` steps; `generate_chunks` yields after each chunk
so a command line can print text as it appears, and `generate` collects everything. When the cache is full (the
context window is reached) the last 3/4 of the window is run through the model again from position 0 and decoding
continues: the window slides instead of failing.
"""

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gptjax.model import GPT, ModelConfig


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Draws one token id per row. temperature 0 = greedy; top_k keeps the k best; top_p keeps the nucleus.

    temperature, top_k and top_p are Python numbers (static under jit). Works on any [B, V] logits.
    """
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    impossible = jnp.finfo(jnp.float32).min
    if top_k:
        kth_best_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_best_Bx1, impossible, logits_BxV)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probabilities add up to at least top_p.
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        cumulative_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
        keep_count_B = jnp.sum(cumulative_BxV - jax.nn.softmax(sorted_BxV, axis=-1) < top_p, axis=-1)
        threshold_Bx1 = jnp.take_along_axis(sorted_BxV, keep_count_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, impossible, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1)


@struct.dataclass
class DecodeState:
    tokens_BxL: jax.Array  # the prompt and everything generated so far, in a preallocated buffer
    length: jax.Array  # how many entries of tokens_BxL are filled
    cache_position: jax.Array  # how many tokens the KV cache holds = absolute position of the next token
    logits_BxV: jax.Array  # the model's prediction for the next token
    cache: dict  # per layer: key and value [B, N, max_len, H]
    done_B: jax.Array  # True once a sample has emitted end-of-text
    rng: jax.Array


def empty_cache(model_config: ModelConfig, batch_size: int):
    """Zeroed KV cache for `batch_size` rows; shapes come from an abstract init, so nothing is computed."""
    model = GPT(model_config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32),
                                               decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prefill(params, model_config: ModelConfig, tokens_BxP: jax.Array):
    """Runs P tokens through the model from position 0: (logits for the next token [B, V], filled cache)."""
    model = GPT(model_config)
    cache = empty_cache(model_config, tokens_BxP.shape[0])
    logits_BxPxV, variables = model.apply({"params": params, "cache": cache}, tokens_BxP,
                                          jnp.arange(tokens_BxP.shape[1]), decode=True, mutable=["cache"])
    return logits_BxPxV[:, -1], variables["cache"]


_prefill_jit = jax.jit(prefill, static_argnums=1)


def slide_window(model_config: ModelConfig) -> int:
    """Tokens kept when the window slides: 3/4 of the context, so a slide happens every max_len / 4 tokens."""
    return max(1, model_config.max_len - model_config.max_len // 4)


@functools.partial(jax.jit, static_argnames=("model_config", "chunk", "temperature", "top_k", "top_p", "eos_id"))
def decode_chunk(params, state: DecodeState, *, model_config: ModelConfig, chunk: int, temperature: float,
                 top_k: int, top_p: float, eos_id: int) -> DecodeState:
    """`chunk` decoding steps: sample a token from the current logits, append it, feed it to the model."""
    model = GPT(model_config)
    keep = slide_window(model_config)

    def feed_one(state, token_B):
        logits_Bx1xV, variables = model.apply({"params": params, "cache": state.cache}, token_B[:, None],
                                              state.cache_position[None], decode=True, mutable=["cache"])
        return logits_Bx1xV[:, 0], variables["cache"], state.cache_position + 1

    def refill_window(state, token_B):
        del token_B  # already in tokens_BxL, the last of the `keep` tokens re-read here
        start = state.length - keep
        window_BxP = jax.lax.dynamic_slice_in_dim(state.tokens_BxL, start, keep, axis=1)
        logits_BxV, cache = prefill(params, model_config, window_BxP)
        return logits_BxV, cache, jnp.asarray(keep, state.cache_position.dtype)

    def step(state: DecodeState, _):
        rng, sample_rng = jax.random.split(state.rng)
        token_B = sample_logits(state.logits_BxV, sample_rng, temperature, top_k, top_p)
        token_B = jnp.where(state.done_B, eos_id, token_B).astype(state.tokens_BxL.dtype)
        tokens_BxL = jax.lax.dynamic_update_slice_in_dim(state.tokens_BxL, token_B[:, None], state.length, axis=1)
        state = state.replace(tokens_BxL=tokens_BxL, length=state.length + 1, rng=rng,
                              done_B=state.done_B | (token_B == eos_id))
        cache_is_full = state.cache_position >= model_config.max_len
        logits_BxV, cache, position = jax.lax.cond(cache_is_full, refill_window, feed_one, state, token_B)
        return state.replace(logits_BxV=logits_BxV, cache=cache, cache_position=position), None

    state, _ = jax.lax.scan(step, state, None, length=chunk)
    return state


def generate_chunks(params, model_config: ModelConfig, prompt_ids: list[int] | np.ndarray, rng: jax.Array, *,
                    num_samples: int = 1, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, eos_id: int = 50256, chunk: int = 16) -> Iterator[np.ndarray]:
    """Yields the new tokens [num_samples, n] chunk by chunk; stops early once every sample has ended.

    The prompt must fit the context window (see `fit_prompt`); it is shared by all samples.
    """
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    assert 0 < len(prompt) <= model_config.max_len, "use fit_prompt() first"
    # Room for the prompt and whole chunks; at least one window, so the slide's slice is valid even when unused.
    total = max(len(prompt) + -(-max_new_tokens // chunk) * chunk, model_config.max_len)
    tokens_BxL = np.zeros((num_samples, total), np.int32)
    tokens_BxL[:, : len(prompt)] = prompt
    prompt_BxP = jnp.asarray(tokens_BxL[:, : len(prompt)])
    logits_BxV, cache = _prefill_jit(params, model_config, prompt_BxP)
    state = DecodeState(tokens_BxL=jnp.asarray(tokens_BxL), length=jnp.asarray(len(prompt), jnp.int32),
                        cache_position=jnp.asarray(len(prompt), jnp.int32), logits_BxV=logits_BxV, cache=cache,
                        done_B=jnp.zeros((num_samples,), bool), rng=rng)
    produced = 0
    while produced < max_new_tokens:
        start = int(state.length)
        state = decode_chunk(params, state, model_config=model_config, chunk=chunk, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_id=eos_id)
        new_tokens = np.asarray(state.tokens_BxL[:, start: start + min(chunk, max_new_tokens - produced)])
        produced += new_tokens.shape[1]
        yield new_tokens
        if bool(state.done_B.all()):
            return


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

    Used by tests (it must agree with `generate`) and benchmarks (to show what the cache saves).
    """
    S = model_config.max_len
    history = np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1))
    new = []
    for _ in range(max_new_tokens):
        window = history[:, -S:]
        padded = np.zeros((num_samples, S), np.int32)
        padded[:, : window.shape[1]] = window
        logits = _next_logits_uncached(params, jnp.asarray(padded), window.shape[1], model_config=model_config)
        token = np.asarray(jnp.argmax(logits, axis=-1), np.int32)[:, None]
        history = np.concatenate([history, token], axis=1)
        new.append(token)
    return np.concatenate(new, axis=1)
