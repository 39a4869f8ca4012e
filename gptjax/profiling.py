"""train.profile_steps: a jax.profiler trace of a few training steps, for TensorBoard's profile plugin or Perfetto."""

import jax
from tqdm import tqdm

from gptjax.compat import keeping_tensorflow_trace_check


class Trace:
    """A jax.profiler trace of the steps in `window` (FIRST, LAST) into `directory`: started before FIRST (or the
    first step a resumed run takes inside the window), stopped once LAST has finished."""

    def __init__(self, window: tuple[int, int] | None, directory: str):
        self.window, self.directory, self.running = window, directory, False

    def before(self, step: int) -> None:
        if self.window and self.window[0] <= step <= self.window[1] and not self.running:
            keeping_tensorflow_trace_check(jax.profiler.start_trace, self.directory)
            self.running = True

    def after(self, step: int, metrics) -> None:
        if self.running and step == self.window[1]:
            jax.block_until_ready(metrics)
            self.stop()

    def stop(self) -> None:
        if self.running:
            keeping_tensorflow_trace_check(jax.profiler.stop_trace)
            self.running = False
            tqdm.write(f"profile  | steps {self.window[0]}-{self.window[1]} traced in {self.directory} (tensorboard "
                       f"--logdir {self.directory}, or ui.perfetto.dev)")
