"""How a training run stops early. On Ctrl-C or SIGTERM (gptjax/interrupts.py turns both into a request): every
process stops before the same step, the state it reached is saved, and the user is told which checkpoint a rerun
resumes. On a NaN: nothing is saved, and the last good checkpoint is kept."""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptjax import checkpoints, interrupts
from gptjax.errors import UserError


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C / SIGTERM after saying what was saved."""


def cast_stop_vote(requested: bool, mesh: Mesh):
    """Whether any process was asked to stop, as of now, as a value to read later with `read_stop_vote` (after the
    step it follows has finished). One process: None, nothing to agree on, so the request is read as it is then.
    Several: an `any` over every process's flag, a tiny all-reduce dispatched behind the step in flight, so no
    process waits for it now (an all-gather read on the host at every step would make each wait for its step to
    finish before dispatching the next). Every process reads the same answer for the same vote, so all stop after
    the same step and save it together (a signal reaching one process alone would otherwise send it into the
    collective save while the others wait in the next step); the price is that a vote cast after step s is read
    after the host has dispatched the steps it may run ahead, so they stop up to twice as many steps later."""
    if jax.process_count() == 1:
        return None
    local_flags = np.full((len(mesh.local_devices),), requested)
    flags = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), local_flags)
    return any_process(mesh)(flags)


@functools.lru_cache(maxsize=None)
def any_process(mesh: Mesh):
    return jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))


def read_stop_vote(vote) -> bool:
    """The answer of a `cast_stop_vote`: the same on every process (each reads its own replica); with one process,
    whether a stop is requested now."""
    if vote is None:
        return interrupts.requested()
    return vote if isinstance(vote, bool) else bool(np.asarray(vote.addressable_data(0)))


def save_on_interrupt(state, start_step: int, manager, save, last: dict, workdir: str, is_chief: bool) -> None:
    """Saves the state an interrupt left (unless it is saved already), and says which checkpoint a rerun resumes."""
    directory = checkpoints.checkpoint_dir(workdir)
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
