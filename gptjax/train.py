"""`python -m gptjax.train --config experiments/m1.py --workdir runs/m1`: train, evaluate, checkpoint, resume.

Rerunning the same command on the same workdir continues from the latest checkpoint (parameters, optimizer state,
step, hence schedule and data position). `train_and_evaluate(config, workdir)` is the whole job as a function, so
tests run exactly what the command runs, on a shrunken config.
"""

if __name__ == "__main__":  # before the imports below take their seconds: Ctrl-C is a stop request from the start
    from gptjax import interrupts as _interrupts

    _interrupts.install()

import collections
import functools
import math
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import PartitionSpec
from tqdm import tqdm

from gptjax import checkpoints, cli, hardware, input_pipeline, interrupts, kernels
from gptjax import train_step as steps_lib
from gptjax.errors import UserError
from gptjax.console import Watch, eval_line, nothing_to_do, print_plan, sample_text, summary
from gptjax.preflight import check_restored, data_fingerprint
from gptjax.run import Run, set_up
from gptjax.scaling import flops_per_token
from gptjax.stopping import (RunInterrupted, cast_stop_vote, check_finite, exit_stopped_before_training,
                             read_stop_vote, save_on_interrupt)


# ----------------------------------------------------------------------------------------------------------------
# The job, in named pieces: set_up (gptjax/run.py) -> initial_state -> print_plan -> train_loop (-> report, save)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
    """Trains (or resumes) the configured run in `workdir`; returns the last logged metrics. Ctrl-C or SIGTERM
    stops it at the next safe point (gptjax/interrupts.py): before the first step, `interrupts.Interrupted`, having
    saved nothing new; in training, `RunInterrupted`, after saving the step it reached."""
    with interrupts.handled():
        run = set_up(config, workdir)
        interrupts.check()
        state, last = initial_state(run)
        start_step, train = int(state.step), config.train
        end_step = min(run.total_steps, train.stop_at_step) if train.stop_at_step > 0 else run.total_steps
        if start_step >= end_step:
            if run.is_chief:
                print(nothing_to_do(workdir, start_step, run.total_steps))
            run.manager.close()
            return {"step": start_step, "total_steps": run.total_steps, **last}
        print_plan(run, start_step)
        interrupts.check()
        step, last = train_loop(run, state, last, start_step, end_step, progress)
        return {"step": step, "total_steps": run.total_steps, **last}


def initial_state(run: Run) -> tuple[steps_lib.TrainState, dict]:
    """(state, last logged metrics): the latest checkpoint of the workdir if it has one; else fresh from the seed,
    with train.init_from's parameters when fine-tuning."""
    config, train = run.config, run.config.train
    fresh_state = functools.partial(steps_lib.create_train_state, run.model_config, run.optimizer, train.seed)
    # Shapes, dtypes and this run's shardings, with no memory behind them: Orbax restores straight into them, so a
    # resume never holds a fresh state beside the restored one.
    target = jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
                          jax.eval_shape(fresh_state), run.state_sharding)
    restored = checkpoints.restore_latest(run.manager, run.workdir, config.model.to_dict(), target.params,
                                          target.opt_state)
    if restored is None:
        state = jax.jit(fresh_state, out_shardings=run.state_sharding)()
        if train.init_from:  # fine-tuning: someone else's parameters, our fresh optimizer and schedule
            params, _, meta = checkpoints.restore_latest(checkpoints.make_manager(train.init_from, async_save=False),
                                                         train.init_from, config.model.to_dict(), target.params)
            check_restored(meta, config, train.init_from, run.is_chief)
            state = state.replace(params=params)
        return state, {}
    params, opt_state, meta = restored
    if opt_state is None:  # a checkpoint of parameters alone (a converted model): a fresh optimizer
        opt_state = jax.jit(run.optimizer.init, out_shardings=run.state_sharding.opt_state)(params)
    check_restored(meta, config, run.workdir, run.is_chief, data_fingerprint(config, run.cache), run.mesh.size)
    checkpoints.set_aside_newer(run.manager, run.workdir, meta["step"])  # damaged ones we are about to overwrite
    # The step as the same int32 array a fresh state has, so the first resumed step reuses the compiled step.
    step = jax.device_put(np.asarray(meta["step"], np.int32), run.state_sharding.step)
    return steps_lib.TrainState(step=step, params=params, opt_state=opt_state), meta.get("metrics") or {}


def train_loop(run: Run, state, last: dict, start_step: int, end_step: int, progress: bool) -> tuple[int, dict]:
    """Steps from start_step to end_step, with the periodic log / evaluation / checkpoint; (step reached, last
    metrics). Ctrl-C or SIGTERM stops at most DISPATCH_AHEAD steps after the step in progress (2 * DISPATCH_AHEAD
    + 1 with several processes, which vote), every process after the same step, and saves it (gptjax/interrupts.py,
    gptjax/stopping.py)."""
    train, data = run.config.train, run.config.data
    step_fn = steps_lib.make_train_step(run.model_config, run.optimizer, run.mesh, run.state_sharding, train.seed,
                                        donate=hardware.supports_donation(),
                                        loss_chunk=kernels.loss_chunk_tokens(train.loss_chunk_tokens),
                                        parallelism=steps_lib.resolve_parallelism(train.parallelism,
                                                                                  train.sharding))
    eval_fn = steps_lib.make_eval_step(run.model_config, run.mesh, run.state_sharding.params,
                                       loss_chunk=kernels.eval_loss_chunk_tokens(train.loss_chunk_tokens))
    batches = input_pipeline.train_batches(run.train_stream, data.seq_len, train.batch_size, train.seed,
                                           start_step, jax.process_index(), jax.process_count())
    local_shape = (train.grad_accum_steps, train.batch_size // jax.process_count() // train.grad_accum_steps,
                   data.seq_len + 1)  # [A, rows of this process, T1]
    watch = Watch(run, start_step, progress)  # the progress bar, metrics.jsonl, the tokens/s clock (console.py)
    step = start_step
    # JAX dispatches asynchronously: step_fn returns at once with arrays still being computed, and the host goes on
    # to the next batch. Unbounded, the host would queue steps far ahead of the device, and a stop (or the bar, or a
    # save) would wait for all of them. So at most DISPATCH_AHEAD steps are in flight: before going on, the host
    # waits for the oldest, and reads the stop vote cast after it (stopping.cast_stop_vote).
    in_flight = collections.deque()  # (loss, stop vote) of each dispatched step not yet waited for, oldest first
    try:
        while step < end_step:
            batch_AxBxT1 = steps_lib.global_batch(next(batches).reshape(local_shape), run.mesh,
                                                  PartitionSpec(None, "data"))
            with watch.step(step + 1):
                state, metrics = step_fn(state, batch_AxBxT1)
            step += 1
            watch.dispatched(step, metrics)
            in_flight.append((metrics["loss"], cast_stop_vote(interrupts.requested(), run.mesh)))
            log_now, eval_now, save_now = periodic_work(train, step, end_step, run.evaluate)
            if log_now or eval_now or save_now:
                last = report(run, state, metrics, watch, step, eval_fn, eval_now)
                if save_now:
                    save(run, state, step, last)
                watch.reported(step, last)
            if wait_for_steps(in_flight, DISPATCH_AHEAD, watch.bar):
                raise KeyboardInterrupt  # every process, after this same step (its log line and save done)
        wait_for_steps(in_flight, 0, watch.bar)
    except KeyboardInterrupt:
        watch.bar.close()
        save_on_interrupt(state, start_step, run.manager, lambda at, metrics: save(run, state, at, metrics), last,
                          run.workdir, run.is_chief)
        raise RunInterrupted from None
    finally:
        watch.close()
        batches.close()
        run.manager.wait_until_finished()
    return step, last


# Steps the host may dispatch before waiting for the oldest: a stop is honoured at most this many steps after the
# step in progress. Measured (benchmarks/loop.py, the tiny run on a 2-core CPU, best of 3): 1, 2 and 4 steps ahead
# train at 1.13x, 1.06x and 0.99x the tokens/s of the unbounded loop, all within that machine's noise: the bound
# costs nothing there. 2 leaves a GPU one step queued while the host prepares the next.
DISPATCH_AHEAD = 2


def wait_for_steps(in_flight: collections.deque, dispatch_ahead: int, bar) -> bool:
    """Waits for the oldest dispatched steps until at most `dispatch_ahead` are in flight, counting each on the bar
    as it finishes; whether the stop vote of one of them says stop."""
    stop = False
    while len(in_flight) > dispatch_ahead:
        loss, vote = in_flight.popleft()
        jax.block_until_ready(loss)
        bar.update(1)
        stop = read_stop_vote(vote) or stop
    return stop


def periodic_work(train: ml_collections.ConfigDict, step: int, end_step: int, evaluate: bool) -> tuple[bool, ...]:
    """(log, evaluate, save) due after `step`: every log_every / eval_every / checkpoint_every steps, and at the end."""
    is_last = step == end_step
    return (step % train.log_every == 0 or is_last, evaluate and (step % train.eval_every == 0 or is_last),
            step % train.checkpoint_every == 0 or is_last)


def report(run: Run, state, metrics: dict, watch: Watch, step: int, eval_fn, evaluate: bool) -> dict:
    """The metrics of `step` as Python numbers (held-out loss and a sample too, when `evaluate`); refuses a NaN.
    The training loss is the mean of the steps' losses since the last report (as MaxText and Levanter log it): one
    step's loss swings with its batch."""
    train, data = run.config.train, run.config.data
    loss = float(np.mean(jax.device_get(watch.losses)))  # waits for the step: the clock reads after it
    tokens_per_second = watch.speed.tokens_per_second(step)
    check_finite(loss, bool(metrics["update_is_finite"]), step, run.workdir)
    last = {"loss": loss, "learning_rate": float(run.schedule(step - 1)), "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_second": tokens_per_second,
            "mfu": tokens_per_second * flops_per_token(run.model_config, data.seq_len) / (run.peak[0] *
                                                                                            run.mesh.size)}
    if last["mfu"] > 1:  # impossible: the kept measured peak is low (it was measured on a busy machine)
        hardware.mark_peak_low(run.model_config.dtype)
    if evaluate:
        last.update(evaluate_loss(state.params, eval_fn, run.eval_stream, data.seq_len,
                                  train.batch_size // train.grad_accum_steps, train.eval_steps, run.mesh))
        if run.is_chief and jax.process_count() == 1:  # a short sample, to watch the text improve
            watch.bar.write(eval_line(step, last, sample_text(state.params, run.model_config, run.tokenizer,
                                                        train.seed + step)))
    watch.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last['learning_rate']:.2e}", tok_s=f"{tokens_per_second:,.0f}",
                    mfu=hardware.format_mfu(last["mfu"]))
    return last


def evaluate_loss(params, eval_step, stream, seq_len: int, batch_size: int, max_batches: int, mesh,
                  token_bytes: np.ndarray | None = None, progress: bool = False) -> dict:
    """Token-weighted mean next-token loss over held-out windows (all of them when max_batches is 0).

    The last batch is padded to the full batch size with weight-0 rows, so every device sees the same shape.
    With `token_bytes` (UTF-8 bytes of each token id) it also reports bits per byte, comparable across tokenizers.
    """
    loss_sum, tokens, num_bytes = 0.0, 0.0, 0  # the sums stay on the device until the end: no wait per batch
    rows = input_pipeline.process_rows(batch_size, jax.process_index(), jax.process_count())
    batches = input_pipeline.eval_batches(stream, seq_len, batch_size, max_batches)
    for windows in tqdm(batches, desc="evaluating", unit=" batches", disable=not progress):
        weights = np.zeros((batch_size,), np.float32)
        weights[: len(windows)] = 1.0
        padded = np.zeros((batch_size, seq_len + 1), np.int32)
        padded[: len(windows)] = windows
        out = eval_step(params, steps_lib.global_batch(padded[rows], mesh, PartitionSpec("data")),
                        steps_lib.global_batch(weights[rows], mesh, PartitionSpec("data")))
        loss_sum, tokens = loss_sum + out["loss_sum"], tokens + out["tokens"]
        if token_bytes is not None:
            num_bytes += int(token_bytes[windows[:, 1:]].sum())
    loss_sum, tokens = float(loss_sum), float(tokens)
    if tokens == 0:
        raise UserError("no held-out windows to evaluate; use a larger corpus or data.eval_fraction")
    loss = loss_sum / tokens
    results = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}
    if token_bytes is not None and num_bytes:
        results["eval_bits_per_byte"] = loss_sum / math.log(2) / num_bytes
    return results


def save(run: Run, state, step: int, metrics: dict) -> None:
    """A checkpoint of `state` at `step`, with what a resume checks: the config, the data position and fingerprint."""
    config = run.config
    num_windows = run.train_stream.num_windows(config.data.seq_len)
    meta = {"step": step, "config": config.to_dict(), "tokenizer": config.data.tokenizer,
            "data_position": input_pipeline.data_position(step, config.train.batch_size, num_windows),
            "data_fingerprint": data_fingerprint(config, run.cache), "metrics": metrics,
            "sharding": {"train.sharding": config.train.sharding, "devices": run.mesh.size}}
    checkpoints.save(run.manager, step, state.params, state.opt_state, meta)


# ----------------------------------------------------------------------------------------------------------------
# Command line

def main():
    workdir = flags.FLAGS.workdir
    try:
        result = train_and_evaluate(_CONFIG.value, workdir)
    except RunInterrupted:  # it said what it saved
        sys.exit(130)
    except KeyboardInterrupt:  # a stop requested before the first step
        exit_stopped_before_training(workdir)
    if jax.process_index() == 0:
        print(summary(result, workdir))


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag("experiments/tiny.py")
    flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, logs, token cache.")
    cli.run(main)
