"""The decoding loop's two CPU-bound pieces, rearranged: `jnp.argmax`, and the output layer of `GPT.output_logits`.

At decoding's one to a few rows per step, a CPU's matmuls are bound by memory and a [B, V] reduction by its loop
shape, so these two set most of a step's time beside the cached attention. Each computes what its textbook
function computes (tests/test_sampling.py, tests/test_convert.py); gptjax/sampling.py reaches them through
`gptjax.kernels`.
"""

import jax
import jax.numpy as jnp

HEAD_DTYPES = ("float32", "bfloat16")


def argmax(x_BxV: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)`: `first_argmax` on CPUs, jnp.argmax itself elsewhere."""
    if jax.default_backend().lower() == "cpu":
        return first_argmax(x_BxV)
    return jnp.argmax(x_BxV, axis=-1)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the largest value) as two plain reductions, a max and then a
    min over the positions holding it: XLA's CPU backend runs these ~5x faster than argmax's paired (value, index)
    reduction, 0.2 instead of 1.0 ms per decoding step on [8, 50304] logits."""
    V = x_BxV.shape[-1]
    is_best_BxV = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(is_best_BxV, jnp.arange(V), V), axis=-1), V - 1)  # NaN rows: V - 1


def output_head(params, model_config, head_dtype: str = "float32") -> jax.Array:
    """The output layer's weights as the decoding step reads them, laid out once per `generate` (a copy).

    Each new token reads the whole output layer ([V, D]: 2/3 of m1's bytes), so its layout and width set the speed
    of a step on a CPU, whose matmuls are bound by memory at decoding's few rows:
    - float32 [D, V], the tied embedding transposed: XLA's CPU matmul reads it 1.6x faster than [V, D] at batch 8;
    - bfloat16 [V, D] (opt-in), half the bytes, logits still accumulated in float32 (see `head_logits`).
    Either way the weights are first rounded to the model's compute dtype, as `GPT.output_logits` reads them: a
    bfloat16 model's logits are then the model's own (float32 weights would give others, by up to ~0.5).
    """
    if head_dtype not in HEAD_DTYPES:
        raise ValueError(f"head_dtype={head_dtype!r} is not one of {HEAD_DTYPES}")
    if model_config.tie_embeddings:
        weights_DxV = jnp.transpose(params["token_embedding"]["embedding"])  # a new array, stored [D, V]
    else:
        weights_DxV = params["lm_head"]["kernel"]  # already [D, V]
    weights_DxV = weights_DxV.astype(model_config.compute_dtype)
    if head_dtype == "bfloat16":
        return jnp.transpose(weights_DxV).astype(jnp.bfloat16)
    return jnp.asarray(weights_DxV, jnp.float32)


def head_logits(hidden_BxD: jax.Array, head: jax.Array) -> jax.Array:
    """float32 logits [B, V] from the final hidden states and an `output_head`: the matmul of `GPT.output_logits`
    at one position (the caller masks the padded vocabulary entries, as there)."""
    if head.dtype == jnp.float32:  # [D, V]
        return hidden_BxD @ head
    if hidden_BxD.shape[0] == 1:  # bfloat16 [V, D], one row: XLA fuses the widening into the dot products
        # ... unless it hoists the widening out of the decoding loop (a float32 copy, read at every step): the
        # barrier ties the head to this step's hidden state, so the widening stays in the step.
        hidden_BxD, head = jax.lax.optimization_barrier((hidden_BxD, head))
        return hidden_BxD.astype(jnp.float32) @ head.T.astype(jnp.float32)
    # bfloat16, several rows: a bfloat16 matmul with float32 sums (a widened copy would cost 19 ms per step)
    return jnp.einsum("bd,vd->bv", hidden_BxD.astype(jnp.bfloat16), head, preferred_element_type=jnp.float32)
