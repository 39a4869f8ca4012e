"""The GPT model: a decoder-only transformer with pre-LayerNorm blocks, in Flax linen.

    tokens [B, T] -> token embedding (+ positions) -> n_layer x Block -> LayerNorm -> logits [B, T, V]
    Block:  x = x + Attention(LayerNorm(x));  x = x + MLP(LayerNorm(x))

The defaults are the seed's design: fixed sinusoidal positions (Vaswani et al. 2017), a one-hidden-layer ReLU MLP and
multi-head scaled dot-product causal attention. Variations are switches of the same modules: learned positions +
tanh-GELU + biases + tied output is exactly GPT-2's layout; `pos_embedding='rope'` rotates queries and keys instead.

Shapes in names and comments use B = batch, T = query length, S = key length, D = d_model, N = heads,
H = head size (D / N), F = d_ff, V = padded vocabulary.

This file is the textbook path. On a CPU, training runs attention through a kernel that computes the same numbers
faster (gptjax/kernels/attention.py, chosen in gptjax/kernels/__init__.py).
"""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gptjax import kernels
from gptjax.errors import UserError

POS_EMBEDDINGS = ("sinusoidal", "learned", "rope")
ATTENTIONS = ("auto", "xla", "chunked")
ACTIVATIONS = {
    "relu": nn.relu,
    # GPT-2 uses the tanh approximation; it is also the only GELU that jax-metal runs.
    "gelu": functools.partial(nn.gelu, approximate=True),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@struct.dataclass
class ModelConfig:
    """The model's hyper-parameters: frozen and hashable, so it can be a static argument of a jitted function."""

    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    max_len: int = 256  # context window in tokens
    n_layer: int = 8
    n_head: int = 8
    d_model: int = 256
    d_ff: int = 1024
    pos_embedding: str = "sinusoidal"
    activation: str = "relu"
    use_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters are always float32
    layer_norm_eps: float = 1e-5
    vocab_multiple: int = 64  # the embedding table is padded up to a multiple of this (50257 -> 50304) for speed
    rope_base: float = 10000.0
    attention: str = "auto"  # kernel for whole-sequence attention (training, evaluation); all give the same numbers

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any]) -> "ModelConfig":
        """Builds and checks a ModelConfig from the experiment config's `model` group (a ConfigDict or dict)."""
        fields = dict(model_config)
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"unknown model config key(s) {unknown}; valid keys are {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**fields)
        checks = [
            (cfg.d_model % cfg.n_head == 0,
             f"model.d_model={cfg.d_model} is not divisible by model.n_head={cfg.n_head}; "
             f"pick n_head among the divisors of d_model"),
            (cfg.pos_embedding in POS_EMBEDDINGS,
             f"model.pos_embedding={cfg.pos_embedding!r} is not one of {POS_EMBEDDINGS}"),
            (cfg.activation in ACTIVATIONS,
             f"model.activation={cfg.activation!r} is not one of {tuple(ACTIVATIONS)}"),
            (cfg.dtype in DTYPES, f"model.dtype={cfg.dtype!r} is not one of {tuple(DTYPES)}"),
            (cfg.attention in ATTENTIONS, f"model.attention={cfg.attention!r} is not one of {ATTENTIONS}"),
            (min(cfg.vocab_size, cfg.max_len, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_ff, cfg.vocab_multiple) > 0,
             "model sizes (vocab_size, max_len, n_layer, n_head, d_model, d_ff, vocab_multiple) must be positive"),
            (0.0 <= cfg.dropout < 1.0, f"model.dropout={cfg.dropout} must be in [0, 1)"),
            (cfg.pos_embedding != "rope" or cfg.head_dim % 2 == 0,
             f"rope needs an even head size, but d_model / n_head = {cfg.head_dim}"),
            (cfg.pos_embedding != "sinusoidal" or cfg.d_model % 2 == 0,
             f"sinusoidal positions need an even d_model, got {cfg.d_model}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return cfg


# ----------------------------------------------------------------------------------------------------------------
# Positions


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """The fixed table of Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same)."""
    position_Tx1 = np.arange(max_len, dtype=np.float64)[:, None]
    inv_freq_half = 1.0 / 10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    angle_TxHalf = position_Tx1 * inv_freq_half[None, :]
    table_TxD = np.zeros((max_len, d_model), dtype=np.float32)
    table_TxD[:, 0::2] = np.sin(angle_TxHalf)
    table_TxD[:, 1::2] = np.cos(angle_TxHalf)
    return table_TxD


def apply_rope(x_BxTxNxH: jax.Array, positions_T: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), 'rotate half' form: pairs are (x[i], x[i + H/2])."""
    half = x_BxTxNxH.shape[-1] // 2
    inv_freq = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle_TxHalf = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.cos(angle_TxHalf)[None, :, None, :]  # [1, T, 1, H/2]
    sin = jnp.sin(angle_TxHalf)[None, :, None, :]
    x1, x2 = x_BxTxNxH[..., :half].astype(jnp.float32), x_BxTxNxH[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Modules


def dense(config: ModelConfig, features: int, name: str, residual: bool = False) -> nn.Dense:
    """A Dense layer with GPT-2's initialisation: N(0, 0.02), and 0.02 / sqrt(2 n_layer) into the residual stream."""
    std = 0.02 / np.sqrt(2 * config.n_layer) if residual else 0.02
    return nn.Dense(features, use_bias=config.use_bias, dtype=config.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(std), name=name)


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_bias=config.use_bias, dtype=config.compute_dtype,
                        param_dtype=jnp.float32, name=name)


def causal_mask(query_positions_T: jax.Array, key_length: int) -> jax.Array:
    """[1, 1, T, S] boolean: a query at absolute position p may attend to keys at positions 0..p."""
    return (jnp.arange(key_length)[None, :] <= query_positions_T[:, None])[None, None]


def attention_scores(q_BxNxTxH, k_BxNxSxH, query_positions_T: jax.Array) -> jax.Array:
    """float32 [B, N, T, S]: q.k / sqrt(H) for every query and key (heads-major inputs), with the future set to the
    most negative float: keys sit at positions 0..S-1, queries at `query_positions_T`."""
    S, H = k_BxNxSxH.shape[2], q_BxNxTxH.shape[-1]
    scores_BxNxTxS = jnp.einsum("bnth,bnsh->bnts", q_BxNxTxH, k_BxNxSxH,
                                preferred_element_type=jnp.float32) / np.sqrt(H)
    return jnp.where(causal_mask(query_positions_T, S), scores_BxNxTxS, jnp.finfo(jnp.float32).min)


def cached_attention(q_BxTxNxH, k_BxNxSxH, v_BxNxSxH, positions_T) -> jax.Array:
    """T new queries at absolute `positions_T` attend over a KV cache of S slots; empty future slots are masked."""
    scores_BxNxTxS = attention_scores(jnp.swapaxes(q_BxTxNxH, 1, 2), k_BxNxSxH, positions_T)
    probs_BxNxTxS = jax.nn.softmax(scores_BxNxTxS, axis=-1).astype(v_BxNxSxH.dtype)
    return jnp.einsum("bnts,bnsh->btnh", probs_BxNxTxS, v_BxNxSxH)


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention where each position sees only itself and the past.

    With `decode=True` it keeps the keys and values of earlier calls in a preallocated cache (collection 'cache',
    [B, N, max_len, H] per layer), so sampling processes the prompt once and then one new token per step.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, *, decode: bool = False):
        cfg = self.config
        B, T, D = x_BxTxD.shape
        N, H = cfg.n_head, cfg.head_dim
        qkv_BxTx3D = dense(cfg, 3 * D, "qkv")(x_BxTxD)  # one matmul for queries, keys and values, as GPT-2's c_attn
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = (a.reshape(B, T, N, H) for a in jnp.split(qkv_BxTx3D, 3, axis=-1))
        if cfg.pos_embedding == "rope":
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_T, cfg.rope_base)
            k_BxTxNxH = apply_rope(k_BxTxNxH, positions_T, cfg.rope_base)

        has_cache = decode and self.has_variable("cache", "key")  # False in `init`, which creates the cache
        if decode:
            # The cache is heads-major, [B, N, max_len, H]: the attention dots read it as it is, where a
            # [B, max_len, N, H] cache would be transposed whole at every decoding step.
            shape, dtype = (B, N, cfg.max_len, H), k_BxTxNxH.dtype
            cached_key = self.variable("cache", "key", jnp.zeros, shape, dtype)
            cached_value = self.variable("cache", "value", jnp.zeros, shape, dtype)
        if has_cache:
            # Write this call's keys/values at their absolute positions, then attend over the whole cache.
            # The start is clamped here because jax-metal does not clamp dynamic_update_slice as XLA does;
            # gptjax.sampling never asks to write past the window.
            start = jnp.clip(positions_T[0], 0, cfg.max_len - T)
            cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, jnp.swapaxes(k_BxTxNxH, 1, 2),
                                                            (0, 0, start, 0))
            cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, jnp.swapaxes(v_BxTxNxH, 1, 2),
                                                              (0, 0, start, 0))
            y_BxTxNxH = cached_attention(q_BxTxNxH, cached_key.value, cached_value.value, positions_T)
        else:
            if kernels.attention_kernel(cfg.attention) == "xla":
                y_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True)
            else:  # the same numbers, faster on a CPU: see gptjax/kernels/attention.py
                y_BxTxNxH = kernels.chunked_causal_attention(
                    q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kernels.sequences_per_attention_chunk(B, N, T), query_block=64)

        return dense(cfg, D, "proj", residual=True)(y_BxTxNxH.reshape(B, T, D))


class MLP(nn.Module):
    """d_model -> d_ff -> d_model with one nonlinearity (ReLU by default, tanh-GELU for GPT-2)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        h_BxTxF = ACTIVATIONS[cfg.activation](dense(cfg, cfg.d_ff, "fc")(x_BxTxD))
        return dense(cfg, cfg.d_model, "proj", residual=True)(h_BxTxF)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: each sub-layer reads a normalised copy and adds its output back."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, *, deterministic: bool = True, decode: bool = False):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        attention = CausalSelfAttention(cfg, name="attn")
        x_BxTxD = x_BxTxD + dropout(attention(layer_norm(cfg, "ln_1")(x_BxTxD), positions_T, decode=decode))
        x_BxTxD = x_BxTxD + dropout(MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(x_BxTxD)))
        return x_BxTxD


class GPT(nn.Module):
    """The decoder-only language model.

    `GPT(cfg).apply({'params': params}, tokens_BxT)` returns float32 logits [B, T, padded_vocab_size]; the padding
    entries (ids >= vocab_size) are set to a huge negative number, so they never win a softmax or an argmax.
    `positions_T` defaults to 0..T-1; the sampler passes the absolute positions of the tokens it feeds.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.token_embedding = nn.Embed(cfg.padded_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                        param_dtype=jnp.float32, embedding_init=nn.initializers.normal(0.02))
        if cfg.pos_embedding == "learned":
            self.position_embedding = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                                               param_dtype=jnp.float32, embedding_init=nn.initializers.normal(0.01))
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.blocks = [Block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = layer_norm(cfg, "ln_f")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(cfg.padded_vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                    param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02))

    def __call__(self, tokens_BxT, positions_T=None, *, deterministic: bool = True, decode: bool = False):
        hidden_BxTxD = self.hidden_states(tokens_BxT, positions_T, deterministic=deterministic, decode=decode)
        return self.output_logits(hidden_BxTxD)

    def hidden_states(self, tokens_BxT, positions_T=None, *, deterministic: bool = True, decode: bool = False):
        """Everything up to and including the final LayerNorm: [B, T] int -> [B, T, D]."""
        cfg = self.config
        if positions_T is None:
            positions_T = jnp.arange(tokens_BxT.shape[1])
        x_BxTxD = self.token_embedding(tokens_BxT)
        if cfg.pos_embedding == "sinusoidal":
            # Vaswani et al. scale the embeddings by sqrt(D) so the fixed table does not drown them out.
            table_TxD = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model))[positions_T]
            x_BxTxD = x_BxTxD * np.sqrt(cfg.d_model) + table_TxD.astype(x_BxTxD.dtype)[None]
        elif cfg.pos_embedding == "learned":
            x_BxTxD = x_BxTxD + self.position_embedding(positions_T)[None]
        x_BxTxD = self.embedding_dropout(x_BxTxD, deterministic=deterministic)
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD, positions_T, deterministic=deterministic, decode=decode)
        return self.ln_f(x_BxTxD)

    def output_logits(self, hidden_BxTxD):
        """[B, T, D] -> float32 logits [B, T, V], padded vocabulary entries masked out."""
        cfg = self.config
        if cfg.tie_embeddings:
            logits_BxTxV = self.token_embedding.attend(hidden_BxTxD)
        else:
            logits_BxTxV = self.lm_head(hidden_BxTxD)
        return mask_padded_vocab(logits_BxTxV.astype(jnp.float32), cfg.vocab_size)


def mask_padded_vocab(logits_xV: jax.Array, vocab_size: int) -> jax.Array:
    """Sets logits of the padding ids (>= vocab_size) to the most negative float, so their probability is 0."""
    is_real = jnp.arange(logits_xV.shape[-1]) < vocab_size
    return jnp.where(is_real, logits_xV, jnp.finfo(logits_xV.dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# Counting


def count_params(params) -> int:
    """Number of scalars in a parameter tree (a tied embedding is one array, so it counts once)."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def param_count(cfg: ModelConfig) -> int:
    """The same count as `count_params(GPT(cfg).init(...))`, from the config alone (used for sizing runs)."""
    D, F, L, V = cfg.d_model, cfg.d_ff, cfg.n_layer, cfg.padded_vocab_size
    bias = 1 if cfg.use_bias else 0
    layer_norm_params = D * (1 + bias)
    per_block = (D * 3 * D + bias * 3 * D) + (D * D + bias * D)  # attention: qkv + output projection
    per_block += (D * F + bias * F) + (F * D + bias * D)  # MLP
    per_block += 2 * layer_norm_params
    total = L * per_block + layer_norm_params + V * D  # blocks, final LayerNorm, token embedding
    if cfg.pos_embedding == "learned":
        total += cfg.max_len * D
    if not cfg.tie_embeddings:
        total += D * V
    return total


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token, forward + backward: 6 N + 12 L T D (PaLM appendix B, as nanoGPT's MFU).

    N counts the parameters that take part in matmuls: table lookups (learned positions, and the input embedding
    when it is not tied to the output layer) are left out.
    """
    n_matmul = param_count(cfg)
    if cfg.pos_embedding == "learned":
        n_matmul -= cfg.max_len * cfg.d_model
    if not cfg.tie_embeddings:
        n_matmul -= cfg.padded_vocab_size * cfg.d_model
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.max_len * cfg.d_model
