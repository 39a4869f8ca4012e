"""Sampling speed: new tokens per second at batch 1 and 8, with the KV cache and without (recomputing the window).

    python -m benchmarks.sampling [--config experiments/m1.py] [--new_tokens 255]

Random weights of the config's shape (speed does not depend on what the weights are). Prints one JSON object.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from gptjax import sampling
from gptjax.configs import build_model_config, load_config_file
from gptjax.model import GPT, ModelConfig


def greedy_generate(params, cfg: ModelConfig, batch: int, new_tokens: int):
    """A call that decodes exactly `new_tokens` greedy tokens for `batch` rows with the KV cache (no early stop)."""
    options = dict(num_samples=batch, max_new_tokens=new_tokens, temperature=0.0, eos_id=-1, chunk=32)
    return lambda: sampling.generate(params, cfg, [50256], jax.random.key(0), **options)


def cached_tokens_per_second(params, cfg: ModelConfig, batch: int, new_tokens: int) -> float:
    generate = greedy_generate(params, cfg, batch, new_tokens)
    generate()  # compile
    start = time.perf_counter()
    out = generate()
    return out.size / (time.perf_counter() - start)


def uncached_tokens_per_second(params, cfg: ModelConfig, batch: int, new_tokens: int) -> float:
    sampling.generate_greedy_uncached(params, cfg, [50256], 2, num_samples=batch)  # compile
    start = time.perf_counter()
    out = sampling.generate_greedy_uncached(params, cfg, [50256], new_tokens, num_samples=batch)
    return out.size / (time.perf_counter() - start)


def run(config_path: str = "experiments/m1.py", new_tokens: int = 255, uncached_tokens: int = 32) -> dict:
    cfg = build_model_config(load_config_file(config_path).model)
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    results = {"config": config_path, "new_tokens": new_tokens, "device": jax.devices()[0].device_kind}
    for batch in (1, 8):
        cached = cached_tokens_per_second(params, cfg, batch, new_tokens)
        uncached = uncached_tokens_per_second(params, cfg, batch, uncached_tokens)
        results[f"sample_tokens_per_second_batch{batch}_cached"] = cached
        results[f"sample_tokens_per_second_batch{batch}_uncached"] = uncached
        results[f"cache_speedup_batch{batch}"] = cached / uncached
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/m1.py")
    parser.add_argument("--new_tokens", type=int, default=255)
    parser.add_argument("--uncached_tokens", type=int, default=32,
                        help="tokens for the slow path (its cost per token is the same at every length)")
    args = parser.parse_args()
    print(json.dumps(run(args.config, args.new_tokens, args.uncached_tokens), indent=1))
