"""Which devices a run uses, and their peak FLOP/s for MFU (model FLOPs utilisation).

MFU = (FLOPs per token x tokens per second) / peak FLOP/s. The peak is a known datasheet number for common
accelerators; on a CPU (or an unknown device) it is measured once with a large jitted matmul, the best this machine
does on dense math, so MFU there reads as "fraction of what the hardware can do" rather than of a datasheet.
"""

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device by jax device_kind, (float32, bfloat16).
KNOWN_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": (67e12, 989e12),
    "NVIDIA H100": (67e12, 989e12),
    "NVIDIA H200": (67e12, 989e12),
    "NVIDIA A100-SXM4-80GB": (19.5e12, 312e12),
    "NVIDIA A100-SXM4-40GB": (19.5e12, 312e12),
    "NVIDIA GeForce RTX 4090": (82.6e12, 165e12),
    "Apple M1 Max": (10.4e12, 10.4e12),  # jax-metal runs float32
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
}


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
    """Best FLOP/s of an n x n @ n x n matmul on `device` (default: the first device), after a warm-up."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_per_device(dtype_name: str, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if configured > 0:
        return configured, "train.peak_flops"
    kind = jax.local_devices()[0].device_kind
    if kind in KNOWN_PEAK_FLOPS:
        return KNOWN_PEAK_FLOPS[kind][dtype_name == "bfloat16"], f"datasheet for {kind}"
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    return measure_matmul_flops(dtype=dtype), f"measured matmul on {kind}"


def select_platform(platform: str) -> None:
    """Makes JAX use `platform` ('cpu', 'gpu', 'tpu', 'METAL'); '' keeps JAX's choice. Call before any JAX work."""
    if platform:
        jax.config.update("jax_platforms", platform)


def supports_donation() -> bool:
    """jax-metal ignores buffer donation (and warns every step), so it is only asked for elsewhere."""
    return jax.default_backend().lower() not in ("metal",)


def loss_chunk_tokens(configured: int) -> int:
    """train.loss_chunk_tokens with -1 resolved for this backend (see gptjax.train_step.fused_output_loss).

    Measured: m1 step on a 2-core CPU 821 -> 1131 tokens/s fused; on an H200 (bfloat16) 1.05M plain vs 0.93M fused.
    """
    if configured >= 0:
        return configured
    return 1024 if jax.default_backend().lower() in ("cpu", "metal") else 0
