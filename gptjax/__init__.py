"""gptjax: a small, readable GPT-2-style language model trainer in JAX/Flax."""

import os

# Quiet libraries, set before any of them is imported. TensorFlow is only here for tf.data: its C++ start-up lines
# (the oneDNN notice, which also triggers absl's "before InitializeLog" warning) are noise; so is transformers'
# "PyTorch was not found" advice, since gptjax only uses its tokenizers.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
