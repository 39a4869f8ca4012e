"""`python -m benchmarks.stopping`: what agreeing on a stop costs a two-process run, in training tokens/s.

Two processes on this machine (one CPU device each, gloo collectives, as tests/test_train.py's two-process tests
run them) train the same small run three ways, taking turns over `--rounds` rounds:
- `vote`: gptjax as it is: after each step, an `any` over the processes' stop flags dispatched behind the step and
  read `DISPATCH_AHEAD` steps later (gptjax/stopping.py);
- `none`: no stop check at all (what a run that cannot be stopped together would cost);
- `all-gather`: the flags all-gathered and read on the host before every step (gptjax before the vote), which makes
  the host wait for each step to finish before dispatching the next.
Each keeps the best tokens/s of its last logged interval (the first holds the compilation).
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import flags

from gptjax import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("vote", "none", "all-gather")

# One process of the run: gptjax.train as a command, with its stop vote replaced as the mode says.
PROCESS = """
import runpy, sys
import numpy as np
from gptjax import stopping, train

mode = sys.argv.pop(1)
if mode == "none":
    train.cast_stop_vote = lambda requested, mesh: False
elif mode == "all-gather":
    from jax.experimental import multihost_utils

    def all_gathered(requested, mesh):
        return bool(np.any(multihost_utils.process_allgather(np.asarray([requested]))))

    train.cast_stop_vote = all_gathered
sys.argv[0] = "gptjax.train"
runpy.run_module("gptjax.train", run_name="__main__", alter_sys=True)
"""


def two_process_speed(mode: str, workdir: str, cache_dir: str, steps: int, port: int) -> float:
    """Tokens/s of the last logged interval of a two-process run in `mode`."""
    common = ["--config", "experiments/tiny.py", f"--workdir={workdir}", f"--config.train.steps={steps}",
              f"--config.train.log_every={steps // 2}", "--config.train.eval_every=0",
              "--config.train.checkpoint_every=1000000", "--config.train.peak_flops=1e12",
              f"--config.data.cache_dir={cache_dir}", f"--config.train.coordinator_address=localhost:{port}",
              "--config.train.num_processes=2"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS, mode, *common, f"--config.train.process_id={i}"],
                                  cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for i in range(2)]
    try:
        errors = [process.communicate(timeout=900)[1] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    if any(process.returncode for process in processes):
        raise RuntimeError(f"the {mode} run failed:\n" + "\n".join(error[-2000:] for error in errors))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["tokens_per_second"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def stop_check_speed(steps: int, rounds: int) -> dict:
    """{mode: best tokens/s} over `rounds` rounds of taking turns."""
    best = {mode: 0.0 for mode in MODES}
    with tempfile.TemporaryDirectory() as directory:
        for round_ in range(rounds):
            for mode in MODES:
                workdir = os.path.join(directory, f"{mode}-{round_}")
                speed = two_process_speed(mode, workdir, os.path.join(directory, "data"), steps, free_port())
                best[mode] = max(best[mode], speed)
    return best


def main():
    best = stop_check_speed(FLAGS.steps, FLAGS.rounds)
    for mode, tokens_per_second in best.items():
        print(f"{mode:>10}: {tokens_per_second:10,.0f} tokens/s ({tokens_per_second / best['none']:.3f}x no check)")
    print(json.dumps({"tokens_per_second": best}))


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_integer("steps", 60, "Steps per run (the second half is timed).")
    flags.DEFINE_integer("rounds", 2, "Rounds of taking turns.")
    cli.run(main)
