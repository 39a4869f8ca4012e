"""`python -m gptjax.prepare --config experiments/m1.py --workdir runs/m1`: tokenize the corpus into the cache.

Training does this on its own the first time; running it first separates the long, resumable tokenizing pass from
training (as nanoGPT's prepare.py). Interrupt it at any time: a rerun continues after the last finished shard.
"""

import json

from absl import flags

from gptjax import cli, input_pipeline, interrupts
from gptjax.configs import validate
from gptjax.errors import check_workdir


def main():
    validate(_CONFIG.value)
    check_workdir(flags.FLAGS.workdir)
    try:
        with interrupts.handled():
            cache = input_pipeline.prepare(_CONFIG.value, flags.FLAGS.workdir)
    except KeyboardInterrupt:
        interrupts.exit_interrupted("Stopped: the token cache keeps what was tokenized; rerun the same command to "
                                    "resume")
    summary = {"cache": cache.directory, "documents": cache.manifest["documents"],
               "train_tokens": cache.num_tokens("train"), "validation_tokens": cache.num_tokens("validation")}
    print(json.dumps(summary))


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag("experiments/tiny.py")
    flags.DEFINE_string("workdir", "runs/default", "Run directory; the cache goes to <workdir>/data unless "
                        "data.cache_dir is set.")
    cli.run(main)
