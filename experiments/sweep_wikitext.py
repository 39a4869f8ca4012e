"""The IsoFLOP sweep measured for README's figure ("Is 20M right for 1e17 FLOPs? Measure it"): WikiText-103's first
2.5 MiB and WikiText-2's validation split as training text (~830k GPT-2 tokens), WikiText-2's test split held out,
three budgets ~3x apart (5e11, 1.5e12, 5e12 FLOPs), each with its own widths (d_model 4 to 80 at 5e11, 8 to 80
above: one block each by the aspect rule d_model / 64, heads of 8, d_ff = 4 d_model), sequences of 128 tokens, 4 a
batch. 22 runs, about 55 minutes on a 2-core CPU:

    python -m gptjax.sweep --config experiments/sweep_wikitext.py --workdir runs/sweep_wikitext \\
        --config.data.path=wikitext-103/train_first_2.5MiB.txt,wikitext-2/valid.txt \\
        --config.data.eval_path=wikitext-2/test.txt

At these budgets the 50,304-token embedding is most of every model, and the best width is small: a first try with
widths 32 to 192 (8 sequences a step) found the narrowest best at 2e12 and at 6e12 FLOPs, every profile falling
towards d_model 32 (no minimum inside), and at 5e11 and 1.5e12 d_model 16 was still the best of 16 to 80, so the
widths moved down to 4 and 8 where the budget is small enough to afford them. The budgets are small because narrow
models are slow per FLOP on a CPU: the softmax over 50,304 logits (not in 6N) costs as much per token whatever the
width, so a d_model 8 model trained at ~2.6k tokens/s, 4% MFU.
"""

from gptjax.configs import sweep_config


def get_config():
    config = sweep_config()

    config.model.max_len = 128

    config.data.source = "text"  # data.path and data.eval_path: give them on the command line (above)

    config.train.batch_size = 4
    config.train.learning_rate = 3e-3
    config.train.log_every = 10
    config.train.eval_steps = 200  # the first 200 x 4 windows of 128 held-out tokens (~103k), the same for every run
    config.train.checkpoint_every = 500

    config.sweep.budgets = (5e11, 1.5e12, 5e12)
    config.sweep.d_models = ((4, 8, 16, 24, 32, 48, 64, 80), (8, 16, 24, 32, 48, 64, 80), (8, 16, 24, 32, 48, 64, 80))
    config.sweep.head_dim = 8
    return config
