"""Orbax checkpoints in <workdir>/checkpoints: save, restore everything to resume, or restore params alone.

Each step directory holds three items:
    params     the model parameters (all that sampling and evaluation read)
    opt_state  the optimizer state (only training reads it)
    meta       JSON: step, the full config, tokenizer, data position and the last metrics
Orbax writes a step into a temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the latest usable one. A checkpoint whose files are damaged anyway (missing, truncated, corrupt) is
skipped with a warning; any other failure to read one (permission denied, out of memory) stops with one line and
moves nothing (`is_damage`).
"""

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptjax.errors import UserError, check_workdir

ITEMS = ("params", "opt_state", "meta")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    """Starts saving (in the background where Orbax can); call manager.wait_until_finished() before exiting.
    `opt_state=None` saves the parameters alone (a converted model): training from it starts a fresh optimizer."""
    items = {"params": ocp.args.StandardSave(params)}
    if opt_state is None:
        meta = {**meta, "params_only": True}
    else:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)


def abstract(tree):
    """Shapes, dtypes and shardings of a tree of arrays (or of jax.eval_shape's output): what Orbax restores into."""
    # Replicated over a one-device mesh: restores the same on orbax 0.11 (the Apple stack) and current releases.
    default = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.local_devices()[:1], ("data",)),
                                         jax.sharding.PartitionSpec())

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default)

    return jax.tree.map(spec, tree)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


# Model keys that may differ between a checkpoint and the run that loads it: they change how the same parameters are
# computed with (compute dtype, dropout, attention kernel, rematerialisation), not the parameters' shapes or what
# they mean. So a float32 Mac checkpoint resumes in bfloat16 on a GPU, and a converted GPT-2 fine-tunes with dropout.
FREE_MODEL_KEYS = ("dtype", "dropout", "attention", "remat")


def check_compatible(meta: dict, model_config: dict, workdir: str) -> None:
    """Refuses a checkpoint whose parameters have other shapes or meaning than this run's model, naming every key
    that differs (those in FREE_MODEL_KEYS may differ: `allowed_differences`)."""
    refused = [text for key, text in model_differences(meta, model_config).items() if key not in FREE_MODEL_KEYS]
    if refused:
        raise UserError(f"the checkpoint in {checkpoint_dir(workdir)} is from another model shape "
                        f"({'; '.join(refused)}); use its config or a fresh --workdir")


def allowed_differences(meta: dict, model_config: dict) -> list[str]:
    """The differences in FREE_MODEL_KEYS between a checkpoint's model and this run's, which a run may change."""
    return [text for key, text in model_differences(meta, model_config).items() if key in FREE_MODEL_KEYS]


def model_differences(meta: dict, model_config: dict) -> dict[str, str]:
    from gptjax.model import ModelConfig

    defaults = {k: field.default for k, field in ModelConfig.__dataclass_fields__.items()}  # keys added since
    saved = {**defaults, **meta["config"]["model"]}
    return {k: f"model.{k}={saved.get(k)!r} there, {v!r} here" for k, v in sorted(model_config.items())
            if saved.get(k) != v}


def latest_meta(workdir: str) -> dict | None:
    """The meta of the newest checkpoint in `workdir` whose meta reads, or None (creating nothing): what a run can
    check against its config before any data is read. Damage is left to `restore_latest`, which says so."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    manager = make_manager(workdir, async_save=False)
    return next((meta for _, meta in readable_metas(manager, workdir, usable_steps(manager), quiet=True)), None)


def usable_steps(manager: ocp.CheckpointManager) -> list[int]:
    return sorted(manager.all_steps(), reverse=True)


def readable_metas(manager: ocp.CheckpointManager, workdir: str, steps: list[int], quiet: bool = False):
    """(step, meta) of each of `steps` whose meta reads, in order: the one place that decides which checkpoint is
    the newest readable one, for every command. A damaged meta is skipped (with a warning line unless `quiet`);
    any other failure to read one stops in one line and moves nothing."""
    for step in steps:
        try:
            meta = read_meta(manager, step)
        except Exception as e:
            check_is_damage(e, step, workdir)
            if not quiet:
                warn(f"checkpoint {step} in {checkpoint_dir(workdir)} is unreadable ({describe_error(damage_in(e))}); "
                     f"trying an older one")
            continue
        yield step, meta


def restore_latest(manager: ocp.CheckpointManager, workdir: str, model_config: dict | None, params_target,
                   opt_state_target=None, step: int | None = None) -> tuple[Any, Any, dict] | None:
    """Restores the newest loadable checkpoint (or `step`): (params, opt_state or None, meta), or None if none.

    A damaged checkpoint (`is_damage`) is skipped with one warning line, for an older one. `model_config=None`
    restores each checkpoint as the model it was saved from, `params_target(meta)` giving its parameters' shapes
    (sampling, evaluation, export); else the checkpoint must fit `model_config` and `params_target` is the tree to
    restore into. With `opt_state_target=None` only params and meta are read, never the optimizer state; opt_state
    is None too for a checkpoint of parameters alone (meta["params_only"], a converted model).
    """
    steps = usable_steps(manager)
    if step is not None:
        if step not in steps:
            raise UserError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; it has {sorted(steps)}")
        steps = [step]
    with late_read_errors_dropped():
        for candidate, meta in readable_metas(manager, workdir, steps):
            if model_config is None:
                target = params_target(meta)
            else:
                check_compatible(meta, model_config, workdir)
                target = params_target
            items = {"params": ocp.args.StandardRestore(abstract(target))}
            if opt_state_target is not None and not meta.get("params_only"):
                items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state_target))
            try:
                restored = manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:
                skip_if_damaged(e, candidate, workdir)  # one warning line; anything but damage is one error line
                continue
            return restored["params"], restored.get("opt_state"), meta
    if steps:
        raise UserError(f"none of the checkpoints {sorted(steps)} in {checkpoint_dir(workdir)} could be restored; "
                        f"move the directory away to start fresh")
    return None


# tensorstore's status codes for bytes that are missing, cut short or corrupt (it raises them as ValueError).
DAMAGE_STATUSES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE")


def is_damage(error: BaseException | None) -> bool:
    """Whether a restore failed because the checkpoint's files are incomplete or unreadable as data (missing,
    truncated, bad JSON or array bytes), the only failures that make an older checkpoint the right one to use.
    Anything else (permission denied, out of memory, a shape or dtype error, a bug) is not the checkpoint's fault."""
    return damage_in(error) is not None


def damage_in(error: BaseException | None) -> BaseException | None:
    """The error in `error`'s chain of causes that says the files are damaged (what a warning should quote), or None."""
    chain = error_chain(error)
    if any(isinstance(e, (PermissionError, MemoryError)) for e in chain):
        return None
    return next((e for e in reversed(chain)
                 if isinstance(e, (json.JSONDecodeError, FileNotFoundError, EOFError, UnicodeDecodeError))
                 or (isinstance(e, KeyError) and "not found in the checkpoint" in str(e))
                 or (type(e) is ValueError and str(e).startswith(DAMAGE_STATUSES))), None)


def error_chain(error: BaseException | None) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def skip_if_damaged(error: Exception, step: int, workdir: str) -> None:
    """Warns that checkpoint `step` is damaged and an older one is tried; raises a UserError that leaves it in
    place if `error` says anything else (a tree of other arrays, an unreadable file that is not damage)."""
    check_tree_matches(error, step, workdir)
    check_is_damage(error, step, workdir)
    warn(f"checkpoint {step} in {checkpoint_dir(workdir)} could not be restored ({describe_error(damage_in(error))}); "
         f"trying an older one")


def check_is_damage(error: Exception, step: int, workdir: str) -> None:
    """Raises a UserError that leaves checkpoint `step` where it is, unless `error` says it is damaged."""
    if not is_damage(error):
        raise UserError(f"checkpoint {step} in {checkpoint_dir(workdir)} could not be read ({describe_error(error)}), "
                        f"which does not look like damage, so it was left in place; fix the cause and rerun (move "
                        f"it away yourself to resume from an older one)") from None


def check_tree_matches(error: Exception, step: int, workdir: str) -> None:
    """Refuses in one line a checkpoint whose tree of arrays is not the one this code's model has (saved by another
    version of gptjax): not damage, so nothing is moved."""
    mismatch = next((str(e) for e in error_chain(error)
                     if isinstance(e, ValueError) and "tree structures do not match" in str(e)), None)
    if mismatch is None:
        return
    named = tree_differences(mismatch) or [" ".join(mismatch.split())[:160]]
    raise UserError(f"checkpoint {step} in {checkpoint_dir(workdir)} holds other arrays than this version of gptjax's "
                    f"model ({'; '.join(named[:4])}); it was left in place: read it with the gptjax version that saved "
                    f"it") from None


def tree_differences(mismatch: str) -> list[str]:
    """'KEY only in the model' / 'KEY only in the checkpoint' for each key that Orbax's tree mismatch error names.
    Current Orbax lists each key with "Source" (our tree) and "Target" (the checkpoint's), one of them MISSING; the
    Apple stack's Orbax prints a dict of Diff(lhs=ours, rhs=the checkpoint's), one of them None."""
    listed = re.findall(r"([^\s:]+):\s+- Source: (\S+).*?- Target: (\S+)", mismatch, flags=re.S)
    if listed:
        return [f"{key} only in the {'checkpoint' if ours == 'MISSING' else 'model'}"
                for key, ours, theirs in listed if "MISSING" in (ours, theirs)]
    starts = list(re.finditer(r"'([^']+)': Diff\(lhs=", mismatch))
    named = []
    for start, following in zip(starts, starts[1:] + [None]):
        diff = mismatch[start.end():following.start() if following else len(mismatch)]
        if diff.startswith("None"):
            named.append(f"{start.group(1)} only in the checkpoint")
        elif "rhs=None)" in diff:
            named.append(f"{start.group(1)} only in the model")
    return named


@contextlib.contextmanager
def late_read_errors_dropped():
    """Keeps a damaged checkpoint's report to gptjax's one warning line, for the block (a restore) only. When one
    array fails to read, Orbax stops while tensorstore is still reading the others, and each of those reads reports
    its own end: unraisable tracebacks ('Event loop is closed', the same damage again), asyncio's log of those
    failures ('exception was never retrieved') and Python's warning about reads never started ('coroutine ... was
    never awaited'), ~100 lines in all. Inside the block, those (and nothing else) are dropped; the block ends by
    collecting the reads Orbax abandoned, so their reports come while it is still in force, and a notebook that
    restored once still sees its own errors after."""
    previous_hook, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")

    def drop_late_reads(report) -> None:
        if not _is_late_read(report.exc_value):
            previous_hook(report)

    sys.unraisablehook = drop_late_reads
    asyncio_log.addFilter(_not_a_late_read)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)
            try:
                yield
            finally:
                gc.collect()
    finally:
        asyncio_log.removeFilter(_not_a_late_read)
        sys.unraisablehook = previous_hook


def _is_late_read(error: BaseException | None) -> bool:
    """A read that failed on the damage, found Orbax's event loop closed, or was cut off when Orbax gave up."""
    cut_off = any((isinstance(e, RuntimeError) and str(e) == "Event loop is closed")
                  or isinstance(e, (GeneratorExit, asyncio.CancelledError)) for e in error_chain(error))
    return cut_off or is_damage(error)


def _not_a_late_read(record: logging.LogRecord) -> bool:
    return not (record.exc_info and _is_late_read(record.exc_info[1]))


def describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def set_aside_newer(manager: ocp.CheckpointManager, workdir: str, restored_step: int) -> None:
    """Moves checkpoints newer than the one training resumed from (they failed to load) to
    <workdir>/checkpoints_damaged: kept for inspection, out of the way of the saves that will replace them."""
    newer = [step for step in manager.all_steps() if step > restored_step]
    if not newer:
        return
    if jax.process_index() == 0:  # one process moves them; the others wait for it (they share the directory)
        damaged = os.path.join(os.path.abspath(workdir), "checkpoints_damaged")
        os.makedirs(damaged, exist_ok=True)
        for step in newer:
            target = os.path.join(damaged, f"{step}-{int(time.time())}")
            os.replace(os.path.join(checkpoint_dir(workdir), str(step)), target)
            warn(f"moved the unloadable checkpoint {step} to {target}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("gptjax damaged checkpoints set aside")
    manager.reload()


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def missing_run_hint(workdir: str) -> str:
    """What to pass instead of a --workdir that holds no checkpoints: its parent when it is a run's checkpoints
    folder, the runs inside it when it is a folder of runs, else how to train one."""
    parent = os.path.dirname(os.path.abspath(workdir))
    if os.path.basename(os.path.abspath(workdir)) == "checkpoints" and os.path.isdir(checkpoint_dir(parent)):
        return f"{workdir} is the checkpoints folder of a run; pass the run itself: --workdir {parent}"
    names = os.listdir(workdir) if os.path.isdir(workdir) else []
    runs = sorted(name for name in names if os.path.isdir(checkpoint_dir(os.path.join(workdir, name))))
    if runs:
        shown = ", ".join(os.path.join(workdir, name) for name in runs[:5]) + (", ..." if len(runs) > 5 else "")
        return f"{workdir} holds runs, not checkpoints; pass one of them as --workdir: {shown}"
    return (f"no checkpoints in {checkpoint_dir(workdir)}; train first (python -m gptjax.train --workdir {workdir}) "
            f"or pass the --workdir of a trained run")


def load_for_inference(workdir: str, step: int | None = None):
    """(params, ModelConfig, meta) of the latest checkpoint in `workdir` (or `step`), without the optimizer state."""
    from gptjax.configs import build_model_config
    from gptjax.model import GPT

    check_workdir(workdir)
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise UserError(missing_run_hint(workdir))
    manager = make_manager(workdir, async_save=False)
    steps = usable_steps(manager)
    if not steps:
        raise UserError(f"no checkpoints in {checkpoint_dir(workdir)}; train first or pass another --workdir")
    if step is not None and step not in steps:
        raise UserError(f"there is no checkpoint for --step {step} in {checkpoint_dir(workdir)}; its steps are "
                        f"{sorted(steps)} (leave --step out for the latest)")

    def params_shape(meta: dict):  # the shapes of the parameters of the model `meta` was saved from
        model_config = build_model_config(meta["config"]["model"])
        tokens = jax.ShapeDtypeStruct((1, model_config.max_len), jax.numpy.int32)
        return jax.eval_shape(lambda t: GPT(model_config).init(jax.random.key(0), t)["params"], tokens)

    params, _, meta = restore_latest(manager, workdir, None, params_shape, step=step)
    return params, build_model_config(meta["config"]["model"]), meta
