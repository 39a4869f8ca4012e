"""What a run logs: <workdir>/metrics.jsonl, TensorBoard events and, when asked for, Weights & Biases."""

import hashlib
import json
import math
import os
import re

from gptjax import input_pipeline
from gptjax.errors import UserError


class MetricsLog:
    """<workdir>/metrics.jsonl (one JSON object per logged step), TensorBoard events in <workdir>/tensorboard and,
    with train.wandb_project, a Weights & Biases run.

    On resume, lines logged after the restored step (by the run that was interrupted) are dropped, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, start_step: int, enabled: bool = True, wandb_project: str = "",
                 config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.wandb_run = None
        if not enabled:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        tf = input_pipeline.import_tensorflow()
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        self.tf = tf
        if wandb_project:
            self.wandb_run = start_wandb(wandb_project, workdir, config or {})

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        scalars = {name: value for name, value in metrics.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                self.tf.summary.scalar(name, value)
        self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def require_wandb(project: str):
    """The wandb module, or one line saying how to get it: checked before any data work (gptjax/run.py)."""
    try:
        import wandb
    except ImportError:
        raise UserError(f"train.wandb_project={project!r} needs wandb: pip install wandb (or leave the key unset; "
                        f"TensorBoard and metrics.jsonl log the same numbers)") from None
    return wandb


def start_wandb(project: str, workdir: str, config: dict):
    """A wandb run named after the workdir, with an id derived from its path, so a resumed run continues it."""
    wandb = require_wandb(project)
    path = os.path.abspath(workdir)
    run_id = f"{os.path.basename(path)[:40]}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return wandb.init(project=project, name=os.path.basename(path), id=re.sub(r"[^\w-]", "_", run_id),
                      resume="allow", dir=workdir, config=config)
