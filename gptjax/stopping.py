"""How a training run stops early. On Ctrl-C or SIGTERM (gptjax/interrupts.py turns both into a request): every
process stops before the same step, the state it reached is saved, and the user is told which checkpoint a rerun
resumes. On a NaN: nothing is saved, and the last good checkpoint is kept."""

import math
import os
import sys

import jax
import numpy as np
import optax

from gptjax import checkpoints, interrupts
from gptjax.errors import UserError


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C / SIGTERM after saying what was saved."""


def stop_agreed(requested: bool) -> bool:
    """Whether any process was asked to stop. Every process gets the same answer before the same step, so all stop
    there and save it together (a signal reaching one process alone would otherwise send it into the collective
    save while the others wait in the next step's all-reduce). One all-gather of a flag per step, with several
    processes; one process reads its own flag."""
    if jax.process_count() == 1:
        return requested
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([requested]))))


def save_on_interrupt(state, start_step: int, manager, save, last: dict, workdir: str, is_chief: bool) -> None:
    """Saves the state an interrupt left (unless it is saved already), and says which checkpoint a rerun resumes."""
    directory = checkpoints.checkpoint_dir(workdir)
    if any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):  # a second Ctrl-C, inside a step
        print(f"\nInterrupted inside a step: nothing saved; the last checkpoint in {directory} is kept",
              file=sys.stderr)
        return
    step = int(state.step)  # the state is the truth if the interrupt landed between the step and the count
    params_are_finite = bool(jax.numpy.isfinite(optax.tree.norm(state.params)))
    if step > start_step and step not in manager.all_steps() and params_are_finite:
        if is_chief:
            print(f"\nInterrupted: saving step {step} to {directory}; rerun the same command to resume",
                  file=sys.stderr)
        save(step, last)
    elif is_chief:
        manager.wait_until_finished()
        latest = manager.latest_step()
        saved = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint was saved yet"
        print(f"\nInterrupted at step {step}: {saved} in {directory}; rerun the same command to resume",
              file=sys.stderr)
    manager.wait_until_finished()


def exit_stopped_before_training(workdir: str) -> None:
    """Exits 130 for a stop requested before the first step, saying what a rerun finds."""
    meta = checkpoints.latest_meta(workdir) if os.path.isdir(workdir) else None
    kept = f"the latest checkpoint is step {meta['step']}" if meta else "no checkpoint was saved"
    interrupts.exit_interrupted(f"Stopped before training: {kept} in {checkpoints.checkpoint_dir(workdir)}, and an "
                                f"unfinished token cache resumes; rerun the same command to go on")


def check_finite(loss: float, update_is_finite: bool, step: int, workdir: str) -> None:
    """Stops the run, saving nothing, once the loss or the updated parameters are NaN or infinite."""
    if not (math.isfinite(loss) and update_is_finite):
        raise UserError(f"the loss or parameters became NaN/inf at step {step} (loss {loss}); stopped without saving, "
                        f"the last good checkpoint is kept in {checkpoints.checkpoint_dir(workdir)}. Lower "
                        f"train.learning_rate or set train.grad_clip, then rerun to resume")
