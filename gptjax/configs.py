"""Experiment configs: every key gptjax reads, with its default and a one-line comment.

An experiment file (`experiments/m1.py`) defines `get_config()`, starting from `base_config()` and changing what it
needs. Entry points load it with ml_collections' config flags, so any key can be overridden on the command line:

    python -m gptjax.train --config experiments/m1.py --config.train.batch_size=32

The returned config is locked: assigning or overriding a key that does not exist is an error naming the key, and
`validate(config)` checks every value against its allowed range before any work starts.
`python -m gptjax.configs --config experiments/m1.py` lists every key with its value there and its comment.
"""

import importlib.util
import math
import os
from typing import Any, Mapping

import ml_collections

from gptjax.errors import UserError
from gptjax.model import ACTIVATIONS, ATTENTIONS, DTYPES, POS_EMBEDDINGS, REMAT_POLICIES, ModelConfig


# Every key gptjax reads, as 'group.key': (default, what it means). `base_config()` makes the config of the defaults
# from it, and `python -m gptjax.configs --config <file>` prints each key's value in an experiment beside its meaning.
KEYS = {
    "model.vocab_size": (50257, "Tokenizer vocabulary size (GPT-2 BPE: 50257); the embedding is padded to a multiple "
                                "of vocab_multiple."),
    "model.vocab_multiple": (64, "Pad the vocabulary up to a multiple of this for faster matmuls; padded ids can "
                                 "never be predicted."),
    "model.max_len": (256, "Context window in tokens (the longest sequence the model sees)."),
    "model.n_layer": (8, "Number of transformer blocks."),
    "model.n_head": (8, "Attention heads per block; must divide d_model."),
    "model.d_model": (256, "Width of the residual stream."),
    "model.d_ff": (1024, "Hidden width of the MLP (4 x d_model, as GPT-2)."),
    "model.pos_embedding": ("sinusoidal", "Position information: 'sinusoidal' (fixed, Vaswani et al.), 'learned' "
                                          "(GPT-2) or 'rope' (rotary)."),
    "model.activation": ("relu", "MLP nonlinearity: 'relu', 'gelu' (tanh approximation, as GPT-2) or 'gelu_exact' "
                                 "(erf, as Hugging Face's 'gelu')."),
    "model.use_bias": (True, "Biases in Dense and LayerNorm layers (GPT-2 has them)."),
    "model.tie_embeddings": (True, "Output layer shares the token embedding matrix (GPT-2 does); False gives a "
                                   "separate lm_head."),
    "model.dropout": (0.0, "Dropout on embeddings and residual branches; 0 is right for single-epoch pretraining."),
    "model.dtype": ("float32", "Compute dtype: 'float32' (the Metal default) or 'bfloat16' (GPU/TPU); parameters stay "
                               "float32."),
    "model.layer_norm_eps": (1e-05, "LayerNorm epsilon (GPT-2: 1e-5)."),
    "model.rope_base": (10000.0, "Base of the rotary frequencies when pos_embedding = 'rope'."),
    "model.attention": ("auto", "Attention kernel for whole sequences (training, evaluation): 'xla' "
                                "(jax.nn.dot_product_attention), 'chunked' (a few sequences at a time, faster on "
                                "CPU), 'cudnn' (cuDNN's fused attention on an NVIDIA GPU in bfloat16, else xla after "
                                "a note) or 'auto' (chunked on CPU, xla elsewhere). All compute the same function."),
    "model.scan_layers": (False, "Run the blocks as one Block under nn.scan (parameters stacked [n_layer, ...]): one "
                                 "compiled block instead of n_layer, for deep models. Checkpoints and converted "
                                 "weights follow the layout; the numbers do not change."),
    "model.remat": ("none", "Recompute each block's activations in the backward pass instead of storing them: 'none', "
                            "'full' (store only the block inputs) or 'dots_saveable' (keep the matmul outputs, "
                            "recompute the rest). Same numbers, less memory."),

    "data.source": ("text", "Where documents come from: 'text' (local files), 'tfds' (TensorFlow Datasets) or 'hf' "
                            "(Hugging Face datasets)."),
    "data.name": ("", "Dataset name for 'tfds' (e.g. 'wikipedia/20230601.en') or 'hf' (e.g. 'wikimedia/wikipedia')."),
    "data.path": ("", "Local files for 'text': a path or glob of .txt, .jsonl or .parquet files."),
    "data.eval_path": ("", "Local text files held out for validation (a path or glob, read as data.path is); when "
                           "set, they are the whole validation split, every document of data.source trains and "
                           "data.eval_fraction is not used."),
    "data.text_field": ("text", "Field that holds the document text in TFDS / HF / jsonl / parquet records."),
    "data.seq_len": (None, "Tokens per training sequence; follows model.max_len unless set (setting it leaves "
                           "model.max_len alone)."),
    "data.tokenizer": ("gpt2", "Tokenizer: 'gpt2' (the offline GPT-2 BPE) or a Hugging Face tokenizer directory."),
    "data.split": ("train", "Split of the TFDS / HF dataset to read (held-out documents are carved out of it, see "
                            "eval_fraction)."),
    "data.hf_config": ("", "Hugging Face dataset config name (e.g. '20231101.en' for wikimedia/wikipedia)."),
    "data.streaming": (True, "Stream Hugging Face datasets instead of downloading them whole first."),
    "data.data_dir": ("", "Local TFDS data directory ('' = TFDS's default, ~/tensorflow_datasets)."),
    "data.txt_documents": ("file", "How .txt files split into documents: 'file' (one per file) or 'blank_lines' "
                                   "(separated by empty lines)."),
    "data.utf8_errors": ("strict", "Invalid UTF-8 in the corpus: 'strict' stops with an error naming the file, "
                                   "'replace' substitutes U+FFFD."),
    "data.eval_fraction": (0.005, "Fraction of documents held out for validation (every round(1/fraction)-th "
                                  "document)."),
    "data.cache_dir": ("", "Where the tokenized corpus is cached ('' = <workdir>/data); share it between runs of the "
                           "same data."),
    "data.shard_tokens": (50_000_000, "Tokens per cache shard file (uint16 on disk: 2 bytes a token)."),

    "train.steps": (1000, "Optimizer steps; 0 derives them from flop_budget."),
    "train.init_from": ("", "Start from the parameters of another run's latest checkpoint (a workdir, e.g. from "
                            "gptjax.convert); '' = no."),
    "train.stop_at_step": (0, "Pause at this step (checkpoint saved) and exit; rerun the same command to go on. 0 = "
                              "run to the end."),
    "train.accept_data_change": (False, "Resume even if the token cache, batch_size, seq_len or seed differ from the "
                                        "checkpoint's (which tokens come next then changes); by default such a resume "
                                        "is refused, naming the differences."),
    "train.flop_budget": (0.0, "Training compute budget in FLOPs, used when steps = 0 (steps = budget / (FLOPs per "
                               "token x tokens per step))."),
    "train.batch_size": (32, "Global batch size in sequences (split over all devices)."),
    "train.grad_accum_steps": (1, "Micro-batches per optimizer step: each device computes batch_size / "
                                  "grad_accum_steps sequences at a time."),
    "train.seed": (0, "Seed for parameter init, data order and dropout."),
    "train.learning_rate": (0.001, "Peak learning rate, reached after warmup_steps."),
    "train.warmup_steps": (100, "Linear warmup steps from learning_rate / warmup_steps up to learning_rate."),
    "train.min_lr_ratio": (0.1, "The cosine schedule decays to learning_rate x min_lr_ratio at the last step."),
    "train.weight_decay": (0.1, "AdamW decoupled weight decay, applied to weight matrices only."),
    "train.b1": (0.9, "AdamW first-moment decay."),
    "train.b2": (0.95, "AdamW second-moment decay."),
    "train.loss_chunk_tokens": (-1, "Output layer + loss in chunks of this many tokens with the gradient fused in; 0 "
                                    "= plain full logits; -1 = auto: fused (1024) on CPU, where it is faster and "
                                    "saves memory; plain on GPU/TPU, where it is not faster, and on Metal, where it "
                                    "was never measured."),
    "train.parallelism": ("auto", "Data parallelism over several devices: 'shard_map' (per-device gradients, one "
                                  "written-out pmean per step), 'jit' (XLA splits the step and places the "
                                  "collectives, once per micro-batch) or 'auto' (shard_map for replicated state, jit "
                                  "for fsdp); the same numbers either way."),
    "train.sharding": ("replicated", "Where parameters and optimizer state live: 'replicated' (a full copy on every "
                                     "device) or 'fsdp' (ZeRO-3: each array split over the devices along its largest "
                                     "divisible dimension, gathered only where the step uses it; compiled through "
                                     "jit, so the state and the step's own memory per device both shrink)."),
    "train.grad_clip": (1.0, "Clip gradients to this global norm (0 disables clipping)."),
    "train.profile_steps": ("", "Record a jax.profiler trace of steps FIRST:LAST (e.g. '20:25', after compilation) in "
                                "<workdir>/profile, for TensorBoard's profile plugin or Perfetto (ui.perfetto.dev); "
                                "'' records none."),
    "train.wandb_project": ("", "Also log the metrics to this Weights & Biases project ('' = off, and wandb is not "
                                "imported); the run is named after the workdir and a resumed run continues it. "
                                "WANDB_MODE=offline keeps it on disk (`wandb sync` later)."),
    "train.log_every": (10, "Print and log metrics every this many steps (the training loss logged is the mean over "
                            "those steps)."),
    "train.eval_every": (200, "Evaluate on held-out data every this many steps (0 disables)."),
    "train.checkpoint_every": (500, "Save a checkpoint every this many steps (and always at the end)."),
    "train.keep_checkpoints": (3, "Keep only the newest this many checkpoints."),
    "train.eval_steps": (20, "Held-out batches per evaluation (0 = the whole validation split)."),
    "train.decay_embeddings": (True, "Apply weight decay to the token/position embeddings too (nanoGPT does; they are "
                                     "matrices)."),
    "train.async_checkpoints": (True, "Save checkpoints in the background while training continues."),
    "train.peak_flops": (0.0, "Peak FLOP/s of one device for MFU; 0 = datasheet value for known devices, else a "
                              "measured matmul (measured once per machine, JAX version and dtype, and kept in "
                              "~/.cache/gptjax/peak_flops.json)."),
    "train.remeasure_peak": (False, "Measure the matmul peak again instead of using the kept one (after a hardware or "
                                    "driver change)."),
    "train.compilation_cache": (True, "Keep compiled programs in ~/.cache/gptjax/jax (JAX's persistent compilation "
                                      "cache), so a rerun or a resume does not compile them again; sample and "
                                      "evaluate use it too (off on Apple GPUs and before jax 0.10; cut back to 2 "
                                      "GiB, the least recently read first, as each command starts)."),
    "train.platform": ("", "JAX platform: '' lets JAX choose (GPU > Apple GPU > CPU); 'cpu', 'gpu', 'tpu', 'METAL' "
                           "(jax-metal) or 'mps' (jax-mps) force one."),
    "train.coordinator_address": ("", "Multi-process runs: the coordinator's host:port ('' = single process), process "
                                      "count and this process's id."),
    "train.num_processes": (1, "Number of processes in a multi-process run."),
    "train.process_id": (0, "This process's index in a multi-process run."),
}


# The keys of `python -m gptjax.sweep` (gptjax/sweep.py): an experiment for a sweep is base_config() plus a `sweep`
# group (sweep_config()); its model, data and train groups are every run's, with the shape and budget set per run.
SWEEP_KEYS = {
    "sweep.budgets": ((1e12, 3e12, 1e13), "Training budgets C in FLOPs, one IsoFLOP profile each (at least two; ~3x "
                                          "apart as in Hoffmann et al. 2022's figure 3)."),
    "sweep.d_models": ((32, 48, 64, 96, 128), "Widths of the models trained at every budget, or one tuple of widths "
                                              "per budget (smallest budget first), as Hoffmann et al. moved the sizes "
                                              "with the budget: at least three each, spanning that budget's best; "
                                              "depth, heads and d_ff follow by the rules below."),
    "sweep.width_per_layer": (64, "Aspect rule: n_layer = d_model / width_per_layer, rounded half up, at least 1."),
    "sweep.head_dim": (16, "Width of each attention head: n_head = d_model / head_dim (it must divide every d_model "
                           "above it; a narrower model has one head); d_ff = 4 d_model."),
    "sweep.warmup_fraction": (0.05, "Linear warmup over this fraction of each run's steps; the cosine then ends at the "
                                    "run's last step (a longer schedule than the run biases the fit)."),
    "sweep.min_steps": (20, "Refuse a run with fewer optimizer steps than this (its budget is too small for its "
                            "size)."),
    "sweep.max_epochs": (8.0, "Refuse a run that would pass over the training text more often than this (a warning "
                              "above 4: repeated data biases the fit)."),
    "sweep.count": ("total", "The parameter count N the fit and figure use: 'total' (every parameter, as Hoffmann et "
                             "al.) or 'non_embedding' (without the token and position tables, as Kaplan et al. 2020); "
                             "the summary reports both."),
    "sweep.target_flops": (1e17, "The budget to extrapolate N_opt and D_opt to (the seed's run: 1e17)."),
    "sweep.bootstrap": (1000, "Bootstrap resamples of the runs for the fits' 80% intervals."),
    "sweep.expected_mfu": (0.5, "MFU assumed for the plan's projected time (of the measured matmul peak); the "
                                "progress line uses the runs' own speed once one has finished."),
}


def sweep_config() -> ml_collections.ConfigDict:
    """base_config() plus the `sweep` group of SWEEP_KEYS: what experiments/sweep.py starts from."""
    config = base_config()
    config.sweep = ml_collections.ConfigDict({key.split(".")[1]: default for key, (default, _) in SWEEP_KEYS.items()})
    return config


def base_config() -> ml_collections.ConfigDict:
    """The defaults in KEYS: the seed's model (about 20M parameters) and a training setup that works on one device."""
    config = ml_collections.ConfigDict()
    for group in ("model", "data", "train"):
        config[group] = ml_collections.ConfigDict(
            {key.split(".")[1]: default for key, (default, _) in KEYS.items() if key.startswith(group + ".")})
    # A derived reference: data.seq_len follows model.max_len until it is set, and setting it leaves max_len alone
    # (a plain reference would be shared both ways).
    config.data.seq_len = config.model.get_ref("max_len") * 1
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


def describe_keys(config: ml_collections.ConfigDict) -> str:
    """Every key of `config` as `group.key = value    # comment`, group by group."""
    lines = []
    meanings = {**KEYS, **SWEEP_KEYS}
    for group in ("model", "data", "train", "sweep"):
        for name, value in config.get(group, {}).items():
            key = f"{group}.{name}"
            lines.append(f"{key} = {value!r}\n    # {meanings[key][1]}")
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


if __name__ == "__main__":
    from gptjax import cli

    _CONFIG = cli.define_config_flag("experiments/tiny.py")
    cli.run(lambda: print(describe_keys(_CONFIG.value)))
