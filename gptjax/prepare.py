"""`python -m gptjax.prepare --config experiments/m1.py --workdir runs/m1`: tokenize the corpus into the cache.

Training does this on its own the first time; running it first separates the long, resumable tokenizing pass from
training (as nanoGPT's prepare.py). Interrupt it at any time: a rerun continues after the last finished shard.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from gptjax import input_pipeline
from gptjax.configs import check_command_line
from gptjax.errors import exit_on_user_error

DEFAULT_CONFIG = "experiments/tiny.py"
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory; the cache goes to <workdir>/data "
                               "unless data.cache_dir is set.")


def main(argv):
    del argv
    with exit_on_user_error():
        cache = input_pipeline.prepare(_CONFIG.value, _WORKDIR.value)
        summary = {"cache": cache.directory, "documents": cache.manifest["documents"],
                   "train_tokens": cache.num_tokens("train"), "validation_tokens": cache.num_tokens("validation")}
        print(json.dumps(summary))


if __name__ == "__main__":
    with exit_on_user_error():
        check_command_line(sys.argv[1:], DEFAULT_CONFIG)
    app.run(main)
