"""What a training run tells the person at the terminal: the plan before the first step, its progress, speed and
logs while it trains (`Watch`), a sample at each evaluation, and the summary with the commands that come next."""

import contextlib
import os
import time

import jax
from jax.sharding import PartitionSpec
from tqdm import tqdm

from gptjax import hardware, input_pipeline, sampling
from gptjax import train_step as steps_lib
from gptjax.configs import profile_steps
from gptjax.metrics import MetricsLog
from gptjax.model import ModelConfig
from gptjax.profiling import Trace
from gptjax.scaling import describe, flops_per_token, param_count


def describe_fsdp(abstract_params, devices: int) -> str:
    """The note an fsdp run prints: what it splits, and what no device count divides (those arrays stay whole)."""
    if devices == 1:
        return "note     | train.sharding='fsdp' on one device splits nothing: the run is the same as 'replicated'"
    leaves = jax.tree.flatten_with_path(abstract_params)[0]
    whole = [jax.tree_util.keystr(path) for path, leaf in leaves
             if steps_lib.fsdp_spec(leaf.shape, devices) == PartitionSpec()]
    text = f"note     | train.sharding='fsdp': parameters and Adam moments split over {devices} devices"
    if whole:
        text += (f"; {len(whole)} array(s) have no dimension {devices} divides and stay whole on every device "
                 f"({', '.join(whole[:3])}{', ...' if len(whole) > 3 else ''})")
    return text


def print_plan(run, start_step: int) -> None:
    """The lines a user reads before the first step: devices, model, data, budget, workdir (`run`: gptjax.run.Run)."""
    if not run.is_chief:
        return
    cfg, data, cache = run.model_config, run.config.data, run.cache
    model_flops, tokens_per_step = flops_per_token(cfg, data.seq_len), run.config.train.batch_size * data.seq_len
    peak, peak_source = run.peak
    devices = jax.devices()
    print(f"devices  | {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
          f"{jax.process_count()} process(es)")
    print(f"model    | {param_count(cfg):,} parameters | {describe(model_flops, flops=True)} FLOPs/token "
          f"(6N + 12LTD) | {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.pos_embedding} positions, "
          f"{cfg.activation} | {exportability(cfg)}")
    print(f"data     | {input_pipeline.describe_source(data)} | train {cache.num_tokens('train'):,} tokens "
          f"({run.train_stream.num_windows(data.seq_len):,} windows of {data.seq_len + 1}) | validation "
          f"{cache.num_tokens('validation'):,} tokens")
    planned_tokens = run.total_steps * tokens_per_step
    print(f"budget   | {run.total_steps:,} steps x {tokens_per_step:,} tokens = {describe(planned_tokens)} tokens "
          f"({planned_tokens / max(1, cache.num_tokens('train')):.2f} epochs), "
          f"{describe(planned_tokens * model_flops, flops=True)}FLOPs | peak "
          f"{describe(peak * run.mesh.size, flops=True)}FLOP/s ({peak_source})")
    train = run.config.train
    if train.warmup_steps > run.total_steps:  # the linear warmup is cut off: its last step is the run's peak
        print(f"note     | train.warmup_steps={train.warmup_steps} is longer than the run's {run.total_steps} steps: "
              f"the learning rate rises to {float(run.schedule(run.total_steps - 1)):.3g}, never to "
              f"train.learning_rate={train.learning_rate:g}; lower train.warmup_steps to reach it")
    print(f"workdir  | {os.path.abspath(run.workdir)}" + (f" | resumed at step {start_step}" if start_step else ""))


def exportability(cfg: ModelConfig) -> str:
    """Whether `python -m gptjax.convert --to_hf` can export the model, said before it is trained."""
    from gptjax.convert import flags_for_gpt2_layout

    needed = flags_for_gpt2_layout(cfg)
    return f"Hugging Face export needs {' '.join(needed)}" if needed else "exports to Hugging Face (GPT-2 layout)"


def sample_text(params, model_config: ModelConfig, tokenizer, seed: int, max_new_tokens: int = 32) -> str:
    prompt = [tokenizer.eos_token_id]
    tokens = sampling.generate(params, model_config, prompt, jax.random.key(seed), max_new_tokens=max_new_tokens,
                               temperature=0.8, top_k=200, eos_id=tokenizer.eos_token_id)[0]
    return tokenizer.decode(sampling.truncate_at_eos(tokens, tokenizer.eos_token_id))


def eval_line(step: int, metrics: dict, sample: str) -> str:
    shown = repr(sample) if sample else "'' (the model ended the text at once: end-of-text was its first token)"
    return (f"step {step}: eval loss {metrics['eval_loss']:.4f} (perplexity {metrics['eval_perplexity']:.1f}) | "
            f"sample: {shown}")


class Watch:
    """What the loop shows and logs, kept out of its way: the progress bar (counting finished steps), metrics.jsonl
    with TensorBoard and wandb, the tokens/s clock, the training losses since the last report (left on the device
    until then), and a profile of train.profile_steps."""

    def __init__(self, run, start_step: int, progress: bool):
        train, data = run.config.train, run.config.data
        self.log = MetricsLog(run.workdir, start_step, enabled=run.is_chief, wandb_project=train.wandb_project,
                              config=run.config.to_dict())
        self.bar = tqdm(total=run.total_steps, initial=start_step, disable=not (progress and run.is_chief),
                        unit="step", dynamic_ncols=True)
        self.speed = Speedometer(train.batch_size * data.seq_len)
        self.trace = Trace(profile_steps(train.profile_steps) if run.is_chief else None,
                           os.path.join(run.workdir, "profile"))
        self.losses = []

    @contextlib.contextmanager
    def step(self, step: int):
        """Around dispatching `step`: a profiler annotation, inside the trace when `step` is in its window."""
        self.trace.before(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield

    def dispatched(self, step: int, metrics: dict) -> None:
        self.trace.after(step, metrics)
        self.losses.append(metrics["loss"])
        self.speed.started(step, metrics)

    def reported(self, step: int, metrics: dict) -> None:
        """After a report (and its evaluation and save): the log line written, the next interval begun."""
        self.log.write(step, metrics)
        self.losses = []
        self.speed.restart(step)  # evaluation and saving do not count against speed

    def close(self) -> None:
        self.trace.stop()
        self.log.close()
        self.bar.close()


class Speedometer:
    """Training tokens per second, from the end of the first (compiling) step, restarted after evaluations."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.clock, self.clock_step = None, 0

    def started(self, step: int, metrics) -> None:
        if self.clock is None:  # the first step compiled; time from its end
            jax.block_until_ready(metrics)
            self.restart(step)

    def restart(self, step: int) -> None:
        self.clock, self.clock_step = time.perf_counter(), step

    def tokens_per_second(self, step: int) -> float:
        seconds = time.perf_counter() - self.clock
        return (step - self.clock_step) * self.tokens_per_step / seconds if step > self.clock_step else 0.0


def nothing_to_do(workdir: str, step: int, total_steps: int) -> str:
    return (f"The run in {workdir} is already at step {step} of {total_steps}: nothing to do. To train longer, raise "
            f"--config.train.steps (the learning-rate schedule then stretches to the new end) or start a fresh "
            f"--workdir")


def summary(result: dict, workdir: str) -> str:
    """What a finished (or paused) run reached, and the commands that come next."""
    step, total = result["step"], result["total_steps"]
    parts = [f"step {step:,} of {total:,}" + ("" if step >= total else " (paused: rerun the same command to go on)")]
    if "loss" in result:
        parts.append(f"train loss {result['loss']:.3f}")
    if "eval_loss" in result:
        parts.append(f"held-out loss {result['eval_loss']:.3f} (perplexity {result['eval_perplexity']:.1f})")
    if result.get("tokens_per_second"):
        parts.append(f"{result['tokens_per_second']:,.0f} tokens/s, MFU {hardware.format_mfu(result['mfu'])}")
    return "\n".join([
        "done     | " + " | ".join(parts),
        f"next     | python -m gptjax.sample --workdir {workdir} --prompt \"The\"",
        f"         | python -m gptjax.evaluate --workdir {workdir}",
        f"         | python -m gptjax.plot --workdir {workdir}        (the loss curves, in {workdir}/loss.png)",
        f"         | metrics: {os.path.join(workdir, 'metrics.jsonl')}, TensorBoard: tensorboard --logdir {workdir}",
    ])
