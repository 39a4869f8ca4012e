"""Ctrl-C and SIGTERM for the long commands: a request to stop, honoured where stopping is safe.

Python's default Ctrl-C raises KeyboardInterrupt wherever the main thread happens to be: inside a garbage-collection
callback of XLA (where it is printed and ignored, and the run trains on), or between a jitted step consuming its
donated state and the new state existing (where nothing is left to save). So `install()` turns both signals into a
request instead:
- the first one is acknowledged at once on stderr by a watcher thread, even while the main thread is inside XLA or
  TensorFlow (where a Python signal handler only runs once the call returns): the C-level handler writes the signal
  number to a pipe (`signal.set_wakeup_fd`), and the thread reads it;
- the work stops at its next safe point, where it calls `check()`: between tokenizer batches, between the phases of
  start-up, in training at most 2 steps after the step in progress (5 in a multi-process run, whose processes
  agree on it; gptjax/train.py bounds how far the host runs ahead of the device; with its evaluation or save).
  `check()` raises `Interrupted`, the command saves what can be saved, says what was saved and exits with status 130;
- a second Ctrl-C exits at once with status 130. Checkpoints are written to a temporary directory and renamed when
  complete, and the token cache records its progress after each shard, so the last complete ones stay usable.

Nothing here is active until a command calls `install()`; library code calling `check()` then sees no request.
"""

import contextlib
import os
import signal
import sys
import threading

ACKNOWLEDGEMENT = (b"\nStopping at the next safe point (within 2 steps of the step in progress, 5 with several "
                   b"processes, with its evaluation or save, or between tokenizer batches), then saving what can be "
                   b"saved; press Ctrl-C again to stop at once\n")
AT_ONCE = (b"\nStopped at once: the last complete checkpoint (if any) is kept, and an unfinished token cache resumes; "
           b"rerun the same command to go on\n")

_requested = threading.Event()
_watcher: threading.Thread | None = None
_wakeup_fd = -1  # the C-level signal handler writes each signal's number here; the watcher reads the other end


class Interrupted(KeyboardInterrupt):
    """Raised by `check()` at a safe point after a stop was requested."""


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """A safe point: raises `Interrupted` if a stop was requested."""
    if _requested.is_set():
        raise Interrupted


def install() -> None:
    """Ctrl-C (SIGINT) and SIGTERM become stop requests (see the module docstring)."""
    global _watcher, _wakeup_fd
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread; a run in another thread keeps Python's defaults
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _note_signal)
    if _watcher is None:
        read_fd, _wakeup_fd = os.pipe()
        os.set_blocking(_wakeup_fd, False)
        _watcher = threading.Thread(target=_watch, args=(read_fd,), name="gptjax-interrupts", daemon=True)
        _watcher.start()
    signal.set_wakeup_fd(_wakeup_fd, warn_on_full_buffer=False)


def reassert() -> None:
    """Sets the handlers again where they were installed: jax.distributed installs its own for SIGTERM."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _note_signal:
        install()


@contextlib.contextmanager
def handled():
    """`install()` for a block: what a command did from its start, or, for a run started from Python (a test, a
    notebook), for the run only: the previous handlers back after, and no request left behind (the next call in a
    notebook starts without one, whether this block ended on a stop or not)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is _note_signal:
        yield  # another thread cannot handle signals; a command installed them already
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(-1)
    install()
    _requested.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        _requested.clear()


def _note_signal(signum, frame) -> None:
    """The Python-level handler. Having one (not SIG_DFL) is what makes Python write each signal to the wakeup
    pipe; the watcher thread does the work, so nothing is raised in the main thread, wherever it is."""


def _watch(read_fd: int) -> None:
    while True:
        for signum in os.read(read_fd, 16):
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            if _requested.is_set() and signum == signal.SIGINT:
                os.write(2, AT_ONCE)
                os._exit(130)
            if not _requested.is_set():
                _requested.set()
                os.write(2, ACKNOWLEDGEMENT)


def exit_interrupted(message: str) -> None:
    """The last line of an interrupted command, and its exit status."""
    print(message, file=sys.stderr)
    sys.exit(130)
