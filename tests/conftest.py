"""Shared test setup: the repository root on sys.path, and small model configs that run fast on a laptop CPU."""

import os
import sys
import tempfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# gptjax keeps measured peaks (and compiled programs) in the user's cache directory: the tests get their own, shared
# by every test and subprocess of the session, so they neither read nor change the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gptjax-test-cache-")

import jax  # noqa: E402

from gptjax.model import ModelConfig  # noqa: E402

# The tests compare numbers to ~1e-5; on a GPU float32 matmuls default to TF32 (~1e-3), so ask for full precision.
# CPUs always compute float32 in full.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def small_model_config():
    """Two blocks of width 32 over GPT-2's real vocabulary: fast, but every code path of the full model."""
    return ModelConfig(vocab_size=50257, max_len=16, n_layer=2, n_head=4, d_model=32, d_ff=64)
