"""A minutes-on-a-laptop-CPU run: the quickstart and the end-to-end tests use it.

It trains a 2-block GPT on the Python reference manual that ships with Python itself (`pydoc_data`, ~134k GPT-2
tokens of English prose), so it needs no download. Point it at your own text with
`--config.data.source=text --config.data.path='my_corpus/*.txt'`.
"""

from gptjax.configs import base_config


def get_config():
    config = base_config()

    config.model.max_len = 64
    config.model.n_layer = 2
    config.model.n_head = 4
    config.model.d_model = 128
    config.model.d_ff = 512

    config.data.source = "python_docs"
    config.data.eval_fraction = 0.05  # 4 of the 79 topics are held out

    config.train.steps = 300
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 30
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    return config
