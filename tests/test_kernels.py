"""The speed kernels (gptjax/kernels/) against the textbook paths they replace, in value and gradient."""

import functools

import jax
import numpy as np
import pytest

from gptjax import train_step as steps_lib
from gptjax.kernels.attention import chunked_causal_attention, query_blocks, sequences_per_attention_chunk
from gptjax.kernels.output_loss import fused_output_loss, max_over_real_vocab
from gptjax.model import GPT, ModelConfig


@pytest.mark.parametrize("sequences_per_chunk,query_block", [(1, 4), (2, 4), (4, 4), (2, 12), (2, 5)])
def test_chunked_attention_equals_jax_attention_and_its_gradients(sequences_per_chunk, query_block):
    q, k, v, dy = (jax.random.normal(key, (4, 12, 3, 8)) for key in jax.random.split(jax.random.key(0), 4))

    def loss(attention, q, k, v):
        return (attention(q, k, v) * dy).sum()  # a random cotangent checks every output's gradient

    reference = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    chunked = functools.partial(chunked_causal_attention, sequences_per_chunk=sequences_per_chunk,
                                query_block=query_block)
    np.testing.assert_allclose(chunked(q, k, v), reference(q, k, v), atol=1e-5)
    for got, want in zip(jax.grad(loss, argnums=(1, 2, 3))(chunked, q, k, v),
                         jax.grad(loss, argnums=(1, 2, 3))(reference, q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_query_blocks_cover_the_sequence_once():
    assert query_blocks(256, 64) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert query_blocks(12, 5) == [(0, 12)]  # a block that does not divide T: one block
    assert query_blocks(12, 12) == [(0, 12)]


def test_attention_chunks_fit_the_cache_and_divide_the_batch():
    assert sequences_per_attention_chunk(B=16, N=8, T=256) == 2  # m1: one sequence's scores are 2 MiB
    assert sequences_per_attention_chunk(B=12, N=8, T=256, cache_bytes=8 << 20) == 4
    assert sequences_per_attention_chunk(B=7, N=8, T=256, cache_bytes=8 << 20) == 1
    assert sequences_per_attention_chunk(B=2, N=12, T=1024) == 1  # GPT-2: bigger than the budget, one at a time


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_fused_output_loss_equals_the_plain_loss_and_gradients(tie_embeddings):
    cfg = ModelConfig(max_len=16, n_layer=2, n_head=2, d_model=32, d_ff=64, tie_embeddings=tie_embeddings)
    model = GPT(cfg)
    params = model.init(jax.random.key(0), jax.numpy.zeros((1, 16), jax.numpy.int32))["params"]
    batch = jax.random.randint(jax.random.key(1), (3, 17), 0, 50257)
    plain_loss, plain_grads = jax.value_and_grad(steps_lib.next_token_loss)(params, batch, model, None, 0)
    for chunk in (7, 16, 1024):  # uneven (padded last chunk), even, and larger than the batch
        loss, grads = jax.value_and_grad(steps_lib.next_token_loss)(params, batch, model, None, chunk)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # float32 rounding, not a formula


@pytest.mark.parametrize("width, vocab_size", [(200, 1), (200, 100), (200, 128), (200, 150), (192, 190), (192, 192)])
def test_max_over_real_vocab_ignores_the_padded_columns(width, vocab_size):
    # Padded columns hold the largest values, so any leak of them into the max shows.
    logits = jax.random.normal(jax.random.key(0), (5, width)).at[:, vocab_size:].set(1e9)
    np.testing.assert_array_equal(max_over_real_vocab(logits, vocab_size)[:, 0],
                                  logits[:, :vocab_size].max(axis=-1))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-4), ("bfloat16", 1e-2)])
def test_fused_output_loss_keeps_the_small_gradients_of_confident_predictions(dtype, tolerance):
    M, D, V, vocab_size = 64, 32, 192, 190
    output_VxD = jax.random.normal(jax.random.key(1), (V, D)).astype(dtype)
    targets_M = jax.random.randint(jax.random.key(2), (M,), 0, vocab_size)
    # Hidden states close to 3x their target's output row: the target gets probability ~0.999, so p - 1 is small.
    hidden_MxD = (3 * output_VxD[targets_M].astype(np.float32)
                  + 0.1 * jax.random.normal(jax.random.key(0), (M, D))).astype(dtype)
    grad_h, grad_output = jax.grad(fused_output_loss, argnums=(0, 1))(
        hidden_MxD, output_VxD, targets_M, vocab_size, 16)
    # float64 reference from the same (rounded) inputs.
    h, out = np.asarray(hidden_MxD, np.float64), np.asarray(output_VxD, np.float64)
    logits = h @ out.T
    logits[:, vocab_size:] = -np.inf
    dlogits = np.exp(logits - logits.max(axis=1, keepdims=True))
    dlogits /= dlogits.sum(axis=1, keepdims=True)
    assert dlogits[np.arange(M), targets_M].min() > 0.99
    dlogits[np.arange(M), targets_M] -= 1
    for got, want in ((grad_h, dlogits @ out), (grad_output, dlogits.T @ h)):
        error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert error < tolerance


def test_the_kernel_scores_are_the_models_scores():
    from gptjax.kernels.attention import block_scores
    from gptjax.model import attention_scores

    q, k = (jax.random.normal(key, (2, 3, 12, 8)) for key in jax.random.split(jax.random.key(0), 2))
    for start, end in query_blocks(12, 4):
        np.testing.assert_array_equal(block_scores(q[:, :, start:end], k[:, :, :end], start),
                                      attention_scores(q[:, :, start:end], k[:, :, :end], jax.numpy.arange(start, end)))


def test_the_kernels_run_on_cpu_and_the_textbook_paths_elsewhere():
    from gptjax import kernels

    assert jax.default_backend() == "cpu"  # the test machines
    assert kernels.attention_kernel("auto") == "chunked" and kernels.loss_chunk_tokens(-1) == 1024
    assert kernels.attention_kernel("xla") == "xla" and kernels.loss_chunk_tokens(0) == 0  # asked for explicitly


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_plain_and_fused_losses_agree_in_bfloat16(tie_embeddings):
    # Both read the output layer in bfloat16 and sum its matmul in float32: the losses differ only by the order of
    # float32 additions. (Logits rounded to bfloat16, as Embed.attend gave them, measured 7e-5 to 1e-4 of the loss.)
    cfg = ModelConfig(max_len=16, n_layer=2, n_head=2, d_model=64, d_ff=128, tie_embeddings=tie_embeddings,
                      dtype="bfloat16")
    model = GPT(cfg)
    params = model.init(jax.random.key(0), jax.numpy.zeros((1, 16), jax.numpy.int32))["params"]
    params = jax.tree.map(lambda p: 8 * p, params)  # confident logits, where rounding them shows
    batch = jax.random.randint(jax.random.key(1), (8, 17), 0, 50257)
    plain = steps_lib.next_token_loss(params, batch, model, None, 0)
    fused = steps_lib.next_token_loss(params, batch, model, None, 64)
    assert abs(float(plain) - float(fused)) <= 1e-5 * abs(float(plain)), (plain, fused)


@pytest.mark.parametrize("tie_embeddings,dtype", [(True, "float32"), (False, "float32"), (True, "bfloat16")])
def test_chunked_evaluation_loss_equals_the_plain_one(tie_embeddings, dtype):
    """eval_step with the output layer in chunks (where training uses the fused loss) sums the same losses and
    tokens as with the full logits, padding rows (weight 0) included."""
    cfg = ModelConfig(max_len=16, n_layer=2, n_head=2, d_model=32, d_ff=64, tie_embeddings=tie_embeddings,
                      dtype=dtype)
    model = GPT(cfg)
    params = model.init(jax.random.key(0), jax.numpy.zeros((1, 16), jax.numpy.int32))["params"]
    params = jax.tree.map(lambda p: 4 * p, params)
    batch = jax.random.randint(jax.random.key(1), (4, 17), 0, 50257)
    weights = jax.numpy.array([1.0, 1.0, 1.0, 0.0])
    plain = jax.jit(functools.partial(steps_lib.eval_step, model=model))(params, batch, weights)
    for chunk in (7, 16, 1024):
        chunked = jax.jit(functools.partial(steps_lib.eval_step, model=model, loss_chunk=chunk))(params, batch, weights)
        assert float(chunked["tokens"]) == float(plain["tokens"]) == 48
        np.testing.assert_allclose(chunked["loss_sum"], plain["loss_sum"], rtol=1e-5)
