"""Shared test setup: the repository root on sys.path, and small model configs that run fast on a laptop CPU."""

import fcntl
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from typing import Callable

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# gptjax keeps measured peaks (and compiled programs) in the user's cache directory: the tests get their own, so they
# neither read nor change the user's. One directory for the whole session: pytest's main process makes it before it
# starts its xdist workers, which inherit it, so a program one worker compiled is loaded by the others and by the
# commands the tests start.
if "GPTJAX_TEST_CACHE" not in os.environ:
    os.environ["GPTJAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="gptjax-test-cache-")
os.environ["XDG_CACHE_HOME"] = os.environ["GPTJAX_TEST_CACHE"]

# The suite's time is mostly XLA compiling hundreds of small programs, whose run time is negligible: LLVM's cheapest
# optimisation level compiles them about twice as fast. XLA's own graph passes, and so the memory plans the tests
# read, are the same; the numbers differ only by float32 rounding, far inside the tests' tolerances
# (test_the_tests_xla_level_changes_no_memory_plan_and_only_float_rounding). Set before JAX starts, so this
# process, the xdist workers and every command a test starts inherit it; speed is measured in benchmarks/.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".split()))

def pytest_addoption(parser, pluginmanager):
    """setup.cfg's addopts ask pytest-xdist for one worker per core. Without it (`pip install -e .`, not `.[test]`)
    those options are accepted here and ignored, so `python -m pytest` runs the tests in this one process."""
    if not pluginmanager.hasplugin("xdist"):
        for option in ("--numprocesses", "--maxprocesses", "--dist"):
            parser.addoption(option, help="(pytest-xdist is not installed: ignored, the tests run in one process)")


def pytest_report_header(config):
    if not config.pluginmanager.hasplugin("xdist"):
        return "pytest-xdist is not loaded: the tests run in one process (pip install -e '.[test]' for all cores)"


import jax  # noqa: E402

from gptjax.model import ModelConfig  # noqa: E402


def once_per_session(name: str, code: str, compute: Callable[[], str]) -> str:
    """compute()'s text, computed once per test session by whichever test asks first, on whichever xdist worker:
    kept in the session's cache directory under `name` and a hash of `code` (what compute runs), under a lock that
    makes a second asker wait for the first. A failure is kept too (its traceback as the text), so the tests that
    read it fail on it rather than each running it again."""
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    path = os.path.join(os.environ["GPTJAX_TEST_CACHE"], f"{name}-{digest}.txt")
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            try:
                text = compute()
            except Exception:
                text = f"{name} failed once this session:\n{traceback.format_exc()}"
            with open(f"{path}.tmp", "w") as f:
                f.write(text)
            os.replace(f"{path}.tmp", path)
        with open(path) as f:
            return f.read()


# Commands whose interpreter start is not what a test is about (a flag or config mistake, an evaluation): a process
# per command, as a user runs it, without paying Python's and JAX's start each time (~2-3 s, minutes of the suite
# over its ~60 commands). One server process per test process imports what every command imports (never starting a
# JAX backend, so a fork is safe) and forks a child per command, which runs the module as `python -m` does, with its
# own output, exit status and cwd, and the asking test's environment (only what JAX reads at import is the
# server's). The tests of start-up itself (imports, --help, Ctrl-C, compiled programs kept, several processes)
# start a fresh interpreter.
COMMAND_SERVER = """
import io, json, os, runpy, sys, traceback
import jax, numpy, absl.app, ml_collections, gptjax.cli, gptjax.configs  # noqa: F401  what every command imports

for request in sys.stdin:
    module, args, environment, out_path, err_path = json.loads(request)
    pid = os.fork()
    if pid == 0:  # the command
        code = 0
        try:
            os.environ.clear()
            os.environ.update(environment)  # the asking test's, as a subprocess would inherit it
            for fd, path in ((1, out_path), (2, err_path)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdin = io.StringIO()
            sys.argv = [module, *args]
            sys.modules.pop(module, None)  # imported here (gptjax.configs): run afresh, as `python -m` does
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""
_command_server = None


def run_command_forked(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root in a forked process (see COMMAND_SERVER): the exit status,
    stdout and stderr a user would see."""
    global _command_server
    if _command_server is None or _command_server.poll() is not None:
        _command_server = subprocess.Popen([sys.executable, "-c", COMMAND_SERVER], cwd=REPO_ROOT, text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           env=dict(os.environ, PYTHONPATH=REPO_ROOT), start_new_session=True)
    with tempfile.TemporaryDirectory() as directory:
        out, err = os.path.join(directory, "out"), os.path.join(directory, "err")
        environment = dict(os.environ, PYTHONPATH=REPO_ROOT)
        _command_server.stdin.write(json.dumps([module, list(args), environment, out, err]) + "\n")
        _command_server.stdin.flush()
        if not select.select([_command_server.stdout], [], [], timeout)[0]:
            # The server and the command it forked (its own process group), so the next call starts a fresh server
            # and nothing is left running.
            os.killpg(_command_server.pid, signal.SIGKILL)
            _command_server.wait()
            raise TimeoutError(f"python -m {module} {' '.join(args)} ran past {timeout} s")
        returncode = json.loads(_command_server.stdout.readline())
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess([module, *args], returncode, f_out.read(), f_err.read())


# The tests compare numbers to ~1e-5; on a GPU float32 matmuls default to TF32 (~1e-3), so ask for full precision.
# CPUs always compute float32 in full.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def small_model_config():
    """Two blocks of width 32 over GPT-2's real vocabulary: fast, but every code path of the full model."""
    return ModelConfig(vocab_size=50257, max_len=16, n_layer=2, n_head=4, d_model=32, d_ff=64)
