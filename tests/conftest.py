"""Shared test setup: the repository root on sys.path, and small model configs that run fast on a laptop CPU."""

import fcntl
import os
import sys
import tempfile
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
# optimisation level compiles them about twice as fast. It changes how fast the machine code runs, not what it
# computes (XLA's own graph passes, and so the memory plans the tests read, are the same). Set before JAX starts, so
# this process, the xdist workers and every command a test starts inherit it; speed is measured in benchmarks/.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".split()))

import jax  # noqa: E402

from gptjax.model import ModelConfig  # noqa: E402



def once_per_session(name: str, compute: Callable[[], str]) -> str:
    """compute()'s text, computed once per test session by whichever test asks first, on whichever xdist worker:
    kept in the session's cache directory, under a lock that makes a second asker wait for the first."""
    path = os.path.join(os.environ["GPTJAX_TEST_CACHE"], f"{name}.txt")
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            text = compute()
            with open(f"{path}.tmp", "w") as f:
                f.write(text)
            os.replace(f"{path}.tmp", path)
        with open(path) as f:
            return f.read()


# The tests compare numbers to ~1e-5; on a GPU float32 matmuls default to TF32 (~1e-3), so ask for full precision.
# CPUs always compute float32 in full.
jax.config.update("jax_default_matmul_precision", "highest")


# Longest first. pytest-xdist hands each worker a contiguous share of the tests, and a worker that runs out takes
# half of another's queue; a long test that starts near the end leaves the other core idle until it ends. So the
# modules whose tests take longest (by --durations) lead, then every other slow test, and the quick ones come last,
# where they fill the gaps. The order within a module is kept.
LONGEST_FIRST = ("test_tour.py", "test_train.py", "test_sharding.py", "test_benchmarks.py", "test_convert.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        slow = item.get_closest_marker("slow") is not None
        first = item.path.name in LONGEST_FIRST and slow
        return (0 if first else 1 if slow else 2, LONGEST_FIRST.index(item.path.name) if first else 0)

    items.sort(key=rank)


@pytest.fixture
def small_model_config():
    """Two blocks of width 32 over GPT-2's real vocabulary: fast, but every code path of the full model."""
    return ModelConfig(vocab_size=50257, max_len=16, n_layer=2, n_head=4, d_model=32, d_ff=64)
