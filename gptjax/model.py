"""The GPT model: a decoder-only transformer with pre-LayerNorm blocks, in Flax linen.

    tokens [B, T] -> token embedding (+ positions) -> n_layer x Block -> LayerNorm -> logits [B, T, V]
    Block:  x = x + Attention(LayerNorm(x));  x = x + MLP(LayerNorm(x))

The defaults are the seed's design: fixed sinusoidal positions (Vaswani et al. 2017), a one-hidden-layer ReLU MLP and
multi-head scaled dot-product causal attention. Variations are switches of the same modules: learned positions +
tanh-GELU + biases + tied output is exactly GPT-2's layout; `pos_embedding='rope'` rotates queries and keys instead.

Shape legend, used in names (`x_BxTxD`) and comments across gptjax:
    B  batch rows (sequences)             T  tokens per row (query length)      T1  T + 1 (inputs plus next target)
    S  key positions (cache slots)        D  d_model                            N   attention heads (only heads)
    H  head size, D / N                   F  d_ff, the MLP's hidden width       V   padded vocabulary size
    A  micro-batches in one step          b  rows per device (B / devices)      P   prompt length
    L  sample buffer (prompt + new)       Q  queries in an attention block      M   tokens of a flattened batch (B T)
    C  chunks of c tokens                 Half  H / 2 (RoPE) or D / 2 (the sinusoidal table)
    BN B x N in one axis (KV cache rows)  1  a dimension of size 1
    a leading x (`logits_xV`, `q_xTxH`): any leading dimensions

This file is the textbook path. Where a backend has a faster way to compute the same numbers (attention on a CPU),
the model calls the textbook function by name through one call in gptjax/kernels, which decides where it runs.
"""

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptjax import kernels

POS_EMBEDDINGS = ("sinusoidal", "learned", "rope")
ATTENTIONS = ("auto", "xla", "chunked", "cudnn")
ACTIVATIONS = {
    "relu": nn.relu,
    # GPT-2 uses the tanh approximation; it is also the only GELU that jax-metal runs.
    "gelu": functools.partial(nn.gelu, approximate=True),
    # The exact x * Phi(x) (erf), Hugging Face's activation_function='gelu': for converted models that use it.
    "gelu_exact": functools.partial(nn.gelu, approximate=False),
}
# No float16: its 5-bit exponent underflows small gradients unless the loss is scaled, which gptjax does not do.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a rematerialised block keeps from its forward pass for the backward pass; the rest is recomputed.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}


@struct.dataclass
class ModelConfig:
    """The model's hyper-parameters: frozen and hashable, so it can be a static argument of a jitted function.
    Build one from an experiment config with `gptjax.configs.build_model_config`, which checks the values."""

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
    scan_layers: bool = False  # one Block run n_layer times by nn.scan, parameters stacked [n_layer, ...]
    remat: str = "none"  # recompute each block's activations in the backward pass: 'none', 'full', 'dots_saveable'

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


# ----------------------------------------------------------------------------------------------------------------
# Positions


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """The fixed table of Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same)."""
    position_Tx1 = np.arange(max_len, dtype=np.float64)[:, None]
    inv_freq_Half = 1.0 / 10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    angle_TxHalf = position_Tx1 * inv_freq_Half[None, :]
    table_TxD = np.zeros((max_len, d_model), dtype=np.float32)
    table_TxD[:, 0::2] = np.sin(angle_TxHalf)
    table_TxD[:, 1::2] = np.cos(angle_TxHalf)
    return table_TxD


def apply_rope(x_BxTxNxH: jax.Array, positions_T: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), 'rotate half' form: pairs are (x[i], x[i + H/2])."""
    half = x_BxTxNxH.shape[-1] // 2
    inv_freq_Half = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle_TxHalf = positions_T.astype(jnp.float32)[:, None] * inv_freq_Half[None, :]
    cos, sin = jnp.cos(angle_TxHalf)[None, :, None, :], jnp.sin(angle_TxHalf)[None, :, None, :]  # [1, T, 1, Half]
    x1, x2 = x_BxTxNxH[..., :half].astype(jnp.float32), x_BxTxNxH[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxNxH.dtype)


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


# The mesh axis that activations are split along by their batch rows, while a step that asks for it is traced
# (`activations_split_along`); None everywhere else.
_BATCH_AXIS: contextvars.ContextVar = contextvars.ContextVar("gptjax_batch_axis", default=None)


@contextlib.contextmanager
def activations_split_along(mesh: Mesh, axis: str):
    """While a step is traced in this block, every activation the model marks (`batch_sharded`) is split along its
    batch rows over the mesh's `axis`: fsdp's step (gptjax/train_step.py)."""
    token = _BATCH_AXIS.set((mesh, axis))
    try:
        yield
    finally:
        _BATCH_AXIS.reset(token)


def batch_sharded(x_Bx: jax.Array) -> jax.Array:
    """`x` [B, ...] kept split along its batch rows where a step asks for it (`activations_split_along`), so each
    device holds its own rows' activations and XLA brings the (fsdp-split) weights to them: ZeRO-3. Left to itself,
    XLA's partitioner chose other layouts for them as the batch grew. Everywhere else (one device, shard_map,
    sampling) a no-op. Flax's `nn.with_logical_constraint` does this by name, but needs a mesh context that JAX's
    current releases no longer allow inside jit and its older ones set another way."""
    return split_over_devices(x_Bx, 0)


def vocab_sharded(logits_xV: jax.Array) -> jax.Array:
    """Logits [..., V] split along the vocabulary where a step asks for it, as fsdp splits the (tied) embedding that
    computes them: each device multiplies the gathered hidden states by its own rows of the table, and no device
    gathers the whole table or holds its whole gradient."""
    return split_over_devices(logits_xV, logits_xV.ndim - 1)


def split_over_devices(x: jax.Array, dim: int) -> jax.Array:
    split = _BATCH_AXIS.get()
    if split is None:
        return x
    mesh, axis = split
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*[axis if d == dim else None
                                                                                   for d in range(x.ndim)])))


def on_each_devices_rows(fn, *arrays_Bx):
    """`fn(*arrays)` for a function of whole sequences (attention): where a step splits activations along the batch
    (`activations_split_along`), each device runs it on its own rows (`jax.shard_map`), as a one-device step would;
    left to XLA's partitioner, a kernel that loops over groups of sequences (the CPU's) gathered them from every
    device. Elsewhere, `fn(*arrays)`."""
    split = _BATCH_AXIS.get()
    if split is None:
        return fn(*arrays_Bx)
    mesh, axis = split
    return jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(axis), out_specs=PartitionSpec(axis),
                         check_vma=False)(*arrays_Bx)


def attention_scores(q_xTxH, k_xSxH, query_positions_T: jax.Array) -> jax.Array:
    """float32 [..., T, S]: q.k / sqrt(H) for queries at `query_positions_T` and keys at 0..S-1, the causal mask
    setting a key after its query to the most negative float. Heads-major inputs: the leading axes ([B, N], or the
    KV cache's [BN]) are the same in both."""
    S, H = k_xSxH.shape[-2], q_xTxH.shape[-1]
    scores_xTxS = jnp.einsum("...th,...sh->...ts", q_xTxH, k_xSxH, preferred_element_type=jnp.float32) / np.sqrt(H)
    causal_mask_TxS = jnp.arange(S)[None, :] <= query_positions_T[:, None]
    return jnp.where(causal_mask_TxS, scores_xTxS, jnp.finfo(jnp.float32).min)


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention where each position sees only itself and the past.

    With `decode=True` it keeps the keys and values of earlier calls in a preallocated cache (collection 'cache',
    [BN, max_len, H] per layer), so sampling processes the prompt once and then one new token per step.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, *, decode: bool = False):
        cfg = self.config
        B, T, D = x_BxTxD.shape
        qkv_BxTx3D = batch_sharded(dense(cfg, 3 * D, "qkv")(x_BxTxD))  # queries, keys and values: GPT-2's c_attn
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = (batch_sharded(a.reshape(B, T, cfg.n_head, cfg.head_dim))
                                           for a in jnp.split(qkv_BxTx3D, 3, axis=-1))
        if cfg.pos_embedding == "rope":
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_T, cfg.rope_base)
            k_BxTxNxH = apply_rope(k_BxTxNxH, positions_T, cfg.rope_base)

        if decode:
            y_BxTxNxH = self.cached_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, positions_T)
        else:
            # jax.nn.dot_product_attention, or a kernel computing the same numbers faster on this backend (on CPUs:
            # gptjax/kernels/attention.py). Each query sees keys at its own position and before: softmax(q.k /
            # sqrt(H)) over them, then the average of their values, as `cached_attention` spells out below.
            dot_product_attention = functools.partial(kernels.dot_product_attention(cfg.attention), is_causal=True)
            y_BxTxNxH = on_each_devices_rows(dot_product_attention, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH)
        return dense(cfg, D, "proj", residual=True)(y_BxTxNxH.reshape(B, T, D))

    def cached_attention(self, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, positions_T):
        """Writes this call's keys and values into the cache at their absolute positions, then lets the T new queries
        attend over all S = max_len slots; slots after a query (still empty) are masked."""
        B, T, N, H = k_BxTxNxH.shape
        # One cache row per (sequence, head) pair, [BN, S, H]. Heads-major, so the attention dots read it as it is (a
        # [B, S, N, H] cache would be transposed whole at every decoding step); and one axis for B and N, because at
        # batch 1 XLA's CPU compiler copied a [B, N, S, H] cache four times per step (decoding 1.2x slower, measured).
        key = self.variable("cache", "key", jnp.zeros, (B * N, self.config.max_len, H), k_BxTxNxH.dtype)
        value = self.variable("cache", "value", jnp.zeros, (B * N, self.config.max_len, H), v_BxTxNxH.dtype)

        def cache_rows(x_BxTxNxH):  # [B, T, N, H] -> [BN, T, H]
            return jnp.swapaxes(x_BxTxNxH, 1, 2).reshape(B * N, T, H)

        if not self.is_initializing():  # `init` only creates the (empty) cache
            # Clamped because jax-metal does not clamp dynamic_update_slice as XLA does; gptjax.sampling never asks
            # to write past the window.
            start = jnp.clip(positions_T[0], 0, self.config.max_len - T)
            key.value = jax.lax.dynamic_update_slice(key.value, cache_rows(k_BxTxNxH), (0, start, 0))
            value.value = jax.lax.dynamic_update_slice(value.value, cache_rows(v_BxTxNxH), (0, start, 0))
        scores_BNxTxS = attention_scores(cache_rows(q_BxTxNxH), key.value, positions_T)
        probs_BNxTxS = jax.nn.softmax(scores_BNxTxS, axis=-1).astype(value.value.dtype)
        y_BNxTxH = jnp.einsum("...ts,...sh->...th", probs_BNxTxS, value.value)
        return jnp.swapaxes(y_BNxTxH.reshape(B, N, T, H), 1, 2)


class MLP(nn.Module):
    """d_model -> d_ff -> d_model with one nonlinearity (ReLU by default, tanh-GELU for GPT-2)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        h_BxTxF = batch_sharded(ACTIVATIONS[cfg.activation](dense(cfg, cfg.d_ff, "fc")(x_BxTxD)))
        return dense(cfg, cfg.d_model, "proj", residual=True)(h_BxTxF)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: each sub-layer reads a normalised copy and adds its output back."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, deterministic: bool = True, decode: bool = False):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        attention = CausalSelfAttention(cfg, name="attn")
        x_BxTxD = x_BxTxD + dropout(attention(layer_norm(cfg, "ln_1")(x_BxTxD), positions_T, decode=decode))
        x_BxTxD = x_BxTxD + dropout(MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(x_BxTxD)))
        return batch_sharded(x_BxTxD)


class GPT(nn.Module):
    """The decoder-only language model.

    `GPT(cfg).apply({'params': params}, tokens_BxT)` returns float32 logits [B, T, V]; the padding entries
    (ids >= vocab_size) are set to the most negative float, so they never win a softmax or an argmax.
    `positions_T` defaults to 0..T-1; the sampler passes the absolute positions of the tokens it feeds.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        # With the fixed sinusoidal table, Vaswani et al.'s recipe: embeddings drawn N(0, 1/D), multiplied by sqrt(D)
        # on the way in (hidden_states). Token vectors then enter with RMS 1 beside the table's 0.71, and the tied
        # output layer still sees N(0, 1/D) weights (logits of std ~1 at init). Learned and rotary positions keep
        # GPT-2's N(0, 0.02) and no multiplier. Measured against the alternatives: docs/performance.md, "Embedding
        # scale".
        embedding_std = cfg.d_model ** -0.5 if cfg.pos_embedding == "sinusoidal" else 0.02
        self.token_embedding = nn.Embed(cfg.padded_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                        param_dtype=jnp.float32, embedding_init=nn.initializers.normal(embedding_std))
        if cfg.pos_embedding == "learned":
            self.position_embedding = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                                               param_dtype=jnp.float32, embedding_init=nn.initializers.normal(0.01))
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        block = Block  # or, for deep models, the same block trading compute for memory (and one compiled copy):
        if cfg.remat != "none":  # (self, x, positions, deterministic, decode): the mode switches are static
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3, 4))
        self.blocks = block(cfg, name="blocks") if cfg.scan_layers else [block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = layer_norm(cfg, "ln_f")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(cfg.padded_vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                    param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                                    dot_general=float32_accumulating_dot)

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
            # sqrt(D) x N(0, 1/D) token vectors (RMS 1) + the fixed table (RMS 0.71): neither drowns the other.
            table_TxD = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model))[positions_T]
            x_BxTxD = x_BxTxD * np.sqrt(cfg.d_model) + table_TxD.astype(x_BxTxD.dtype)[None]
        elif cfg.pos_embedding == "learned":
            x_BxTxD = x_BxTxD + self.position_embedding(positions_T)[None]
        x_BxTxD = batch_sharded(self.embedding_dropout(x_BxTxD, deterministic=deterministic))
        if cfg.scan_layers:
            x_BxTxD = scan_blocks(self.blocks, x_BxTxD, positions_T, deterministic, decode, cfg.n_layer)
        else:
            for block in self.blocks:
                x_BxTxD = block(x_BxTxD, positions_T, deterministic, decode)
        return batch_sharded(self.ln_f(x_BxTxD))

    def output_logits(self, hidden_BxTxD):
        """[B, T, D] -> float32 logits [B, T, V], padded vocabulary entries masked out. The matmul reads its inputs
        in the compute dtype and sums in float32 on every path, as the fused loss does (a bfloat16 sum over D
        would round every logit to 8 bits before the softmax)."""
        if self.config.tie_embeddings:
            embedding_VxD = self.token_embedding.embedding.astype(self.config.compute_dtype)
            logits_BxTxV = jnp.einsum("btd,vd->btv", hidden_BxTxD.astype(self.config.compute_dtype), embedding_VxD,
                                      preferred_element_type=jnp.float32)
        else:
            logits_BxTxV = self.lm_head(hidden_BxTxD)
        return vocab_sharded(mask_padded_vocab(logits_BxTxV, self.config.vocab_size))


@functools.partial(jax.jit, static_argnums=0)  # cfg is hashable (frozen): each shape compiles its own init
def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters from `key`, the same numbers in either layout: with scan_layers the unrolled model's blocks
    are initialised and stacked (nn.scan would draw each layer's from keys split another way).

    Jitted because `init` runs the model once to see the shapes: run eagerly, that forward pass is ~100 small
    programs compiled one by one (seconds on a CPU); compiled as one program, the unused forward pass is dropped and
    only the initialisers run (XLA may fuse their scaling: equal to the eager numbers to within a float32 ulp)."""
    tokens_1xT = jnp.zeros((1, cfg.max_len), jnp.int32)
    params = GPT(cfg.replace(scan_layers=False)).init(key, tokens_1xT)["params"]
    return stack_blocks(params, cfg.n_layer) if cfg.scan_layers else params


def stack_blocks(params: dict, n_layer: int) -> dict:
    """blocks_0 .. blocks_{n_layer - 1} as one 'blocks' tree whose arrays have a leading [n_layer] axis: the layout
    of model.scan_layers=true."""
    rest = {name: tree for name, tree in params.items() if not name.startswith("blocks_")}
    layers = [params[f"blocks_{i}"] for i in range(n_layer)]
    return {**rest, "blocks": jax.tree.map(lambda *arrays: jnp.stack(arrays), *layers)}


def unstack_blocks(params: dict, n_layer: int) -> dict:
    """`stack_blocks` undone: one blocks_i tree per layer, as model.scan_layers=false has them."""
    rest = {name: tree for name, tree in params.items() if name != "blocks"}
    return {**rest, **{f"blocks_{i}": jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(n_layer)}}


def scan_blocks(block: Block, x_BxTxD, positions_T, deterministic: bool, decode: bool, n_layer: int):
    """`block` applied n_layer times, each time with the next slice of its stacked parameters (and KV cache): a
    `lax.scan`, so the step compiles one block instead of n_layer copies."""

    def one_layer(block, x_BxTxD, positions_T, deterministic, decode):
        return block(x_BxTxD, positions_T, deterministic, decode), None

    layers = nn.scan(one_layer, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=n_layer)
    return layers(block, x_BxTxD, positions_T, deterministic, decode)[0]


def float32_accumulating_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` summing in float32 whatever its inputs' dtype: the untied output layer's matmul."""
    del preferred_element_type
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)


def mask_padded_vocab(logits_xV: jax.Array, vocab_size: int) -> jax.Array:
    """Sets logits of the padding ids (>= vocab_size) to the most negative float, so their probability is 0."""
    is_real_V = jnp.arange(logits_xV.shape[-1]) < vocab_size
    return jnp.where(is_real_V, logits_xV, jnp.finfo(logits_xV.dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# Counting


def count_params(params) -> int:
    """Number of scalars in a parameter tree (a tied embedding is one array, so it counts once)."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
