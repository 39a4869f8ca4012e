"""Sampling speed: new tokens per second at batch 1 and 8, with the KV cache and without (recomputing the window),
beside the memory roofline.

    python -m benchmarks.sampling [--config experiments/m1.py] [--new_tokens 255]

A decoding step reads every weight once for all B rows, plus each row's whole KV cache, and does little arithmetic
on it: on a CPU its speed is set by memory. `bytes_per_token` counts those reads, `roofline_tokens_per_second` is
the measured read bandwidth over them, and `..._of_roofline` the fraction reached. `head_bfloat16` reads the output
layer in bfloat16 (`--head_dtype bfloat16` of `gptjax.sample`). Random weights of the config's shape (speed does
not depend on what the weights are). Prints one JSON object.
"""

import json
import time

import jax
import jax.numpy as jnp

from gptjax import hardware, sampling
from gptjax.configs import build_model_config, load_config_file
from gptjax.model import GPT, ModelConfig
from gptjax.scaling import matmul_param_count


def greedy_generate(params, cfg: ModelConfig, batch: int, new_tokens: int, head_dtype: str = "float32"):
    """A call that decodes exactly `new_tokens` greedy tokens for `batch` rows with the KV cache (no early stop)."""
    options = dict(num_samples=batch, max_new_tokens=new_tokens, temperature=0.0, eos_id=-1, chunk=32,
                   head_dtype=head_dtype)
    return lambda: sampling.generate(params, cfg, [50256], jax.random.key(0), **options)


def bytes_per_token(cfg: ModelConfig, batch: int, head_dtype: str = "float32") -> float:
    """Bytes a decoding step reads per new token: the float32 weights (the output layer at `head_dtype`), shared by
    the batch's rows, and each row's key and value cache, read whole (all max_len slots) at every step. Tables read
    one row per token (an untied input embedding, learned positions) are left out."""
    head = cfg.padded_vocab_size * cfg.d_model
    weight_bytes = (matmul_param_count(cfg) - head) * 4 + head * (2 if head_dtype == "bfloat16" else 4)
    cache_bytes = 2 * cfg.n_layer * cfg.max_len * cfg.d_model * jnp.dtype(cfg.compute_dtype).itemsize
    return weight_bytes / batch + cache_bytes


def uncached_tokens_per_second(params, cfg: ModelConfig, batch: int, new_tokens: int) -> float:
    sampling.generate_greedy_uncached(params, cfg, [50256], 2, num_samples=batch)  # compile
    start = time.perf_counter()
    out = sampling.generate_greedy_uncached(params, cfg, [50256], new_tokens, num_samples=batch)
    return out.size / (time.perf_counter() - start)


def run(config_path: str = "experiments/m1.py", new_tokens: int = 255, uncached_tokens: int = 32) -> dict:
    cfg = build_model_config(load_config_file(config_path).model)
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    read_memory = hardware.memory_read_timer(256)
    results = {"config": config_path, "new_tokens": new_tokens, "device": jax.devices()[0].device_kind}
    bandwidth, speeds = 0.0, {}
    for batch, head_dtype in ((1, "float32"), (1, "bfloat16"), (8, "float32")):
        # The bandwidth is read taking turns with decoding (the best of all turns), so both see the same load.
        seconds = hardware.alternated({"generate": greedy_generate(params, cfg, batch, new_tokens, head_dtype),
                                       "read": read_memory}, 3)
        bandwidth = max(bandwidth, 256 * 2**20 / seconds["read"])
        speeds[batch, head_dtype] = batch * new_tokens / seconds["generate"]
    results["memory_read_bytes_per_second"] = bandwidth
    for (batch, head_dtype), cached in speeds.items():
        name = f"batch{batch}" + ("_head_bfloat16" if head_dtype == "bfloat16" else "")
        read_per_token = bytes_per_token(cfg, batch, head_dtype)
        roofline = bandwidth / read_per_token
        results[f"sample_tokens_per_second_{name}_cached"] = cached
        results[f"bytes_per_token_{name}"] = read_per_token
        results[f"roofline_tokens_per_second_{name}"] = roofline
        results[f"sample_{name}_of_roofline"] = cached / roofline
        if head_dtype == "float32":
            uncached = uncached_tokens_per_second(params, cfg, batch, uncached_tokens)
            results[f"sample_tokens_per_second_batch{batch}_uncached"] = uncached
            results[f"cache_speedup_batch{batch}"] = cached / uncached
    return results


if __name__ == "__main__":
    from absl import flags

    from gptjax import cli

    args = flags.FlagValues()
    flags.DEFINE_string("config", "experiments/m1.py", "experiment file whose shape is measured", flag_values=args)
    flags.DEFINE_integer("new_tokens", 255, "tokens each measurement decodes", flag_values=args)
    flags.DEFINE_integer("uncached_tokens", 32, "tokens for the slow path (its cost per token is the same at every "
                         "length)", flag_values=args)
    cli.parse_own_flags(args, None, __doc__.splitlines()[0])
    print(json.dumps(run(args.config, args.new_tokens, args.uncached_tokens), indent=1))
