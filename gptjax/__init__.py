"""gptjax: a small, readable GPT-2-style language model trainer in JAX/Flax."""

__version__ = "0.1.0"
