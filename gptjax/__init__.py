"""gptjax: a small, readable GPT-2-style language model trainer in JAX/Flax."""

import os

# TensorFlow is only here for tf.data; keep its start-up chatter out of the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
