"""`python -m gptjax.train --config experiments/m1.py --workdir runs/m1`: train, evaluate, checkpoint, resume.

Rerunning the same command on the same workdir continues from the latest checkpoint (parameters, optimizer state,
step, hence schedule and data position). `train_and_evaluate(config, workdir)` is the whole job as a function, so
tests run exactly what the command runs, on a shrunken config.
"""

import json
import math
import os
import signal
import sys
import threading
import time

import jax
import ml_collections
import optax
from absl import app, flags, logging
from jax.sharding import PartitionSpec
from tqdm import tqdm

from gptjax import checkpoints, hardware, input_pipeline, sampling
from gptjax.evaluate import evaluate_loss
from gptjax import train_step as steps_lib
from gptjax.configs import define_config_flag
from gptjax.errors import UserError, exit_on_user_error
from gptjax.model import ModelConfig, flops_per_token, param_count
from gptjax.tokenizer import load_tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Set-up helpers


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


def planned_steps(config: ml_collections.ConfigDict, model_config: ModelConfig) -> int:
    """train.steps, or when it is 0, as many steps as train.flop_budget buys at 6N + 12LTD FLOPs per token."""
    train = config.train
    if train.steps > 0:
        return train.steps
    if train.flop_budget <= 0:
        raise UserError("train.steps is 0 but train.flop_budget is not set; set one of them")
    tokens_per_step = train.batch_size * config.data.seq_len
    return max(1, int(train.flop_budget // (flops_per_token(model_config) * tokens_per_step)))


def check_batch_layout(train: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    per_micro = train.batch_size // max(1, train.grad_accum_steps)
    if train.grad_accum_steps < 1 or train.batch_size % train.grad_accum_steps:
        raise UserError(f"train.batch_size={train.batch_size} is not divisible by "
                        f"train.grad_accum_steps={train.grad_accum_steps}")
    if per_micro % num_devices:
        raise UserError(f"each micro-batch has {per_micro} sequences, not divisible by the {num_devices} devices; "
                        f"change train.batch_size or train.grad_accum_steps")
    if train.batch_size % num_processes:
        raise UserError(f"train.batch_size={train.batch_size} is not divisible by {num_processes} processes")


def prepare_data(config, workdir: str) -> input_pipeline.TokenCache:
    """Process 0 tokenizes (or finds the cache); the others wait for it and then open the same cache."""
    if jax.process_count() == 1:
        return input_pipeline.prepare(config, workdir)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        input_pipeline.prepare(config, workdir)
    multihost_utils.sync_global_devices("gptjax token cache ready")
    return input_pipeline.prepare(config, workdir, progress=False)


class MetricsLog:
    """<workdir>/metrics.jsonl (one JSON object per logged step) and TensorBoard events in <workdir>/tensorboard.

    On resume, lines logged after the restored step (by the run that was interrupted) are dropped, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
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

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        with self.writer.as_default(step=step):
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tf.summary.scalar(name, value)
        self.writer.flush()


def sample_text(params, model_config: ModelConfig, tokenizer, seed: int, max_new_tokens: int = 32) -> str:
    prompt = [tokenizer.eos_token_id]
    tokens = sampling.generate(params, model_config, prompt, jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
                               temperature=0.8, top_k=200, eos_id=tokenizer.eos_token_id)[0]
    return tokenizer.decode(sampling.truncate_at_eos(tokens, tokenizer.eos_token_id))


def describe(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


class StopSignal:
    """Signal handler for Ctrl-C (SIGINT) and SIGTERM: the loop stops after the step in flight and saves it.

    Raising from the handler instead could land inside the jitted step, after it consumed (donated) the old state
    and before the new one exists, leaving nothing to save. A second Ctrl-C stops at once.
    """

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


# ----------------------------------------------------------------------------------------------------------------
# The job


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
    """Trains (or resumes) the configured run in `workdir`; returns the last logged metrics."""
    train, data = config.train, config.data
    hardware.select_platform(train.platform)
    maybe_initialize_distributed(train)
    model_config = ModelConfig.from_config(config.model)
    if data.seq_len > model_config.max_len:
        raise UserError(f"data.seq_len={data.seq_len} is longer than the context model.max_len="
                        f"{model_config.max_len}; lower data.seq_len or raise model.max_len")
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    cache = prepare_data(config, workdir)
    train_stream, eval_stream = cache.stream("train"), cache.stream("validation")
    tokenizer = load_tokenizer(data.tokenizer)
    if len(tokenizer) > model_config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={model_config.vocab_size}; "
                        f"raise model.vocab_size")
    total_steps = planned_steps(config, model_config)
    mesh = steps_lib.data_mesh()
    check_batch_layout(train, mesh.size, jax.process_count())

    # State: fresh from the seed, then replaced by the latest checkpoint if the workdir has one.
    optimizer = steps_lib.make_optimizer(train, total_steps)
    abstract_state = jax.eval_shape(lambda: steps_lib.create_train_state(model_config, optimizer, train.seed))
    state_sharding = steps_lib.replicated_sharding(abstract_state, mesh)
    state = jax.jit(lambda: steps_lib.create_train_state(model_config, optimizer, train.seed),
                    out_shardings=state_sharding)()
    manager = checkpoints.make_manager(workdir, keep=train.keep_checkpoints, async_save=train.async_checkpoints)
    restored = checkpoints.restore_latest(manager, workdir, config.model.to_dict(), state.params, state.opt_state)
    if restored is not None:
        params, opt_state, meta = restored
        state = state.replace(step=meta["step"], params=params, opt_state=opt_state)
        checkpoints.set_aside_newer(manager, workdir, meta["step"])  # damaged ones we are about to overwrite
    elif train.init_from:  # fine-tuning: someone else's parameters, our fresh optimizer and schedule
        params, _, meta = checkpoints.load_for_inference(train.init_from)
        checkpoints.check_compatible(meta, config.model.to_dict(), train.init_from)
        state = state.replace(params=jax.device_put(params, state_sharding.params))
    start_step = int(state.step)

    tokens_per_step = train.batch_size * data.seq_len
    model_flops = flops_per_token(model_config)
    peak, peak_source = hardware.peak_flops_per_device(model_config.dtype, train.peak_flops)
    num_windows = train_stream.num_windows(data.seq_len)
    if is_chief:
        devices = jax.devices()
        print(f"devices  | {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
              f"{jax.process_count()} process(es)")
        print(f"model    | {param_count(model_config):,} parameters | {describe(model_flops)} FLOPs/token "
              f"(6N + 12LTD) | {model_config.n_layer} layers, d_model {model_config.d_model}, "
              f"{model_config.pos_embedding} positions, {model_config.activation}")
        print(f"data     | {input_pipeline.describe_source(data)} | train {cache.num_tokens('train'):,} tokens "
              f"({num_windows:,} windows of {data.seq_len + 1}) | validation {cache.num_tokens('validation'):,} "
              f"tokens")
        planned_tokens = total_steps * tokens_per_step
        print(f"budget   | {total_steps:,} steps x {tokens_per_step:,} tokens = {describe(planned_tokens)} tokens "
              f"({planned_tokens / max(1, cache.num_tokens('train')):.2f} epochs), "
              f"{describe(planned_tokens * model_flops)} FLOPs | peak {describe(peak * mesh.size)}FLOP/s "
              f"({peak_source})")
        print(f"workdir  | {os.path.abspath(workdir)}" + (f" | resumed at step {start_step}" if start_step else ""))

    step_fn = steps_lib.make_train_step(model_config, optimizer, mesh, state_sharding, train.seed,
                                        donate=hardware.supports_donation(),
                                        loss_chunk=hardware.loss_chunk_tokens(train.loss_chunk_tokens))
    eval_fn = steps_lib.make_eval_step(model_config, mesh, state_sharding.params)
    schedule = steps_lib.learning_rate_schedule(train, total_steps)
    micro = train.grad_accum_steps
    local_rows = train.batch_size // jax.process_count()
    batches = input_pipeline.train_batches(train_stream, data.seq_len, train.batch_size, train.seed, start_step,
                                           jax.process_index(), jax.process_count())
    log = MetricsLog(workdir, start_step, enabled=is_chief)
    eval_batch = train.batch_size // micro

    def meta_for(step: int, metrics: dict) -> dict:
        return {"step": step, "config": config.to_dict(), "tokenizer": data.tokenizer,
                "data_position": input_pipeline.data_position(step, train.batch_size, num_windows),
                "metrics": metrics}

    def save(step: int, metrics: dict) -> None:
        checkpoints.save(manager, step, state.params, state.opt_state, meta_for(step, metrics))

    last = {}
    step = start_step
    end_step = min(total_steps, train.stop_at_step) if train.stop_at_step > 0 else total_steps
    stop = StopSignal()
    previous_handlers = ({signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
                         if is_main_thread() else {})
    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and is_chief), unit="step",
               dynamic_ncols=True)
    clock, clock_step = None, start_step
    try:
        while step < end_step:
            if stop.requested:
                raise KeyboardInterrupt
            local_batch = next(batches).reshape(micro, local_rows // micro, data.seq_len + 1)
            state, metrics = step_fn(state, steps_lib.global_batch(local_batch, mesh, PartitionSpec(None, "data")))
            step += 1
            if clock is None:  # the first step compiled; time from here
                jax.block_until_ready(metrics)
                clock, clock_step = time.perf_counter(), step
            is_last = step == end_step
            log_now = step % train.log_every == 0 or is_last
            eval_now = train.eval_every and (step % train.eval_every == 0 or is_last)
            save_now = step % train.checkpoint_every == 0 or is_last
            if not (log_now or eval_now or save_now):
                bar.update(1)
                continue
            loss = float(metrics["loss"])
            if not (math.isfinite(loss) and bool(metrics["update_is_finite"])):
                raise UserError(f"the loss or parameters became NaN/inf at step {step} (loss {loss}); stopped "
                                f"without saving, the last good "
                                f"checkpoint is kept in {checkpoints.checkpoint_dir(workdir)}. Lower "
                                f"train.learning_rate or set train.grad_clip, then rerun to resume")
            now = time.perf_counter()
            tokens_per_second = (step - clock_step) * tokens_per_step / (now - clock) if step > clock_step else 0.0
            last = {"loss": loss, "learning_rate": float(schedule(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]), "tokens_per_second": tokens_per_second,
                    "mfu": tokens_per_second * model_flops / (peak * mesh.size)}
            if eval_now:
                last.update(evaluate_loss(state.params, eval_fn, eval_stream, data.seq_len, eval_batch,
                                          train.eval_steps, mesh))
                if is_chief and jax.process_count() == 1:
                    text = sample_text(state.params, model_config, tokenizer, train.seed + step)
                    bar.write(f"step {step}: eval loss {last['eval_loss']:.4f} (perplexity "
                              f"{last['eval_perplexity']:.1f}) | sample: {text!r}")
            log.write(step, last)
            if save_now:
                save(step, last)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last['learning_rate']:.2e}",
                            tok_s=f"{tokens_per_second:,.0f}", mfu=f"{100 * last['mfu']:.1f}%")
            bar.update(1)
            clock, clock_step = time.perf_counter(), step  # evaluation and saving do not count against speed
    except KeyboardInterrupt:
        bar.close()
        if any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state)):  # a second Ctrl-C, inside a step
            print(f"\nInterrupted inside a step: nothing saved; the last checkpoint in "
                  f"{checkpoints.checkpoint_dir(workdir)} is kept", file=sys.stderr)
            raise KeyboardInterrupt from None
        step = int(state.step)  # the state is the truth if the interrupt landed between the step and the count
        params_are_finite = bool(jax.numpy.isfinite(optax.global_norm(state.params)))
        if step > start_step and step not in manager.all_steps() and params_are_finite:
            if is_chief:
                print(f"\nInterrupted: saving step {step} to {checkpoints.checkpoint_dir(workdir)}; rerun the same "
                      f"command to resume", file=sys.stderr)
            save(step, last)
        manager.wait_until_finished()
        raise KeyboardInterrupt from None
    finally:
        bar.close()
        batches.close()
        manager.wait_until_finished()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    return {"step": step, **last}


def is_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread (tests may run training elsewhere)."""
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------------------------
# Command line

def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
    with exit_on_user_error():
        try:
            result = train_and_evaluate(_CONFIG.value, flags.FLAGS.workdir)
        except KeyboardInterrupt:
            sys.exit(130)
        if jax.process_index() == 0:
            print(json.dumps(result))


if __name__ == "__main__":
    _CONFIG = define_config_flag("experiments/tiny.py")
    flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, logs, token cache.")
    app.run(main)
