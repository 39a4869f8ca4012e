"""The checks a training run makes before its first step: each refuses, in one line naming the fix, a run that
would fail later (after minutes of tokenizing or compiling) or silently train on something else than asked."""

import os

import ml_collections

from gptjax import checkpoints, input_pipeline
from gptjax.errors import UserError


def check_vocabulary(tokenizer_size: int, vocab_size: int) -> None:
    if tokenizer_size > vocab_size:
        raise UserError(f"the tokenizer has {tokenizer_size} tokens but model.vocab_size={vocab_size}; raise "
                        f"model.vocab_size")


def check_batch_layout(train: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    per_micro = train.batch_size // max(1, train.grad_accum_steps)
    if train.grad_accum_steps < 1 or train.batch_size % train.grad_accum_steps:
        raise UserError(f"train.batch_size={train.batch_size} is not divisible by "
                        f"train.grad_accum_steps={train.grad_accum_steps}")
    if per_micro % num_devices:
        raise UserError(f"each micro-batch has {per_micro} sequences, not divisible by the {num_devices} devices; "
                        f"change train.batch_size or train.grad_accum_steps")
    if train.batch_size % num_processes:
        raise UserError(f"train.batch_size={train.batch_size} is not divisible by {num_processes} processes")


def check_checkpoints_fit(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses, from the checkpoints' metadata alone, a workdir that holds a run of another model shape, and a
    train.init_from that has no checkpoint or one of another shape: before any data is read."""
    meta = checkpoints.latest_meta(workdir)
    if meta is not None:
        checkpoints.check_compatible(meta, config.model.to_dict(), workdir)
        if not config.train.accept_data_change:  # other text or batches: refused before it is tokenized
            check_same_data(meta, planned_batches(config, input_pipeline.cache_directory(config.data, workdir)), False)
        return
    init_from = config.train.init_from
    if not init_from:
        return
    meta = checkpoints.latest_meta(init_from)
    if meta is None:
        raise UserError(f"train.init_from={init_from!r} holds no checkpoint (looked in "
                        f"{checkpoints.checkpoint_dir(init_from)}); set train.init_from to the --workdir of a trained "
                        f"run or of one gptjax.convert wrote")
    checkpoints.check_compatible(meta, config.model.to_dict(), init_from)


def data_fingerprint(config: ml_collections.ConfigDict, cache: input_pipeline.TokenCache) -> dict:
    """What decides which tokens batch i holds; saved in checkpoints and compared on resume."""
    return {"token_cache": cache.fingerprint(), **planned_batches(config, cache.directory)}


def planned_batches(config: ml_collections.ConfigDict, cache_directory: str) -> dict:
    """The part of `data_fingerprint` known before tokenizing: the token cache's name (a hash of the data config and
    of the files it reads), the batch size, the window length and the seed."""
    return {"token_cache_name": os.path.basename(cache_directory), "train.batch_size": config.train.batch_size,
            "data.seq_len": config.data.seq_len, "train.seed": config.train.seed}


def check_same_data(meta: dict, fingerprint: dict, accept_change: bool) -> None:
    """Refuses to resume onto other data or batches (which would silently change what comes next), unless asked."""
    saved = meta.get("data_fingerprint") or fingerprint  # checkpoints from before this check have none
    differences = [f"{key} {saved[key]!r} there, {value!r} here" for key, value in fingerprint.items()
                   if saved.get(key, value) != value]  # (a key older checkpoints lack is not compared)
    if not differences:
        return
    what = "; ".join(differences)
    if not accept_change:
        raise UserError(f"the checkpoint at step {meta['step']} was trained on other data or batches ({what}), so "
                        f"resuming would change which tokens come next; rerun with the checkpoint's settings, or add "
                        f"--config.train.accept_data_change=true to go on with the new ones")
    print(f"note     | resuming at step {meta['step']} with other data or batches ({what}), as "
          f"train.accept_data_change asks")


def check_restored(meta: dict, config: ml_collections.ConfigDict, source: str, is_chief: bool,
                   fingerprint: dict | None = None, devices: int | None = None) -> None:
    """The checks of a checkpoint restored to train on (`source`'s: this workdir's to resume, or train.init_from's
    to fine-tune), whose model shape `checkpoints.restore_latest` checked: when resuming, the same data; notes on
    what is allowed to differ."""
    changed = checkpoints.allowed_differences(meta, config.model.to_dict())
    if changed and is_chief:
        print(f"note     | the checkpoint's parameters are used with {'; '.join(changed)} (these may change)")
    if fingerprint is None:  # fine-tuning: other data is the point
        return
    check_same_data(meta, fingerprint, config.train.accept_data_change)
    saved_as, here = meta.get("sharding"), {"train.sharding": config.train.sharding, "devices": devices}
    if saved_as and saved_as != here and is_chief:  # Orbax restored it into this run's layout
        print(f"note     | the checkpoint was saved {saved_as['train.sharding']} over {saved_as['devices']} device(s); "
              f"restored {config.train.sharding} over {devices}")


def check_evaluation_data(config: ml_collections.ConfigDict, cache: input_pipeline.TokenCache) -> bool:
    """Whether held-out evaluation runs; refuses, before the first step, a validation split too small for it."""
    train, data = config.train, config.data
    if not train.eval_every:
        return False
    if input_pipeline.holds_out_nothing(data):
        print("note     | data.eval_fraction=0 holds out no documents: no held-out evaluation in this run")
        return False
    validation_tokens = cache.num_tokens("validation")
    if cache.stream("validation").num_windows(data.seq_len) == 0:
        if data.eval_path:
            raise UserError(f"the validation split (data.eval_path={data.eval_path!r}) has {validation_tokens} tokens, "
                            f"fewer than one window of data.seq_len + 1 = {data.seq_len + 1}; hold out more text there")
        fixes = ["add more documents", "train without held-out evaluation (--config.data.eval_fraction=0)"]
        if data.source == "text" and data.txt_documents == "file":
            fixes.insert(0, "split .txt files into documents at blank lines (--config.data.txt_documents=blank_lines)")
        raise UserError(
            f"the validation split has {validation_tokens} tokens, fewer than one window of data.seq_len + 1 = "
            f"{data.seq_len + 1}: every {max(1, round(1 / data.eval_fraction))}th document is held out and the corpus "
            f"has {cache.manifest.get('documents', 0)} document(s). To fix it, {', '.join(fixes[:-1])} or "
            f"{fixes[-1]}")
    return True
