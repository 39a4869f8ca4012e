"""The fused chunked output loss: cross-entropy of hidden @ output.T, with its gradient formed in the forward pass.

Equal to the plain loss (the full [M, V] logits, then `optax.softmax_cross_entropy_with_integer_labels`) in value and
gradient (tests/test_kernels.py checks both); `gptjax.kernels.loss_chunk_tokens` decides where it runs (CPUs).
Shapes as in the legend of gptjax/model.py: M = tokens of the flattened batch, C chunks of c tokens.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_output_loss(hidden_MxD, output_VxD, targets_M, vocab_size: int, chunk: int):
    """Summed cross-entropy of logits = hidden @ output.T, computed `chunk` tokens at a time.

    The loss is the last operation of the step, so its gradient can be formed in the forward pass: for each chunk,
    d_hidden and d_output are computed while the chunk's logits are at hand, and the backward pass only scales them.
    Nothing of size [M, V] is kept, and the logits are computed once instead of twice.
    """
    return _fused_output_loss_fwd(hidden_MxD, output_VxD, targets_M, vocab_size, chunk)[0]


def max_over_real_vocab(logits_cxV, vocab_size: int):
    """[c, 1] row max over the first `vocab_size` columns, without writing a masked copy of the logits.

    The columns are viewed as blocks of up to 128 (a reshape, free) and reduced as they are; only the blocks that
    hold padded entries are masked, and they are a thin slice at the end.
    """
    c, V = logits_cxV.shape
    block = math.gcd(V, 128)
    real_blocks = vocab_size // block  # blocks 0..real_blocks-1 hold real entries only
    tail_logits = logits_cxV[:, real_blocks * block:]  # [c, the last V - real_blocks x block columns]
    tail_max_c = jnp.where(real_blocks * block + jnp.arange(tail_logits.shape[1]) < vocab_size, tail_logits,
                           -jnp.inf).max(axis=-1, initial=-jnp.inf)
    block_max = logits_cxV.reshape(c, V // block, block).max(axis=-1)  # [c, V / block]
    return jnp.maximum(block_max[:, :real_blocks].max(axis=-1, initial=-jnp.inf), tail_max_c)[:, None]


def _fused_output_loss_fwd(hidden_MxD, output_VxD, targets_M, vocab_size, chunk):
    M, D = hidden_MxD.shape
    V = output_VxD.shape[0]
    chunk = min(chunk, M)
    padded = -(-M // chunk) * chunk  # pad to whole chunks; padding rows have weight 0
    weights_M = jnp.pad(jnp.ones((M,), jnp.float32), (0, padded - M))
    hidden_CxcxD = jnp.pad(hidden_MxD, ((0, padded - M), (0, 0))).reshape(-1, chunk, D)
    targets_Cxc = jnp.pad(targets_M, (0, padded - M)).reshape(-1, chunk)
    weights_Cxc = weights_M.reshape(-1, chunk)
    is_real_1xV = (jnp.arange(V) < vocab_size)[None, :]  # padded vocabulary entries get probability 0

    def one_chunk(grad_output_VxD, xs):
        h_cxD, t_c, w_c = xs
        logits_cxV = jnp.dot(h_cxD, output_VxD.T, preferred_element_type=jnp.float32)
        # On a CPU every pass over the [c, V] logits is bound by memory, so there are three reads and one write:
        # the max (straight from the matmul's output), the unnormalised softmax exp(logits - max), and its sum.
        # d logits = softmax - onehot = (unnormalised - sum * onehot) / sum: the one-hot is c entries written in
        # place, and the 1 / sum is applied to the [c, D] operand and result of the gradient matmuls, not to [c, V].
        max_cx1 = max_over_real_vocab(logits_cxV, vocab_size)
        unnormalised_cxV = jnp.where(is_real_1xV, jnp.exp(logits_cxV - max_cx1), 0.0)
        sum_cx1 = unnormalised_cxV.sum(axis=-1, keepdims=True)
        target_logit_c = jnp.take_along_axis(logits_cxV, t_c[:, None], axis=-1)[:, 0]
        losses_c = (max_cx1[:, 0] + jnp.log(sum_cx1[:, 0]) - target_logit_c) * w_c
        # The subtraction happens in float32 before any cast, so a confident prediction's small p - 1 keeps its
        # precision (a one-hot subtracted after a bfloat16 matmul would not).
        dlogits_times_sum_cxV = unnormalised_cxV.at[jnp.arange(chunk), t_c].add(-sum_cx1[:, 0])
        dlogits_times_sum_cxV = dlogits_times_sum_cxV.astype(output_VxD.dtype)
        scale_cx1 = w_c[:, None] / sum_cx1  # padding rows (weight 0) give nothing
        grad_h_cxD = jnp.dot(dlogits_times_sum_cxV, output_VxD, preferred_element_type=jnp.float32) * scale_cx1
        scaled_h_cxD = (h_cxD.astype(jnp.float32) * scale_cx1).astype(output_VxD.dtype)
        grad_output_VxD = grad_output_VxD + jnp.dot(dlogits_times_sum_cxV.T, scaled_h_cxD,
                                                    preferred_element_type=jnp.float32)
        return grad_output_VxD, (losses_c.sum(), grad_h_cxD)

    grad_output_VxD, (losses_C, grad_h_CxcxD) = jax.lax.scan(
        one_chunk, jnp.zeros((V, D), jnp.float32), (hidden_CxcxD, targets_Cxc, weights_Cxc))
    grad_hidden_MxD = grad_h_CxcxD.reshape(padded, D)[:M]
    return losses_C.sum(), (grad_hidden_MxD.astype(hidden_MxD.dtype), grad_output_VxD.astype(output_VxD.dtype),
                            targets_M)


def _fused_output_loss_bwd(vocab_size, chunk, residuals, g):
    grad_hidden_MxD, grad_output_VxD, targets_M = residuals
    zero_targets = np.zeros(targets_M.shape, jax.dtypes.float0)  # integer inputs get a symbolic zero gradient
    return grad_hidden_MxD * g, grad_output_VxD * g, zero_targets


fused_output_loss.defvjp(_fused_output_loss_fwd, _fused_output_loss_bwd)


def chunked_output_losses(hidden_MxD, output_VxD, targets_M, vocab_size: int, chunk: int):
    """[M] cross-entropy of logits = hidden @ output.T, `chunk` tokens at a time, forward only (evaluation): the
    [M, V] float32 logits are never stored whole, only one chunk's [c, V]."""
    M, D = hidden_MxD.shape
    chunk = min(chunk, M)
    padded = -(-M // chunk) * chunk
    hidden_CxcxD = jnp.pad(hidden_MxD, ((0, padded - M), (0, 0))).reshape(-1, chunk, D)
    targets_Cxc = jnp.pad(targets_M, (0, padded - M)).reshape(-1, chunk)

    is_real_1xV = (jnp.arange(output_VxD.shape[0]) < vocab_size)[None, :]

    def one_chunk(_, xs):
        h_cxD, t_c = xs
        logits_cxV = jnp.dot(h_cxD, output_VxD.T, preferred_element_type=jnp.float32)
        # Two reads of the [c, V] logits, as in the fused loss: the max, then the sum of exp(logits - max), which
        # XLA fuses into one reduction without writing the exponentials.
        max_cx1 = max_over_real_vocab(logits_cxV, vocab_size)
        sum_c = jnp.where(is_real_1xV, jnp.exp(logits_cxV - max_cx1), 0.0).sum(axis=-1)
        target_logit_c = jnp.take_along_axis(logits_cxV, t_c[:, None], axis=-1)[:, 0]
        return None, max_cx1[:, 0] + jnp.log(sum_c) - target_logit_c

    _, losses_Cxc = jax.lax.scan(one_chunk, None, (hidden_CxcxD, targets_Cxc))
    return losses_Cxc.reshape(padded)[:M]
