"""Which devices a run uses (and the other processes of a multi-process run), and their peak FLOP/s for MFU (model
FLOPs utilisation).

MFU = (FLOPs per token x tokens per second) / peak FLOP/s. The peak is a known datasheet number for common
accelerators; on a CPU (or an unknown device) it is measured: the best of jitted square matmuls of several sizes,
what this machine does on dense math, so MFU there reads as "fraction of what the hardware can do" rather than of a
datasheet.
"""

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
from packaging.requirements import Requirement

from gptjax.errors import UserError

# Dense peak FLOP/s per device by jax device_kind, (float32, bfloat16). On NVIDIA GPUs JAX runs float32 matmuls as
# TF32 on the tensor cores by default (jax_default_matmul_precision), so the float32 column is the dense TF32 peak.
KNOWN_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": (494e12, 989e12),
    "NVIDIA H100": (494e12, 989e12),
    "NVIDIA H200": (494e12, 989e12),
    "NVIDIA A100-SXM4-80GB": (156e12, 312e12),
    "NVIDIA A100-SXM4-40GB": (156e12, 312e12),
    "NVIDIA GeForce RTX 4090": (82.6e12, 165e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
}
# Apple GPUs, per GPU core (the plugins do not name the chip): Apple's float32 figures divided by the cores they were
# given for (M1 Max, 32 cores: 10.4 TFLOPS; M2 Max, 38 cores: 13.6 TFLOPS). These GPUs run bfloat16 at the float32
# rate. Apple gave no such figure for later chips, whose peak is measured like a CPU's.
APPLE_GPU_FLOPS_PER_CORE = {"M1": 10.4e12 / 32, "M2": 13.6e12 / 38}


def matmul_timers(dtype=jnp.float32, sizes=(1024, 2048, 3072), device=None) -> dict:
    """{n: a function that runs one n x n @ n x n matmul on `device` and waits for it}, for each size n."""
    device = device or jax.local_devices()[0]
    matmul = jax.jit(lambda x, y: x @ y)

    def timer(n):
        a = jax.device_put(jnp.ones((n, n), dtype), device)
        return lambda: matmul(a, a).block_until_ready()

    return {n: timer(n) for n in sizes}


def memory_read_timer(megabytes: int = 256, device=None):
    """A function that sums a float32 array of `megabytes` (far larger than any cache) on `device` and waits: its
    bytes over its best seconds are the memory bandwidth that bounds decoding (see benchmarks/sampling.py)."""
    device = device or jax.local_devices()[0]
    array = jax.device_put(jnp.ones((megabytes * 2**20 // 4,), jnp.float32), device)
    total = jax.jit(jnp.sum)
    return lambda: total(array).block_until_ready()


def peak_from_seconds(seconds_by_size: dict) -> float:
    """The best FLOP/s over matmul sizes, from each size's best seconds per call (2 n^3 FLOPs each)."""
    return max(2 * n**3 / seconds for n, seconds in seconds_by_size.items())


def measure_matmul_flops(dtype=jnp.float32, sizes=(1024, 2048, 3072), repeats: int = 5, device=None) -> float:
    """The best FLOP/s of square matmuls over several sizes and repeats, after a warm-up of each.

    One measurement can come out low when something else runs at that moment (another process, tf.data threads,
    a compilation); the best of several sizes and repeats is the stable number.
    """
    return peak_from_seconds(alternated(matmul_timers(dtype, sizes, device), repeats))


def alternated(functions: dict, rounds: int) -> dict:
    """Best seconds per call of each function, calling them in turn for `rounds` rounds after one warm-up call each.

    Taking turns puts every contender in the same minutes of a shared machine, so its noise hits them alike.
    """
    for fn in functions.values():
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def peak_flops_per_device(dtype_name: str, configured: float = 0.0, remeasure: bool = False) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from). A measured peak is kept per machine, JAX version and
    dtype in the user's cache directory, so only the first run on a machine spends seconds measuring it. A kept peak
    that a run found low (`mark_peak_low`: its MFU came out above 100%) is measured again, keeping the best of the
    two; `remeasure` measures again (after a hardware or driver change) and keeps the new number."""
    if configured > 0:
        return configured, "train.peak_flops"
    kind = jax.local_devices()[0].device_kind
    if kind in KNOWN_PEAK_FLOPS:
        return KNOWN_PEAK_FLOPS[kind][dtype_name == "bfloat16"], f"datasheet for {kind}"
    apple = apple_gpu_peak(describe_displays()) if on_apple_gpu() else None
    if apple:
        return apple
    path, key = kept_peak_key(dtype_name)
    kept = read_json(path)
    found_low = kept.get(f"{key} | found low", False)
    if key in kept and not remeasure and not found_low:
        return kept[key], f"measured matmul on {kind}, kept in {path}; train.remeasure_peak=true measures again"
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    peak = measure_matmul_flops(dtype=dtype)
    if found_low:  # the best seen: a measurement on a busy machine comes out low, never high
        peak = max(peak, kept[key])
    kept = {name: value for name, value in kept.items() if name != f"{key} | found low"}
    write_json_atomically(path, {**kept, key: peak})
    return peak, f"best measured matmul on {kind}"


def apple_gpu_peak(displays: str) -> tuple[float, str] | None:
    """(peak FLOP/s, where it comes from) of the Apple GPU that `system_profiler SPDisplaysDataType` describes
    ("Chipset Model: Apple M1 Max", "Total Number of Cores: 32"), where Apple gave a figure for its generation."""
    chip = re.search(r"Chipset Model: Apple (M\d+)([\w ]*)", displays)
    cores = re.search(r"Total Number of Cores: (\d+)", displays)
    if not chip or not cores or chip.group(1) not in APPLE_GPU_FLOPS_PER_CORE:
        return None
    name = f"Apple {chip.group(1)}{chip.group(2).rstrip()}"
    peak = APPLE_GPU_FLOPS_PER_CORE[chip.group(1)] * int(cores.group(1))
    return peak, f"Apple's figure for the {name}'s {cores.group(1)}-core GPU"


def describe_displays() -> str:
    """What macOS says of its GPU (`system_profiler SPDisplaysDataType`); '' where it cannot be asked."""
    try:
        return subprocess.run(["system_profiler", "SPDisplaysDataType"], capture_output=True, text=True,
                              timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def kept_peak_key(dtype_name: str) -> tuple[str, str]:
    """(the file measured peaks are kept in, the key of this machine's device, JAX version and dtype in it)."""
    kind = jax.local_devices()[0].device_kind
    return (os.path.join(cache_dir(), "peak_flops.json"),
            f"{processor_name()} | {kind} | jax {jax.__version__} | {dtype_name}")


def mark_peak_low(dtype_name: str) -> None:
    """Notes that a run's MFU came out above 100% against the kept peak, so the next run measures it again."""
    path, key = kept_peak_key(dtype_name)
    kept = read_json(path)
    if key in kept and not kept.get(f"{key} | found low"):
        write_json_atomically(path, {**kept, f"{key} | found low": True})


def cache_dir() -> str:
    """gptjax's directory in the user's cache ($XDG_CACHE_HOME or ~/.cache): measured peaks, compiled programs."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptjax")


def processor_name() -> str:
    """The CPU's model name (what a measured peak belongs to), or the machine type where the OS does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return f"{names[0]} x{len(names)}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):  # none yet, unreadable or damaged: measured again and rewritten
        return {}


def write_json_atomically(path: str, value: dict) -> None:
    """Best effort: an unwritable cache directory only means measuring again next time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump(value, f, indent=1)
        os.replace(temporary, path)
    except OSError:
        pass


def format_mfu(mfu: float) -> str:
    """MFU as a percentage; above 100%, impossible, no figure: the peak it was divided by is low."""
    if mfu > 1:
        return "over 100%: the peak it divides by is low (measured again next run, or set train.peak_flops)"
    return f"{100 * mfu:.1f}%"


# JAX's Apple GPU plugins: the platform each registers, its package, and the JAX releases it runs with. jax-metal
# declares jax>=0.4.34 but only works with 0.5.0 (its last release, 2024); jax-mps declares its own range.
APPLE_GPU_PLUGINS = {"METAL": ("jax-metal", "==0.5.0"), "mps": ("jax-mps", None)}
APPLE_GPU_ROUTES = ("on a Mac with Apple Silicon, `pip install -e .` installs jax-metal with Python 3.10/3.11 and "
                    "jax-mps with Python 3.12 or newer (macOS 14+): README, Apple Silicon")


def select_platform(platform: str) -> None:
    """Makes JAX use `platform` ('cpu', 'gpu', 'tpu', 'METAL' for jax-metal, 'mps' for jax-mps); '' keeps JAX's
    choice. Call before any JAX work."""
    if platform:
        jax.config.update("jax_platforms", platform)


def check_platform(platform: str, flag: str = "train.platform") -> None:
    """Starts JAX's backend, refusing in one line a `platform` (train.platform) this machine does not have, and naming
    those it has; for an Apple GPU plugin, whether it is missing or installed beside a JAX it does not run with.
    Call after jax.distributed.initialize, before which no backend may start."""
    for name, (package, _) in APPLE_GPU_PLUGINS.items():
        if platform.lower() in ("", name.lower()):
            mismatch = plugin_version_mismatch(package)
            if mismatch:
                raise UserError(f"{mismatch}; install the versions it needs ({APPLE_GPU_ROUTES}), or set "
                                f"{flag}=cpu")
    try:
        jax.devices()
    except RuntimeError as e:
        if not platform:
            raise
        jax.config.update("jax_platforms", "")  # JAX's own choice, to name what this machine has
        here = sorted({device.platform for device in jax.devices()})
        plugin = {name.lower(): package for name, (package, _) in APPLE_GPU_PLUGINS.items()}.get(platform.lower())
        if plugin and installed_version(plugin) is None:
            raise UserError(f"{flag}={platform!r} needs the {plugin} plugin, which is not installed "
                            f"({APPLE_GPU_ROUTES}); this machine has {', '.join(here)}") from None
        raise UserError(f"{flag}={platform!r} is not available on this machine "
                        f"({str(e).splitlines()[0][:160]}); it has {', '.join(here)}: set {flag} to one of "
                        f"them, or to '' to let JAX choose") from None


def use_platform(platform: str) -> None:
    """`select_platform` then `check_platform`, for the commands that run in one process (sample, evaluate)."""
    select_platform(platform)
    check_platform(platform, "--platform")


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def plugin_version_mismatch(package: str) -> str | None:
    """'jax-mps 0.11.1 runs with jax <0.12,>=0.11.0 and this is jax 0.10.2' where an installed Apple GPU plugin
    cannot run with the installed JAX (it would fail at the first compilation, or crash); else None."""
    version = installed_version(package)
    if version is None:
        return None
    known = dict(APPLE_GPU_PLUGINS.values())[package]
    declared = [Requirement(line) for line in importlib.metadata.requires(package) or []]
    needs = known or ",".join(str(r.specifier) for r in declared if r.name == "jax" and not r.marker)
    if needs and not Requirement(f"jax{needs}").specifier.contains(jax.__version__, prereleases=True):
        return f"{package} {version} runs with jax {needs} and this is jax {jax.__version__}"
    return None


# Every model shape, batch size and JAX version adds its own programs, and JAX's cache is unbounded by default.
COMPILATION_CACHE_MAX_BYTES = 2 * 2**30


def prune_least_recently_used(directory: str, max_bytes: int) -> None:
    """Deletes the least recently read files of `directory` until the rest hold at most `max_bytes`: the bound of the
    compilation cache, applied as each command starts. (JAX's own bound, jax_compilation_cache_max_size, fails to
    write with a warning per program wherever one entry lacks its access-time file: entries written without the
    bound, by an earlier gptjax or any other JAX program using the directory.) Best effort: another command may be
    pruning too, and one deleted under a reader is only compiled again."""
    files = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):  # deleted meanwhile by another command
                stat = entry.stat()
                files.append((max(stat.st_atime, stat.st_mtime), stat.st_size, entry.path))
    kept = 0
    for _, size, path in sorted(files, reverse=True):  # the most recently read first (to the day on Linux's relatime)
        kept += size
        if kept > max_bytes:
            with contextlib.suppress(OSError):
                os.remove(path)


def use_compilation_cache(enabled: bool = True) -> None:
    """JAX's persistent compilation cache in <cache_dir()>/jax: a rerun, a resume or a second `sample` loads its
    compiled programs from disk instead of compiling them again. Call after JAX's backend may be initialized (after
    jax.distributed.initialize). A cache directory set by the user (JAX_COMPILATION_CACHE_DIR) wins. Kept off on
    Apple GPUs, where neither jax-metal nor jax-mps was tested with it, and before jax 0.10: jax 0.5.0 (the Apple
    stack's) aborted the test suite's process (SIGABRT, in a training step) when the cache was on, and passed with it
    off."""
    if not enabled or on_apple_gpu() or jax.config.jax_compilation_cache_dir or jax.__version_info__ < (0, 10):
        return
    directory = os.path.join(cache_dir(), "jax")
    prune_least_recently_used(directory, COMPILATION_CACHE_MAX_BYTES)
    jax.config.update("jax_compilation_cache_dir", directory)
    # JAX keeps only compilations of over a second by default; sampling's and evaluation's take less, and are what
    # a user waits for again at every call.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def supports_donation() -> bool:
    """jax-metal ignores buffer donation (and warns every step), so it is only asked for elsewhere; jax-mps too,
    until it is measured on a Mac."""
    return not on_apple_gpu()


def on_apple_gpu() -> bool:
    """Whether JAX runs on an Apple GPU, through jax-metal ('METAL') or jax-mps ('mps')."""
    return jax.default_backend().lower() in {name.lower() for name in APPLE_GPU_PLUGINS}


def maybe_initialize_distributed(train: ml_collections.ConfigDict) -> None:
    """Joins a multi-process run when train.coordinator_address is set (each process then feeds its own rows)."""
    if not train.coordinator_address or distributed_is_initialized():
        return
    try:  # CPU collectives across processes need gloo (the default in newer JAX)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    jax.distributed.initialize(coordinator_address=train.coordinator_address, num_processes=train.num_processes,
                               process_id=train.process_id)


def distributed_is_initialized() -> bool:
    """Without touching the backend (which must not start before jax.distributed.initialize)."""
    if hasattr(jax.distributed, "is_initialized"):
        return jax.distributed.is_initialized()
    from jax._src import distributed  # jax 0.5 (the Apple stack) has no public spelling

    return distributed.global_state.client is not None
