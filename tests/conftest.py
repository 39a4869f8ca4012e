"""Shared test setup: the repository root on sys.path, and small model configs that run fast on a laptop CPU."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from gptjax.model import ModelConfig  # noqa: E402


@pytest.fixture
def small_model_config():
    """Two blocks of width 32 over GPT-2's real vocabulary: fast, but every code path of the full model."""
    return ModelConfig(vocab_size=50257, max_len=16, n_layer=2, n_head=4, d_model=32, d_ff=64)
