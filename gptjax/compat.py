"""What the Apple stack needs, in one place: jax-metal 0.1.1 only works with jax 0.5.0, and with the flax, optax and
orbax-checkpoint releases that install beside it (requirements.txt pins them on macOS arm64). Each entry says which
newer API it stands in for; on current releases every one is a plain pass-through, and the core modules meet
them only as one import or one call.
"""

import sys

import jax


def install() -> None:
    """What must be patched before Orbax runs: called where every checkpoint manager is made (and idempotent)."""
    if not hasattr(jax.monitoring, "record_scalar"):
        # orbax-checkpoint 0.11.24, the newest that installs beside jax 0.5.0, reports array sizes through
        # jax.monitoring.record_scalar, which that JAX does not have yet. It only records monitoring metrics, so a
        # no-op stands in for it.
        jax.monitoring.record_scalar = lambda *args, **kwargs: None


# shard_map moved into jax proper (and renamed its replication check) after 0.5. The check is off in both: it would
# want the accumulation carry marked device-varying (jax.lax.pvary, which 0.5 lacks), and gptjax's outputs are
# replicated by construction (they come out of a pmean).
try:
    from jax import shard_map as _shard_map

    def shard_map(f, mesh, in_specs, out_specs):
        """`jax.shard_map(f, mesh=mesh, in_specs=..., out_specs=...)`, without the replication check."""
        return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
except ImportError:  # jax 0.5
    from jax.experimental.shard_map import shard_map as _shard_map

    def shard_map(f, mesh, in_specs, out_specs):
        """`jax.shard_map(f, mesh=mesh, in_specs=..., out_specs=...)`, without the replication check."""
        return _shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def keeping_tensorflow_trace_check(profiler_call, *args) -> None:
    """`profiler_call(*args)` (jax.profiler.start_trace or stop_trace). jaxlib 0.5's profiler session sets
    TensorFlow's `trace.enabled`, a function, to True when it starts and False when it stops, after which
    TensorBoard's summary writes fail calling it: the function is put back."""
    tf_trace = sys.modules.get("tensorflow.python.profiler.trace")
    check = getattr(tf_trace, "enabled", None)
    profiler_call(*args)
    if callable(check):
        tf_trace.enabled = check
