"""An IsoFLOP sweep that runs offline in ~15 minutes on a laptop CPU: `python -m gptjax.sweep --config
experiments/sweep.py --workdir runs/sweep`.

Three budgets (2.5e11, 8e11 and 2.5e12 FLOPs) x five widths (d_model 16 to 64: one block each by the aspect rule
d_model / 64; heads of 8; d_ff = 4 d_model) on the Python reference manual that ships with Python (~134k training
tokens, 4 of its 79 topics held out). Tiny budgets on a tiny corpus: it shows the method and the machinery, not the
answer at 1e17.

README's "Is 20M right for 1e17 FLOPs? Measure it" gives the WikiText run measured for the figure there; for your own
text, `--config.data.source=text --config.data.path='my_corpus/*.txt' --config.data.eval_path=held_out.txt`.
"""

from gptjax.configs import sweep_config


def get_config():
    config = sweep_config()

    config.model.max_len = 64

    config.data.source = "python_docs"
    config.data.eval_fraction = 0.05  # 4 of the 79 topics are held out

    config.train.batch_size = 8
    config.train.learning_rate = 3e-3
    config.train.log_every = 10
    config.train.eval_steps = 0  # the whole held-out split (4.7k tokens), the same windows for every run
    config.train.checkpoint_every = 200

    config.sweep.budgets = (2.5e11, 8e11, 2.5e12)
    config.sweep.d_models = (16, 24, 32, 48, 64)
    config.sweep.head_dim = 8
    return config
