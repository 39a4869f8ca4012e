"""Chunked causal attention: `jax.nn.dot_product_attention(q, k, v, is_causal=True)` rearranged for a CPU's caches.

Equal to it in value and gradient (tests/test_kernels.py checks both); `gptjax.kernels.attention_kernel` decides
where it runs (CPUs). Shapes as in the legend of gptjax/model.py; here Q = queries in a block, S = the keys they see.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def block_scores(q_BxNxQxH, k_BxNxSxH, first_query: int) -> jax.Array:
    """float32 [B, N, Q, S]: q.k / sqrt(H) for queries at positions first_query.. and keys at 0..S-1, the future
    set to the most negative float. The scores of gptjax.model.attention_scores, restated so the kernel stands alone."""
    Q, S, H = q_BxNxQxH.shape[2], k_BxNxSxH.shape[2], q_BxNxQxH.shape[-1]
    scores_BxNxQxS = jnp.einsum("bnqh,bnsh->bnqs", q_BxNxQxH, k_BxNxSxH,
                                preferred_element_type=jnp.float32) / np.sqrt(H)
    is_past_QxS = jnp.arange(S)[None, :] <= first_query + jnp.arange(Q)[:, None]
    return jnp.where(is_past_QxS, scores_BxNxQxS, jnp.finfo(jnp.float32).min)


def query_blocks(T: int, block: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of `block` queries (one block if it does not divide T).

    Queries start..end-1 only see keys 0..end-1, so per block the keys after `end` are never touched: the empty
    upper triangle of the causal score matrix is skipped, block by block.
    """
    block = block if 0 < block < T and T % block == 0 else T
    return [(start, start + block) for start in range(0, T, block)]


def _heads_major(*arrays_BxTxNxH):
    """[B, T, N, H] -> [B, N, T, H]: the layout the per-head matmuls read, made once instead of at every block."""
    return [jnp.swapaxes(a, 1, 2) for a in arrays_BxTxNxH]


def _attention_forward(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, query_block: int):
    """Softmax attention that also returns each query's log-sum-exp, from which the backward pass rebuilds it."""
    q_BxNxTxH, k_BxNxTxH, v_BxNxTxH = _heads_major(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH)
    y_blocks, logsumexp_blocks = [], []
    for start, end in query_blocks(q_BxNxTxH.shape[2], query_block):
        scores_BxNxQxS = block_scores(q_BxNxTxH[:, :, start:end], k_BxNxTxH[:, :, :end], start)
        max_BxNxQx1 = scores_BxNxQxS.max(axis=-1, keepdims=True)
        unnormalised_BxNxQxS = jnp.exp(scores_BxNxQxS - max_BxNxQx1)
        sum_BxNxQx1 = unnormalised_BxNxQxS.sum(axis=-1, keepdims=True)
        # Normalising the [Q, H] output instead of the [Q, S] weights saves a pass over the big array.
        y_BxNxQxH = jnp.einsum("bnqs,bnsh->bnqh", unnormalised_BxNxQxS.astype(v_BxNxTxH.dtype), v_BxNxTxH[:, :, :end],
                               preferred_element_type=jnp.float32) / sum_BxNxQx1
        y_blocks.append(y_BxNxQxH.astype(v_BxNxTxH.dtype))
        logsumexp_blocks.append(max_BxNxQx1 + jnp.log(sum_BxNxQx1))
    return jnp.swapaxes(jnp.concatenate(y_blocks, axis=2), 1, 2), jnp.concatenate(logsumexp_blocks, axis=2)


def _attention_backward(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, y_BxTxNxH, logsumexp_BxNxTx1, dy_BxTxNxH,
                        query_block: int):
    """Gradients of softmax attention, with the attention weights recomputed from q, k and the log-sum-exp."""
    dtype, H = q_BxTxNxH.dtype, q_BxTxNxH.shape[-1]
    # Softmax backward: dscore_tk = p_tk (dp_tk - sum_k' p_tk' dp_tk'), and that sum is dy_t . y_t.
    dy_dot_y_BxNxTx1 = jnp.swapaxes((dy_BxTxNxH.astype(jnp.float32) * y_BxTxNxH).sum(-1, keepdims=True), 1, 2)
    q_BxNxTxH, k_BxNxTxH, v_BxNxTxH, dy_BxNxTxH = _heads_major(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, dy_BxTxNxH)
    dq_blocks = []
    dk_BxNxTxH = jnp.zeros(k_BxNxTxH.shape, jnp.float32)
    dv_BxNxTxH = jnp.zeros(v_BxNxTxH.shape, jnp.float32)
    for start, end in query_blocks(q_BxNxTxH.shape[2], query_block):
        q_BxNxQxH, dy_BxNxQxH = q_BxNxTxH[:, :, start:end], dy_BxNxTxH[:, :, start:end]
        k_BxNxSxH, v_BxNxSxH = k_BxNxTxH[:, :, :end], v_BxNxTxH[:, :, :end]
        scores_BxNxQxS = block_scores(q_BxNxQxH, k_BxNxSxH, start)
        probs_BxNxQxS = jnp.exp(scores_BxNxQxS - logsumexp_BxNxTx1[:, :, start:end])
        dv_BxNxTxH = dv_BxNxTxH.at[:, :, :end].add(jnp.einsum(
            "bnqs,bnqh->bnsh", probs_BxNxQxS.astype(dtype), dy_BxNxQxH, preferred_element_type=jnp.float32))
        dprobs_BxNxQxS = jnp.einsum("bnqh,bnsh->bnqs", dy_BxNxQxH, v_BxNxSxH, preferred_element_type=jnp.float32)
        dscores_BxNxQxS = (probs_BxNxQxS * (dprobs_BxNxQxS - dy_dot_y_BxNxTx1[:, :, start:end]) / np.sqrt(H))
        dscores_BxNxQxS = dscores_BxNxQxS.astype(dtype)
        dq_blocks.append(jnp.einsum("bnqs,bnsh->bnqh", dscores_BxNxQxS, k_BxNxSxH, preferred_element_type=jnp.float32))
        dk_BxNxTxH = dk_BxNxTxH.at[:, :, :end].add(jnp.einsum(
            "bnqs,bnqh->bnsh", dscores_BxNxQxS, q_BxNxQxH, preferred_element_type=jnp.float32))
    dq_BxNxTxH = jnp.concatenate(dq_blocks, axis=2)
    return [jnp.swapaxes(g, 1, 2).astype(dtype) for g in (dq_BxNxTxH, dk_BxNxTxH, dv_BxNxTxH)]


def _over_batch_chunks(fn, sequences_per_chunk: int, *arrays_B):
    """fn applied to `sequences_per_chunk` sequences at a time (a lax.map), so its [those, N, T, T] arrays stay in
    cache."""
    B = arrays_B[0].shape[0]
    if sequences_per_chunk >= B:
        return fn(*arrays_B)
    chunked = [a.reshape(B // sequences_per_chunk, sequences_per_chunk, *a.shape[1:]) for a in arrays_B]
    outputs = jax.lax.map(lambda chunk: fn(*chunk), chunked)
    return jax.tree.map(lambda a: a.reshape(B, *a.shape[2:]), outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, sequences_per_chunk: int, query_block: int):
    """Causal softmax attention computed a few sequences and a block of queries at a time, for CPUs.

    Equal to `jax.nn.dot_product_attention(q, k, v, is_causal=True)`. On a CPU that one is memory-bound: every
    step of its softmax and of its gradient reads and writes a [B, N, T, T] array far bigger than the caches.
    Here each lax.map iteration works on a few sequences whose [those, N, T, T] scores fit in cache; within them,
    blocks of `query_block` queries skip the keys in their future; and the backward pass recomputes the weights
    from the saved log-sum-exp (as FlashAttention does) instead of storing them.
    Measured on a 2-core CPU at the m1 shape, forward + backward per layer: 93 ms (jax.nn.dot_product_attention),
    58 ms in chunks of 2 sequences, 38 ms with query blocks of 64 as well.
    """
    return _chunked_causal_attention_fwd(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, sequences_per_chunk, query_block)[0]


def _chunked_causal_attention_fwd(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, sequences_per_chunk, query_block):
    forward = functools.partial(_attention_forward, query_block=query_block)
    y_BxTxNxH, logsumexp_BxNxTx1 = _over_batch_chunks(forward, sequences_per_chunk, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH)
    return y_BxTxNxH, (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, y_BxTxNxH, logsumexp_BxNxTx1)


def _chunked_causal_attention_bwd(sequences_per_chunk, query_block, residuals, dy_BxTxNxH):
    backward = functools.partial(_attention_backward, query_block=query_block)
    return _over_batch_chunks(backward, sequences_per_chunk, *residuals, dy_BxTxNxH)


chunked_causal_attention.defvjp(_chunked_causal_attention_fwd, _chunked_causal_attention_bwd)


def sequences_per_attention_chunk(B: int, N: int, T: int, cache_bytes: int = 4 << 20) -> int:
    """The largest divisor of B whose float32 [that many, N, T, T] scores fit in `cache_bytes` (at least 1)."""
    fitting = max(1, cache_bytes // (N * T * T * 4))
    return max(c for c in range(1, B + 1) if B % c == 0 and c <= fitting)
