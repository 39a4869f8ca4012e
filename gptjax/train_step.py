"""The pure pieces of training: optimizer, loss, `train_step`, `eval_step`, and data-parallel compilation.

Nothing here touches files or the clock. `make_train_step` returns `train_step(state, batch) -> (state, metrics)`,
compiled once; on several devices it runs data-parallel: the batch is split over a 1-D device mesh ('data'), each
device runs the step on its rows (`shard_map`, the modern spelling of pmap) and one `pmean` in it averages the
gradients, once per step. Parameters and optimizer state are replicated, or with train.sharding='fsdp' split over
the devices (`state_sharding`) and the step compiled by plain jit with the activations pinned to the batch's split:
XLA gathers each parameter where it is used and reduce-scatters its gradient (`resolve_parallelism`).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptjax import kernels
from gptjax.model import GPT, ModelConfig, activations_split_along, init_params


@struct.dataclass
class TrainState:
    """Everything that changes during training, and nothing else: it is what checkpoints save."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: optax.OptState


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(train: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from learning_rate / warmup_steps to learning_rate, then cosine decay to min_lr_ratio x it."""
    warmup_steps = max(1, train.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=train.learning_rate / warmup_steps,  # not 0: step 0 already learns
        peak_value=train.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=train.learning_rate * train.min_lr_ratio)


def weight_decay_mask(params, decay_embeddings: bool = True):
    """True for weight matrices (Dense kernels, and embeddings unless excluded); False for biases and LayerNorm.

    Decided by name, not by ndim: with model.scan_layers a block's biases are stacked into [n_layer, F] arrays.
    """

    def decays(path, leaf):
        names = [getattr(key, "key", str(key)) for key in path]
        if any("embedding" in name for name in names):
            return decay_embeddings
        return names[-1] == "kernel"

    return jax.tree.map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the warmup + cosine schedule and decay on matrices only."""
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(train, total_steps), b1=train.b1, b2=train.b2,
                    weight_decay=train.weight_decay,
                    mask=functools.partial(weight_decay_mask, decay_embeddings=train.decay_embeddings)),
    )


def create_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh parameters from jax.random.key(seed) (the same in either layout) and a zero optimizer state."""
    params = init_params(model_config, jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


# ----------------------------------------------------------------------------------------------------------------
# Loss and steps


def next_token_loss(params, batch_BxT1, model: GPT, dropout_rng=None, loss_chunk: int = 0):
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1], in float32.

    loss_chunk = 0 computes the full [B, T, V] logits (the model masks the padded vocabulary entries).
    loss_chunk > 0 stops at the hidden states and uses the fused kernel (gptjax/kernels/output_loss.py) over chunks
    of that many tokens: same value and gradients, but the logits are never stored, faster on a CPU.
    """
    inputs_BxT, targets_BxT = batch_BxT1[:, :-1], batch_BxT1[:, 1:]
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    if not loss_chunk:
        logits_BxTxV = model.apply({"params": params}, inputs_BxT, deterministic=deterministic, rngs=rngs)
        losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
        return losses_BxT.mean()
    hidden_BxTxD = model.apply({"params": params}, inputs_BxT, deterministic=deterministic, rngs=rngs,
                               method=GPT.hidden_states)
    cfg = model.config
    hidden_MxD = hidden_BxTxD.reshape(-1, cfg.d_model)
    loss_sum = kernels.fused_output_loss(hidden_MxD, output_matrix(params, cfg).astype(cfg.compute_dtype),
                                         targets_BxT.reshape(-1), cfg.vocab_size, loss_chunk)
    return loss_sum / targets_BxT.size


def output_matrix(params, cfg) -> jax.Array:
    """[V, D] the output layer: the token embedding when tied, else the head's kernel transposed."""
    return params["token_embedding"]["embedding"] if cfg.tie_embeddings else params["lm_head"]["kernel"].T


def train_step(state: TrainState, batch_AxBxT1, *, model: GPT, optimizer: optax.GradientTransformation,
               dropout_rng, loss_chunk: int = 0, axis_name: str | None = None):
    """One optimizer step on A micro-batches of B sequences -> (new state, metrics). The whole of it:

    1. the gradient of each micro-batch's mean next-token loss, summed by `lax.scan`: memory holds one micro-batch's
       activations at a time, and A micro-batches give the gradient of one batch A times larger;
    2. with `axis_name`, where this function runs once per device on that device's rows of the batch (`shard_map`
       in `make_train_step`), one `pmean` averages the gradients over the devices: data parallelism's all-reduce,
       once per step and not once per micro-batch. Without it the step sees the whole batch: one device, or plain
       jit over sharded arrays, where XLA splits the work and places the collectives itself;
    3. the optimizer's update of the parameters and of its own state.
    """
    step_rng = jax.random.fold_in(dropout_rng, state.step)  # nothing random has to be saved in checkpoints
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))  # each device its own dropout masks
    use_dropout = model.config.dropout > 0

    def accumulate(grad_sum, micro):
        index, micro_batch_BxT1 = micro
        rng = jax.random.fold_in(step_rng, index) if use_dropout else None
        loss, grads = jax.value_and_grad(next_token_loss)(state.params, micro_batch_BxT1, model, rng, loss_chunk)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    num_micro = batch_AxBxT1.shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, losses_A = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), batch_AxBxT1))
    grads, loss = jax.tree.map(lambda g: g / num_micro, grad_sum), losses_A.mean()
    if axis_name is not None:
        grads, loss = jax.lax.pmean((grads, loss), axis_name)  # where the devices' gradients meet

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new_params_norm = optax.tree.norm(new_state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "update_is_finite": jnp.isfinite(new_params_norm)}  # checked before anything is saved
    return new_state, metrics


def eval_step(params, batch_BxT1, weights_B, *, model: GPT, loss_chunk: int = 0):
    """Summed loss and token count of a batch whose padding rows have weight 0: token-weighted averages.
    With loss_chunk > 0 (where training uses the fused loss) the output layer runs that many tokens at a time, so
    the [B, T, V] float32 logits are never stored whole."""
    inputs_BxT, targets_BxT = batch_BxT1[:, :-1], batch_BxT1[:, 1:]
    if not loss_chunk:
        logits_BxTxV = model.apply({"params": params}, inputs_BxT)
        losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    else:
        cfg = model.config
        hidden_BxTxD = model.apply({"params": params}, inputs_BxT, method=GPT.hidden_states)
        losses_M = kernels.chunked_output_losses(hidden_BxTxD.reshape(-1, cfg.d_model),
                                                 output_matrix(params, cfg).astype(cfg.compute_dtype),
                                                 targets_BxT.reshape(-1), cfg.vocab_size, loss_chunk)
        losses_BxT = losses_M.reshape(targets_BxT.shape)
    weights_BxT = jnp.broadcast_to(weights_B[:, None], losses_BxT.shape)
    return {"loss_sum": (losses_BxT * weights_BxT).sum(), "tokens": weights_BxT.sum()}


# ----------------------------------------------------------------------------------------------------------------
# Compilation over the local devices


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices; the batch is split along its 'data' axis, parameters are replicated."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def resolve_parallelism(parallelism: str, sharding: str) -> str:
    """train.parallelism='auto': 'shard_map' for replicated state, 'jit' for fsdp.

    A shard_map step receives each input as its in_spec says, and the parameters' spec is PartitionSpec(): whole.
    Under fsdp that all-gathers every parameter at the start of the step and all-reduces full-size gradients, so
    the step holds as much as a replicated one and only the state at rest is split. Under jit, with the activations
    pinned to the batch's split (`with_activations_batch_sharded`), XLA's partitioner gathers each parameter where
    the step uses it and reduce-scatters its gradient (ZeRO-3): measured on 4 devices at 1, 4 and 16 rows per
    device, 0.37x, 0.82x and 1.05x the replicated step's temporary memory beside a quarter of its state
    (tests/test_sharding.py, benchmarks/sharding.py).
    """
    if parallelism != "auto":
        return parallelism
    return "jit" if sharding == "fsdp" else "shard_map"


def make_train_step(model_config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, state_sharding,
                    seed: int, donate: bool, loss_chunk: int = 0, parallelism: str = "shard_map"):
    """`train_step(state, batch [A, B, T1]) -> (state, metrics)`, jitted with the batch split over `mesh`.

    parallelism = 'shard_map': the step runs once per device on its rows of the batch, with the state whole on each,
    and its `pmean` averages the gradients. 'jit': the step sees the whole batch, and XLA's partitioner splits it
    over the devices and inserts the collectives itself (where it likes: inside the micro-batch loop, measured);
    the form fsdp needs (see `resolve_parallelism`). Both give the same numbers (tests/test_train.py). On one device
    there is nothing to average and the step is jitted as it is: wrapped in shard_map there, it ran 1.5-2% slower
    (m1 shape, CPU, taking turns).
    """
    per_device = parallelism == "shard_map" and mesh.size > 1
    step = functools.partial(train_step, model=GPT(model_config), optimizer=optimizer,
                             dropout_rng=jax.random.key(seed + 1), loss_chunk=loss_chunk,
                             axis_name="data" if per_device else None)
    if per_device:  # in: the state whole, the batch split along its B axis; out: the same state and metrics on each
        # check_vma=False: each device's gradient stays its own until the pmean. With JAX's default, shard_map
        # tracks which values differ per device, and jax.grad would sum the replicated parameters' gradients over
        # the devices itself (the pmean would then be of sums); the outputs are the same on every device by
        # construction, as they come out of the pmean.
        step = jax.shard_map(step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(None, "data")),
                             out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
    elif mesh.size > 1:  # plain jit over several devices: the activations pinned to the batch's split
        step = with_activations_batch_sharded(step, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,) if donate else ())


def with_activations_batch_sharded(step, mesh: Mesh):
    """`step`, traced so that every activation the model marks (`gptjax.model.batch_sharded`) stays split along the
    batch over the mesh's 'data' axis as the batch arrives, each device holding its own rows', and XLA gathers each
    (fsdp-split) parameter to them where it is used and reduce-scatters its gradient: ZeRO-3. Left to itself, XLA's
    partitioner chose other layouts for the activations as the batch grew (an fsdp step held more temporaries than
    a replicated one at 16 rows per device: tests/test_sharding.py)."""

    @functools.wraps(step)
    def traced_with_batch_axis(*args):
        with activations_split_along(mesh, "data"):
            return step(*args)

    return traced_with_batch_axis


def make_eval_step(model_config: ModelConfig, mesh: Mesh, params_sharding, loss_chunk: int = 0):
    step = functools.partial(eval_step, model=GPT(model_config), loss_chunk=loss_chunk)
    data = NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(step, in_shardings=(params_sharding, data, data), out_shardings=replicated(mesh))


def replicated_sharding(tree, mesh: Mesh):
    """A sharding for every array of `tree` (a train state, or params): replicated on every device."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def fsdp_spec(shape: tuple[int, ...], devices: int) -> PartitionSpec:
    """The array split over the 'data' axis along its largest dimension that the device count divides (ZeRO-3 /
    FSDP); replicated if none does (scalars, small odd vectors)."""
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % devices == 0:
            return PartitionSpec(*[("data" if d == dim else None) for d in range(len(shape))])
    return PartitionSpec()


def state_sharding(tree, mesh: Mesh, sharding: str = "replicated"):
    """train.sharding: 'replicated' (every device holds everything) or 'fsdp' (each parameter and its Adam moments
    split over the devices; XLA gathers a parameter where a step needs it and reduce-scatters its gradient)."""
    if sharding == "replicated":
        return replicated_sharding(tree, mesh)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, mesh.size)), tree)


def global_batch(local_batch: np.ndarray, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """One global array from each process's rows (with one process this is just a sharded device_put)."""
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return jax.make_array_from_process_local_data(sharding, local_batch)

