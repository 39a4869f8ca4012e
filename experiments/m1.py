"""The seed's run: a 19.2M-parameter GPT trained on English Wikipedia with 1e17 FLOPs.

Chinchilla (Hoffmann et al. 2022) puts the compute-optimal model for C = 1e17 FLOPs near N ~ 29M parameters trained
on D ~ 20 N ~ 0.58B tokens (C ~ 6 N D). This run keeps the seed's smaller shape instead: 19.2M parameters (12.9M of
them the tied 50304 x 256 embedding), predicted by the paper's fit to lose only 0.039 nats against the optimum. At
6 N + 12 L T D ~ 122M FLOPs per token the budget buys ~0.82B tokens (~43 per parameter), ~25k steps of 128 x 256
tokens. On an M1 Max (10.4 TFLOP/s float32) that is ~8.9 hours at 30% MFU:
`python -m gptjax.scaling --config experiments/m1.py --device_flops 10.4e12 --mfu 0.3`.

    python -m gptjax.train --config experiments/m1.py --workdir runs/m1
"""

from gptjax.configs import base_config


def get_config():
    config = base_config()

    # The model keeps base_config's seed shape: 8 blocks, d_model 256, 8 heads, d_ff 1024, context 256,
    # sinusoidal positions, ReLU MLP, output tied to the embedding.

    config.data.source = "tfds"
    config.data.name = "wikipedia/20230601.en"
    config.data.text_field = "text"
    config.data.eval_fraction = 0.001  # ~6.7k held-out articles

    config.train.flop_budget = 1e17
    config.train.steps = 0  # derived from flop_budget at start
    config.train.batch_size = 128  # 32768 tokens per step
    config.train.grad_accum_steps = 4  # 32 sequences per micro-batch keeps the [B, T, V] logits at ~1.6 GB
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 1000
    config.train.min_lr_ratio = 0.1
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    return config
