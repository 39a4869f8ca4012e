"""What a training run is made of, built once before its first step: `set_up` checks the config and the workdir,
joins the other processes, prepares the token cache and plans the steps, and returns a `Run`, which the pieces of
gptjax/train.py share. Every check that can fail runs here, before anything is compiled.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from gptjax import checkpoints, hardware, input_pipeline, interrupts
from gptjax import train_step as steps_lib
from gptjax.configs import build_model_config, validate
from gptjax.console import describe_fsdp
from gptjax.errors import check_workdir
from gptjax.metrics import require_wandb
from gptjax.model import ModelConfig
from gptjax.preflight import check_batch_layout, check_checkpoints_fit, check_evaluation_data, check_vocabulary
from gptjax.scaling import planned_steps
from gptjax.tokenizer import load_text_codec


@dataclasses.dataclass
class Run:
    """What the pieces of the job share, built once by `set_up`. The train state is not here: it is passed in and
    out explicitly, as the train step does."""

    config: ml_collections.ConfigDict
    workdir: str
    model_config: ModelConfig
    cache: input_pipeline.TokenCache
    train_stream: input_pipeline.TokenStream  # the cache's splits, memory-mapped once for the whole run
    eval_stream: input_pipeline.TokenStream
    tokenizer: Any
    evaluate: bool  # whether held-out evaluation runs (see check_evaluation_data)
    total_steps: int
    mesh: Mesh
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule  # the optimizer's learning rate by step, for the logs
    state_sharding: Any  # a NamedSharding per leaf of the train state
    manager: Any  # the Orbax CheckpointManager of workdir
    is_chief: bool  # process 0, which prints, logs and samples

    @functools.cached_property
    def peak(self) -> tuple[float, str]:
        """(peak FLOP/s of one device, where it comes from), for MFU; measured once per machine (then kept) if no
        datasheet has it."""
        train = self.config.train
        return hardware.peak_flops_per_device(self.model_config.dtype, train.peak_flops, train.remeasure_peak)


def set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks the config and the workdir, joins the other processes, prepares the token cache, plans the steps.
    Every check that can fail runs here, before the first step."""
    validate(config)
    check_workdir(workdir)
    train, data = config.train, config.data
    hardware.select_platform(train.platform)
    hardware.maybe_initialize_distributed(train)
    hardware.check_platform(train.platform)
    hardware.use_compilation_cache(train.compilation_cache)
    interrupts.reassert()
    model_config = build_model_config(config.model)
    tokenizer = load_text_codec(data.tokenizer)
    check_vocabulary(len(tokenizer), model_config.vocab_size)
    mesh = steps_lib.data_mesh()
    check_batch_layout(train, mesh.size, jax.process_count())
    check_checkpoints_fit(config, workdir)
    if train.wandb_project:
        require_wandb(train.wandb_project)
    os.makedirs(workdir, exist_ok=True)
    interrupts.check()
    cache = input_pipeline.prepare_once(config, workdir)  # the first long step: all above is checked first
    train_stream, eval_stream = cache.stream("train"), cache.stream("validation")
    input_pipeline.check_enough_tokens(train_stream, data.seq_len, "train")
    evaluate = check_evaluation_data(config, cache)
    total_steps = planned_steps(config, model_config)
    optimizer = steps_lib.make_optimizer(train, total_steps)
    abstract_state = jax.eval_shape(lambda: steps_lib.create_train_state(model_config, optimizer, train.seed))
    if train.sharding == "fsdp" and jax.process_index() == 0:
        print(describe_fsdp(abstract_state.params, mesh.size))
    return Run(config=config, workdir=workdir, model_config=model_config, cache=cache,
               train_stream=train_stream, eval_stream=eval_stream, tokenizer=tokenizer,
               evaluate=evaluate, total_steps=total_steps, mesh=mesh, optimizer=optimizer,
               schedule=steps_lib.learning_rate_schedule(train, total_steps),
               state_sharding=steps_lib.state_sharding(abstract_state, mesh, train.sharding),
               manager=checkpoints.make_manager(workdir, keep=train.keep_checkpoints,
                                                async_save=train.async_checkpoints),
               is_chief=jax.process_index() == 0)
