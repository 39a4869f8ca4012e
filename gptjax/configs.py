"""Experiment configs: every key gptjax reads, with its default and a one-line comment.

An experiment file (`experiments/m1.py`) defines `get_config()`, starting from `base_config()` and changing what it
needs. Entry points load it with ml_collections' config flags, so any key can be overridden on the command line:

    python -m gptjax.train --config experiments/m1.py --config.train.batch_size=32

The returned config is locked: assigning or overriding a key that does not exist is an error naming the key, and
`validate(config)` checks every value against its allowed range before any work starts.
`python -m gptjax.configs --config experiments/m1.py` lists every key with its value there and its comment.
"""

import importlib.util
import inspect
import math
import os
import sys
from typing import Any, Mapping

import ml_collections

from gptjax.errors import UserError, exit_on_user_error
from gptjax.model import ACTIVATIONS, ATTENTIONS, DTYPES, POS_EMBEDDINGS, REMAT_POLICIES, ModelConfig


def base_config() -> ml_collections.ConfigDict:
    """The defaults: the seed's model (about 20M parameters) and a training setup that works on one device."""
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    # Tokenizer vocabulary size (GPT-2 BPE: 50257); the embedding is padded to a multiple of vocab_multiple.
    model.vocab_size = 50257
    # Pad the vocabulary up to a multiple of this for faster matmuls; padded ids can never be predicted.
    model.vocab_multiple = 64
    # Context window in tokens (the longest sequence the model sees).
    model.max_len = 256
    # Number of transformer blocks.
    model.n_layer = 8
    # Attention heads per block; must divide d_model.
    model.n_head = 8
    # Width of the residual stream.
    model.d_model = 256
    # Hidden width of the MLP (4 x d_model, as GPT-2).
    model.d_ff = 1024
    # Position information: 'sinusoidal' (fixed, Vaswani et al.), 'learned' (GPT-2) or 'rope' (rotary).
    model.pos_embedding = "sinusoidal"
    # MLP nonlinearity: 'relu', 'gelu' (tanh approximation, as GPT-2) or 'gelu_exact' (erf, as Hugging Face's 'gelu').
    model.activation = "relu"
    # Biases in Dense and LayerNorm layers (GPT-2 has them).
    model.use_bias = True
    # Output layer shares the token embedding matrix (GPT-2 does); False gives a separate lm_head.
    model.tie_embeddings = True
    # Dropout on embeddings and residual branches; 0 is right for single-epoch pretraining.
    model.dropout = 0.0
    # Compute dtype: 'float32' (the Metal default) or 'bfloat16' (GPU/TPU); parameters stay float32.
    model.dtype = "float32"
    # LayerNorm epsilon (GPT-2: 1e-5).
    model.layer_norm_eps = 1e-5
    # Base of the rotary frequencies when pos_embedding = 'rope'.
    model.rope_base = 10000.0
    # Attention kernel for whole sequences (training, evaluation): 'xla' (jax.nn.dot_product_attention), 'chunked'
    # (a few sequences at a time, faster on CPU), 'cudnn' (cuDNN's fused attention on an NVIDIA GPU in bfloat16, else
    # xla after a note) or 'auto' (chunked on CPU, xla elsewhere). All compute the same function.
    model.attention = "auto"
    # Run the blocks as one Block under nn.scan (parameters stacked [n_layer, ...]): one compiled block instead of
    # n_layer, for deep models. Checkpoints and converted weights follow the layout; the numbers do not change.
    model.scan_layers = False
    # Recompute each block's activations in the backward pass instead of storing them: 'none', 'full' (store only
    # the block inputs) or 'dots_saveable' (keep the matmul outputs, recompute the rest). Same numbers, less memory.
    model.remat = "none"

    config.data = data = ml_collections.ConfigDict()
    # Where documents come from: 'text' (local files), 'tfds' (TensorFlow Datasets) or 'hf' (Hugging Face datasets).
    data.source = "text"
    # Dataset name for 'tfds' (e.g. 'wikipedia/20230601.en') or 'hf' (e.g. 'wikimedia/wikipedia').
    data.name = ""
    # Local files for 'text': a path or glob of .txt, .jsonl or .parquet files.
    data.path = ""
    # Field that holds the document text in TFDS / HF / jsonl / parquet records.
    data.text_field = "text"
    # Tokens per training sequence; follows model.max_len unless set (setting it leaves model.max_len alone).
    data.seq_len = model.get_ref("max_len") * 1  # a derived reference: a plain one would be shared both ways
    # Tokenizer: 'gpt2' (the offline GPT-2 BPE) or a Hugging Face tokenizer directory.
    data.tokenizer = "gpt2"
    # Split of the TFDS / HF dataset to read (held-out documents are carved out of it, see eval_fraction).
    data.split = "train"
    # Hugging Face dataset config name (e.g. '20231101.en' for wikimedia/wikipedia).
    data.hf_config = ""
    # Stream Hugging Face datasets instead of downloading them whole first.
    data.streaming = True
    # Local TFDS data directory ('' = TFDS's default, ~/tensorflow_datasets).
    data.data_dir = ""
    # How .txt files split into documents: 'file' (one per file) or 'blank_lines' (separated by empty lines).
    data.txt_documents = "file"
    # Invalid UTF-8 in the corpus: 'strict' stops with an error naming the file, 'replace' substitutes U+FFFD.
    data.utf8_errors = "strict"
    # Fraction of documents held out for validation (every round(1/fraction)-th document).
    data.eval_fraction = 0.005
    # Where the tokenized corpus is cached ('' = <workdir>/data); share it between runs of the same data.
    data.cache_dir = ""
    # Tokens per cache shard file (uint16 on disk: 2 bytes a token).
    data.shard_tokens = 50_000_000

    config.train = train = ml_collections.ConfigDict()
    # Optimizer steps; 0 derives them from flop_budget.
    train.steps = 1000
    # Start from the parameters of another run's latest checkpoint (a workdir, e.g. from gptjax.convert); '' = no.
    train.init_from = ""
    # Pause at this step (checkpoint saved) and exit; rerun the same command to go on. 0 = run to the end.
    train.stop_at_step = 0
    # Resume even if the token cache, batch_size, seq_len or seed differ from the checkpoint's (which tokens come
    # next then changes); by default such a resume is refused, naming the differences.
    train.accept_data_change = False
    # Training compute budget in FLOPs, used when steps = 0 (steps = budget / (FLOPs per token x tokens per step)).
    train.flop_budget = 0.0
    # Global batch size in sequences (split over all devices).
    train.batch_size = 32
    # Micro-batches per optimizer step: each device computes batch_size / grad_accum_steps sequences at a time.
    train.grad_accum_steps = 1
    # Seed for parameter init, data order and dropout.
    train.seed = 0
    # Peak learning rate, reached after warmup_steps.
    train.learning_rate = 1e-3
    # Linear warmup steps from learning_rate / warmup_steps up to learning_rate.
    train.warmup_steps = 100
    # The cosine schedule decays to learning_rate x min_lr_ratio at the last step.
    train.min_lr_ratio = 0.1
    # AdamW decoupled weight decay, applied to weight matrices only.
    train.weight_decay = 0.1
    # AdamW first-moment decay.
    train.b1 = 0.9
    # AdamW second-moment decay.
    train.b2 = 0.95
    # Output layer + loss in chunks of this many tokens with the gradient fused in; 0 = plain full logits;
    # -1 = auto: fused (1024) on CPU, where it is faster and saves memory; plain on GPU/TPU, where it is not faster,
    # and on Metal, where it was never measured.
    train.loss_chunk_tokens = -1
    # Data parallelism over several devices: 'shard_map' (per-device gradients, one written-out pmean per step),
    # 'jit' (XLA splits the step and places the collectives, once per micro-batch) or 'auto' (shard_map for
    # replicated state, jit for fsdp); the same numbers either way.
    train.parallelism = "auto"
    # Where parameters and optimizer state live: 'replicated' (a full copy on every device) or 'fsdp' (ZeRO-3: each
    # array split over the devices along its largest divisible dimension, gathered only where the step uses it;
    # compiled through jit, so the state and the step's own memory per device both shrink).
    train.sharding = "replicated"
    # Clip gradients to this global norm (0 disables clipping).
    train.grad_clip = 1.0
    # Record a jax.profiler trace of steps FIRST:LAST (e.g. '20:25', after compilation) in <workdir>/profile, for
    # TensorBoard's profile plugin or Perfetto (ui.perfetto.dev); '' records none.
    train.profile_steps = ""
    # Also log the metrics to this Weights & Biases project ('' = off, and wandb is not imported); the run is named
    # after the workdir and a resumed run continues it. WANDB_MODE=offline keeps it on disk (`wandb sync` later).
    train.wandb_project = ""
    # Print and log metrics every this many steps (the training loss logged is the mean over those steps).
    train.log_every = 10
    # Evaluate on held-out data every this many steps (0 disables).
    train.eval_every = 200
    # Save a checkpoint every this many steps (and always at the end).
    train.checkpoint_every = 500
    # Keep only the newest this many checkpoints.
    train.keep_checkpoints = 3
    # Held-out batches per evaluation (0 = the whole validation split).
    train.eval_steps = 20
    # Apply weight decay to the token/position embeddings too (nanoGPT does; they are matrices).
    train.decay_embeddings = True
    # Save checkpoints in the background while training continues.
    train.async_checkpoints = True
    # Peak FLOP/s of one device for MFU; 0 = datasheet value for known devices, else a measured matmul (measured once
    # per machine, JAX version and dtype, and kept in ~/.cache/gptjax/peak_flops.json).
    train.peak_flops = 0.0
    # Measure the matmul peak again instead of using the kept one (after a hardware or driver change).
    train.remeasure_peak = False
    # Keep compiled programs in ~/.cache/gptjax/jax (JAX's persistent compilation cache), so a rerun or a resume
    # does not compile them again; sample and evaluate use it too (off on jax-metal and before jax 0.10).
    train.compilation_cache = True
    # JAX platform: '' lets JAX choose (GPU > CPU); 'cpu', 'gpu', 'tpu' or 'METAL' force one.
    train.platform = ""
    # Multi-process runs: the coordinator's host:port ('' = single process), process count and this process's id.
    train.coordinator_address = ""
    # Number of processes in a multi-process run.
    train.num_processes = 1
    # This process's index in a multi-process run.
    train.process_id = 0

    return config


# ----------------------------------------------------------------------------------------------------------------
# Allowed values, checked by `validate` before any data is read or any model is built


def at_least(low):
    return (lambda v: v >= low), f">= {low}"


def in_interval(low, high, high_open=True):
    close = ")" if high_open else "]"
    return (lambda v: low <= v < high if high_open else low <= v <= high), f"in [{low}, {high}{close}"


POSITIVE = ((lambda v: v > 0), "> 0")
PROBABILITY = in_interval(0, 1)

NUMERIC_RANGES = {
    "model.vocab_size": at_least(1), "model.vocab_multiple": at_least(1), "model.max_len": at_least(1),
    "model.n_layer": at_least(1), "model.n_head": at_least(1), "model.d_model": at_least(1),
    "model.d_ff": at_least(1), "model.dropout": PROBABILITY, "model.layer_norm_eps": POSITIVE,
    "model.rope_base": POSITIVE,
    "data.seq_len": at_least(1), "data.eval_fraction": PROBABILITY, "data.shard_tokens": at_least(1),
    "train.steps": at_least(0), "train.stop_at_step": at_least(0), "train.flop_budget": at_least(0),
    "train.batch_size": at_least(1), "train.grad_accum_steps": at_least(1), "train.seed": at_least(0),
    "train.learning_rate": POSITIVE, "train.warmup_steps": at_least(0), "train.min_lr_ratio": in_interval(0, 1, False),
    "train.weight_decay": at_least(0), "train.b1": PROBABILITY, "train.b2": PROBABILITY,
    "train.loss_chunk_tokens": at_least(-1), "train.grad_clip": at_least(0), "train.log_every": at_least(1),
    "train.eval_every": at_least(0), "train.checkpoint_every": at_least(1), "train.keep_checkpoints": at_least(1),
    "train.eval_steps": at_least(0), "train.peak_flops": at_least(0), "train.num_processes": at_least(1),
    "train.process_id": at_least(0),
}
CHOICES = {
    "model.pos_embedding": POS_EMBEDDINGS, "model.activation": tuple(ACTIVATIONS), "model.dtype": tuple(DTYPES),
    "model.attention": ATTENTIONS, "model.remat": tuple(REMAT_POLICIES),
    "train.parallelism": ("auto", "shard_map", "jit"), "train.sharding": ("replicated", "fsdp"),
    "data.source": ("text", "tfds", "hf", "python_docs"),
    "data.txt_documents": ("file", "blank_lines"),
    "data.utf8_errors": ("strict", "replace"),
}
SOURCES_THAT_READ_PATH = ("text", "hf")
# Values a user may expect that gptjax refuses on purpose, with the reason and the fix.
REFUSED = {
    ("model.dtype", "float16"): "would need loss scaling (its small gradients underflow to 0), which gptjax does not "
                                "do; use model.dtype='bfloat16' (float32's range, the same speed on GPUs) or 'float32'",
}


def check_value(key: str, value) -> None:
    """Raises a UserError if `value` is outside the NUMERIC_RANGES or CHOICES entry of 'group.key' (if it has one)."""
    if key in NUMERIC_RANGES:
        ok, allowed = NUMERIC_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
            kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a number"
            raise UserError(f"{key}={value!r} is out of range: it must be {kind} {allowed}")
    if (key, value) in REFUSED:
        raise UserError(f"{key}={value!r} {REFUSED[key, value]}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{key}={value!r} is not one of {CHOICES[key]}")


def profile_steps(value: str) -> tuple[int, int] | None:
    """train.profile_steps 'FIRST:LAST' as (FIRST, LAST), or None for ''."""
    if not value:
        return None
    first, _, last = str(value).partition(":")
    if not (first.strip().isdigit() and last.strip().isdigit() and 1 <= int(first) <= int(last)):
        raise UserError(f"train.profile_steps={value!r} is not FIRST:LAST with 1 <= FIRST <= LAST (e.g. '20:25'); "
                        f"'' records no trace")
    return int(first), int(last)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises a UserError naming the first key whose value is out of its allowed range (or of the wrong type)."""
    for key in (*NUMERIC_RANGES, *CHOICES):
        group, name = key.split(".")
        check_value(key, config[group][name])
    train, data = config.train, config.data
    if train.process_id >= train.num_processes:
        raise UserError(f"train.process_id={train.process_id} must be below train.num_processes="
                        f"{train.num_processes}")
    if train.steps == 0 and train.flop_budget == 0:
        raise UserError("train.steps is 0, which derives the steps from train.flop_budget, but that is not set; "
                        "set train.steps or train.flop_budget")
    if train.sharding == "fsdp" and train.parallelism == "shard_map":
        raise UserError("train.parallelism='shard_map' takes every parameter whole into each device's step, so with "
                        "train.sharding='fsdp' the step would hold as much memory as replicated; use "
                        "train.parallelism='auto' or 'jit' (XLA then gathers each parameter where it is used and "
                        "reduce-scatters its gradient)")
    profile_steps(train.profile_steps)
    if data.seq_len > config.model.max_len:
        raise UserError(f"data.seq_len={data.seq_len} is longer than the context model.max_len="
                        f"{config.model.max_len}; lower data.seq_len or raise model.max_len")
    if data.path and data.source not in SOURCES_THAT_READ_PATH:
        raise UserError(f"data.path={data.path!r} is set but data.source={data.source!r} does not read it; add "
                        f"--config.data.source=text to train on those files")
    build_model_config(config.model)  # the shape rules between model keys


def scan_layers_supported() -> bool:
    """Whether flax's nn.scan runs here: flax 0.10.4 calls jax.api_util.debug_info, which jax 0.5.0 (the only jax
    jax-metal runs, so the Apple stack) does not have."""
    import jax.api_util

    return hasattr(jax.api_util, "debug_info")


def build_model_config(model: Mapping[str, Any]) -> ModelConfig:
    """The checked ModelConfig of an experiment's `model` group (a ConfigDict, or the dict a checkpoint records).

    Each value must be in its range of NUMERIC_RANGES / CHOICES, and the shape rules between keys must hold, or a
    UserError names the key and the fix.
    """
    fields = dict(model)
    unknown = sorted(set(fields) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"unknown model config key(s) {unknown}; valid keys are "
                        f"{sorted(ModelConfig.__dataclass_fields__)}")
    for name, value in fields.items():
        check_value(f"model.{name}", value)
    cfg = ModelConfig(**fields)
    if cfg.d_model % cfg.n_head:
        raise UserError(f"model.d_model={cfg.d_model} is not divisible by model.n_head={cfg.n_head}; "
                        f"pick n_head among the divisors of d_model")
    if cfg.pos_embedding == "rope" and cfg.head_dim % 2:
        raise UserError(f"rope needs an even head size, but d_model / n_head = {cfg.head_dim}")
    if cfg.pos_embedding == "sinusoidal" and cfg.d_model % 2:
        raise UserError(f"sinusoidal positions need an even d_model, got {cfg.d_model}")
    if cfg.scan_layers and not scan_layers_supported():
        import jax

        raise UserError(f"model.scan_layers=true needs flax's nn.scan, which cannot run on jax {jax.__version__} (the "
                        f"jax-metal stack: its flax calls jax.api_util.debug_info, missing there); use "
                        f"model.scan_layers=false (model.remat works without it)")
    return cfg


def key_comments() -> dict[str, str]:
    """'group.key' -> the comment above it in `base_config` (every key has one; a test makes sure)."""
    comments, above = {}, []
    for line in inspect.getsource(base_config).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
        elif stripped.startswith(("model.", "data.", "train.")) and " = " in stripped:
            comments[stripped.split(" = ")[0]] = " ".join(above)
            above = []
        else:
            above = []
    return comments


def describe_keys(config: ml_collections.ConfigDict) -> str:
    """Every key of `config` as `group.key = value    # comment`, group by group."""
    comments = key_comments()
    lines = []
    for group in ("model", "data", "train"):
        for name, value in config[group].items():
            key = f"{group}.{name}"
            lines.append(f"{key} = {value!r}\n    # {comments.get(key, '')}")
    return "\n".join(lines)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` from an experiment file; a missing file is a UserError that says so."""
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (a relative path is read from the current directory, {os.getcwd()})"
        raise UserError(f"config file {path!r} does not exist{where}; pass --config experiments/<name>.py from the "
                        f"repository's root, or the file's full path")
    spec = importlib.util.spec_from_file_location("_gptjax_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config() function")
    return module.get_config()


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises a UserError naming `key` and the valid keys beside it if `key` is not in the config."""
    node = config
    path = []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            where = ".".join(path) or "the config"
            raise UserError(f"unknown config key {key!r}: {where} has no {part!r}; valid keys there: {valid}")
        node = node[part]
        path.append(part)



def check_command_line(argv: list[str], default_config: str) -> None:
    """Checks `--config PATH` and every `--config.group.key=value` in argv before absl parses them.

    ml_collections reports a missing file or an unknown key with a long traceback; this turns both into one
    UserError line that names the problem, so entry points call it first.
    """
    path = default_config
    keys = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    config = load_config_file(path)
    for key in keys:
        check_key(config, key)


def define_config_flag(default_config: str):
    """The `--config` flag (plus `--config.group.key=value` overrides) of an entry point, checked first.

    Call it under `if __name__ == "__main__":`: ml_collections reads the command line as soon as the flag is
    defined, so the one-line checks of `check_command_line` must run before it.
    """
    from ml_collections import config_flags

    with exit_on_user_error():
        check_command_line(sys.argv[1:], default_config)
    return config_flags.DEFINE_config_file("config", default_config, "Experiment config file (get_config()).",
                                           lock_config=True)


if __name__ == "__main__":
    from gptjax import cli

    _CONFIG = define_config_flag("experiments/tiny.py")
    cli.run(lambda: print(describe_keys(_CONFIG.value)))
