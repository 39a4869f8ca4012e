"""`python -m gptjax.plot --workdir runs/m1`: draws the run's loss curves from metrics.jsonl to <workdir>/loss.png."""

import json
import os

from absl import flags

from gptjax import cli
from gptjax.errors import UserError, check_workdir


def plot_metrics(workdir: str, output: str | None = None) -> str:
    """Training loss and held-out loss against steps; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    check_workdir(workdir, must_exist=True)
    output = output or os.path.join(workdir, "loss.png")
    if os.path.isdir(output):
        raise UserError(f"--output {output!r} is a directory; pass the path of the PNG file to write")
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; train first (python -m gptjax.train --workdir {workdir})")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise UserError(f"{path} is empty; train for at least train.log_every steps first")
    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats per token)")
    axis.set_title(os.path.basename(os.path.abspath(workdir)))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main():
    print(plot_metrics(flags.FLAGS.workdir, flags.FLAGS.output))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "runs/default", "Run directory with metrics.jsonl.")
    flags.DEFINE_string("output", None, "PNG path (default: <workdir>/loss.png).")
    cli.run(main)
