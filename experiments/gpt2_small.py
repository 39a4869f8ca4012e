"""GPT-2 small (124M) exactly: learned positions, tanh-GELU, biases, LayerNorm eps 1e-5, tied output, 1024 context.

Train it from scratch on Wikipedia, or fine-tune converted OpenAI weights:

    python -m gptjax.convert --hf path/to/gpt2 --workdir runs/gpt2-converted
    python -m gptjax.train --config experiments/gpt2_small.py --workdir runs/gpt2-ft \\
        --config.train.init_from=runs/gpt2-converted --config.train.steps=2000 --config.train.learning_rate=6e-5
"""

from gptjax.configs import base_config


def get_config():
    config = base_config()
    config.model.update(dict(max_len=1024, n_layer=12, n_head=12, d_model=768, d_ff=3072, pos_embedding="learned",
                             activation="gelu", use_bias=True, tie_embeddings=True, layer_norm_eps=1e-5))
    config.model.dtype = "bfloat16"  # on GPU/TPU; use --config.model.dtype=float32 on Apple Silicon

    config.data.source = "tfds"
    config.data.name = "wikipedia/20230601.en"
    config.data.eval_fraction = 0.001

    config.train.steps = 0
    config.train.flop_budget = 1e19  # ~10B tokens at ~1 GFLOP per token
    config.train.batch_size = 512  # 0.5M tokens per step, as GPT-2 / nanoGPT
    config.train.grad_accum_steps = 16
    config.train.learning_rate = 6e-4
    config.train.warmup_steps = 700
    config.train.log_every = 10
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    return config
