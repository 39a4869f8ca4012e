"""What the Apple stack needs, in one place: jax-metal 0.1.1 only works with jax 0.5.0, and with the flax, optax and
orbax-checkpoint releases that install beside it (requirements.txt pins them on macOS arm64). Each entry says which
newer API it stands in for; on current releases every one is a plain pass-through.
"""

import sys

import jax


def install() -> None:
    """Patches JAX where the Apple stack's releases lack what gptjax calls; a no-op on current releases. Called once
    where a command starts (`gptjax.cli.run`, the benchmarks package, the tests package), so the core modules call
    today's APIs and never meet a shim."""
    if not hasattr(jax.monitoring, "record_scalar"):
        # orbax-checkpoint 0.11.24, the newest that installs beside jax 0.5.0, reports array sizes through
        # jax.monitoring.record_scalar, which that JAX does not have yet. It only records monitoring metrics, so a
        # no-op stands in for it.
        jax.monitoring.record_scalar = lambda *args, **kwargs: None
    if not hasattr(jax, "shard_map"):
        # shard_map moved into jax proper after 0.5, and its replication check was renamed check_rep -> check_vma.
        from jax.experimental.shard_map import shard_map as experimental_shard_map

        def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = True):
            return experimental_shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)

        jax.shard_map = shard_map


def keeping_tensorflow_trace_check(profiler_call, *args) -> None:
    """`profiler_call(*args)` (jax.profiler.start_trace or stop_trace). jaxlib 0.5's profiler session sets
    TensorFlow's `trace.enabled`, a function, to True when it starts and False when it stops, after which
    TensorBoard's summary writes fail calling it: the function is put back."""
    tf_trace = sys.modules.get("tensorflow.python.profiler.trace")
    check = getattr(tf_trace, "enabled", None)
    profiler_call(*args)
    if callable(check):
        tf_trace.enabled = check
