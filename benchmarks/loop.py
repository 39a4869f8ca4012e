"""`python -m benchmarks.loop`: the training loop's tokens/s against how many steps it lets the host dispatch ahead of
the device (`gptjax.train.DISPATCH_AHEAD`), on the tiny run: what bounding asynchronous dispatch costs.

Each setting trains the same run for `--steps` steps in a fresh workdir (one token cache for all), taking turns over
`--rounds` rounds so that a shared machine's noise hits every setting alike, and keeps the best tokens/s of the
last logged interval (the first interval holds the compilation). 'unbounded' is the loop without the bound (the host
waits only when it logs).
"""

import json
import os
import tempfile

from absl import flags

from gptjax import cli, train
from gptjax.configs import load_config_file

SETTINGS = {"1": 1, "2": 2, "4": 4, "unbounded": 10**9}


def loop_speed(config_path: str, steps: int, rounds: int, batch_size: int) -> dict:
    """{setting: best tokens/s of the loop} for each dispatch bound in SETTINGS."""
    best, default = {name: 0.0 for name in SETTINGS}, train.DISPATCH_AHEAD
    with tempfile.TemporaryDirectory() as directory:
        try:
            for round_ in range(rounds):
                for name, ahead in SETTINGS.items():
                    config = load_config_file(config_path)
                    config.train.update(dict(steps=steps, log_every=max(1, steps // 2), eval_every=0,
                                             checkpoint_every=10**9, batch_size=batch_size or config.train.batch_size,
                                             peak_flops=1e12))
                    config.data.cache_dir = os.path.join(directory, "data")
                    train.DISPATCH_AHEAD = ahead
                    result = train.train_and_evaluate(config, os.path.join(directory, f"{name}-{round_}"),
                                                      progress=False)
                    best[name] = max(best[name], result["tokens_per_second"])
        finally:
            train.DISPATCH_AHEAD = default
    return best


def main():
    options = FLAGS
    best = loop_speed(options.config, options.steps, options.rounds, options.batch_size)
    for name, tokens_per_second in best.items():
        print(f"dispatch ahead {name:>9}: {tokens_per_second:10,.0f} tokens/s "
              f"({tokens_per_second / best['unbounded']:.3f}x unbounded)")
    print(json.dumps({"tokens_per_second": best}))


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("config", "experiments/tiny.py", "The run to time.")
    flags.DEFINE_integer("steps", 60, "Steps per run (the second half is timed).")
    flags.DEFINE_integer("rounds", 3, "Rounds of taking turns.")
    flags.DEFINE_integer("batch_size", 0, "Sequences per step (0 = the config's).")
    cli.run(main)
