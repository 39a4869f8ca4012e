"""Speed kernels, apart from the textbook code so that gptjax/model.py, train_step.py and sampling.py read as what
they compute. Each kernel computes exactly what a textbook function computes, rearranged for a backend's memory
(tests/test_kernels.py and tests/test_sampling.py compare values and gradients); the reader's file names the textbook
function and reaches the kernel through one call here, and this is the one place that decides where each runs:

- `dot_product_attention`: `jax.nn.dot_product_attention` itself, except on CPUs (`attention.chunked_causal_attention`)
  and where cuDNN's fused kernel is asked for (`model.attention='cudnn'`: not yet measured against XLA's kernel).
- `output_loss.fused_output_loss`, for the full logits + cross-entropy of `gptjax.train_step.next_token_loss`:
  on CPUs; `output_loss.chunked_output_losses`, its forward half, for `gptjax.train_step.eval_step` where the
  training step uses it. Never measured on Apple's Metal GPU, so the textbook paths run there until it is.
- `decoding.argmax` for `jnp.argmax` on CPUs, and `decoding.output_head` / `head_logits` for `GPT.output_logits`
  in the decoding loop on every backend (the output layer laid out once per `generate` for one-row matmuls).
"""

import jax

from gptjax.kernels.attention import chunked_causal_attention, sequences_per_attention_chunk
from gptjax.kernels.decoding import HEAD_DTYPES, argmax, first_argmax, head_logits, output_head
from gptjax.kernels.output_loss import chunked_output_losses, fused_output_loss

__all__ = ["HEAD_DTYPES", "argmax", "attention_kernel", "causal_attention_for_cpu", "chunked_causal_attention",
           "chunked_output_losses", "cudnn_causal_attention", "dot_product_attention", "eval_loss_chunk_tokens",
           "first_argmax", "fused_output_loss", "head_logits", "loss_chunk_tokens", "output_head",
           "sequences_per_attention_chunk"]


def on_cpu() -> bool:
    return jax.default_backend().lower() == "cpu"


def attention_kernel(configured: str) -> str:
    """model.attention with 'auto' resolved: 'chunked' on CPU, 'xla' (jax.nn.dot_product_attention) elsewhere
    ('cudnn' only when asked for: see the module docstring).

    Measured on a 2-core CPU at the m1 shape, forward + backward per layer: 93 ms (xla), 36 ms (chunked).
    """
    if configured != "auto":
        return configured
    return "chunked" if on_cpu() else "xla"


def dot_product_attention(configured: str):
    """The function gptjax/model.py calls as `dot_product_attention(q, k, v, is_causal=True)` for whole-sequence
    attention: `jax.nn.dot_product_attention`, or a kernel giving the same numbers (`attention_kernel` chooses)."""
    return {"xla": jax.nn.dot_product_attention, "cudnn": cudnn_causal_attention,
            "chunked": causal_attention_for_cpu}[attention_kernel(configured)]


def causal_attention_for_cpu(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal: bool = True):
    """`chunked_causal_attention` with the sizes measured best on a 2-core CPU at the m1 shape: as many sequences at
    a time as keep the scores within 4 MiB, blocks of 64 queries."""
    assert is_causal, "the chunked kernel computes causal attention only"
    B, T, N, _ = q_BxTxNxH.shape
    return chunked_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, sequences_per_attention_chunk(B, N, T), 64)


_cudnn_fallbacks_reported = set()


def cudnn_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal: bool = True):
    """`jax.nn.dot_product_attention(..., is_causal=True)` run by cuDNN's fused attention kernel where it can run (an
    NVIDIA GPU with cuDNN, bfloat16 or float16, a head size cuDNN supports); elsewhere XLA's kernel for the same
    function, after one printed line saying why. JAX decides while tracing, so the choice costs nothing per step."""
    try:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=is_causal,
                                            implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if reason not in _cudnn_fallbacks_reported:
            _cudnn_fallbacks_reported.add(reason)
            print(f"note     | model.attention='cudnn' cannot run here ({reason}): using XLA's attention instead "
                  f"(the same function)", flush=True)
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=is_causal)


def loss_chunk_tokens(configured: int) -> int:
    """train.loss_chunk_tokens with -1 resolved: the fused loss over chunks of 1024 tokens on CPU, else the plain one.

    Measured: m1 step on a 2-core CPU 821 -> 1131 tokens/s fused; on an H200 (bfloat16) 1.05M plain vs 0.93M fused.
    """
    if configured >= 0:
        return configured
    return 1024 if on_cpu() else 0


def eval_loss_chunk_tokens(configured: int) -> int:
    """The chunk of `chunked_output_losses` for evaluation: 256 tokens wherever training uses the fused loss, else
    the plain loss. Forward only, a smaller chunk keeps the [c, V] logits in cache.

    Measured on a 2-core CPU, tiny.py's model (6.8M parameters), batches of 16 x 128, taking turns with the train
    step (2,032 tokens/s): plain 2,483 tokens/s; chunks of 1024: 4,265; 512: 4,405; 256: 5,541; 128: 4,795.
    """
    return 256 if loss_chunk_tokens(configured) else 0
