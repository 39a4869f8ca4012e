"""Speed kernels, apart from the textbook model so that gptjax/model.py reads as the model and nothing else.

Each computes exactly what a textbook path computes, rearranged for a backend's memory (tests/test_kernels.py
compares values and gradients), and this is the one place that decides where each runs:

- `attention.chunked_causal_attention`, for `jax.nn.dot_product_attention(q, k, v, is_causal=True)`: on CPUs.
- cuDNN's fused (flash) attention, for the same call, on NVIDIA GPUs in bfloat16/float16: only when asked for
  (`model.attention='cudnn'`), as it has not been measured against XLA's kernel yet.
- `output_loss.fused_output_loss`, for the full logits + cross-entropy of `gptjax.train_step.next_token_loss`:
  on CPUs; `output_loss.chunked_output_losses`, its forward half, for `gptjax.train_step.eval_step` where the
  training step uses it. Never measured on Apple's Metal GPU, so the textbook paths run there until it is.
"""

import jax

from gptjax.kernels.attention import chunked_causal_attention, sequences_per_attention_chunk
from gptjax.kernels.output_loss import chunked_output_losses, fused_output_loss

__all__ = ["attention_kernel", "causal_attention_for_cpu", "chunked_causal_attention", "chunked_output_losses",
           "cudnn_causal_attention", "eval_loss_chunk_tokens", "fused_output_loss", "loss_chunk_tokens",
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


def causal_attention_for_cpu(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH):
    """`chunked_causal_attention` with the sizes measured best on a 2-core CPU at the m1 shape: as many sequences at
    a time as keep the scores within 4 MiB, blocks of 64 queries."""
    B, T, N, _ = q_BxTxNxH.shape
    return chunked_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, sequences_per_attention_chunk(B, N, T), 64)


_cudnn_fallbacks_reported = set()


def cudnn_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH):
    """`jax.nn.dot_product_attention(..., is_causal=True)` run by cuDNN's fused attention kernel where it can run (an
    NVIDIA GPU with cuDNN, bfloat16 or float16, a head size cuDNN supports); elsewhere XLA's kernel for the same
    function, after one printed line saying why. JAX decides while tracing, so the choice costs nothing per step."""
    try:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True, implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if reason not in _cudnn_fallbacks_reported:
            _cudnn_fallbacks_reported.add(reason)
            print(f"note     | model.attention='cudnn' cannot run here ({reason}): using XLA's attention instead "
                  f"(the same function)", flush=True)
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True)


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
