"""Training end to end on real text (the Python docs shipped with Python), with a model small enough for CI."""

import contextlib
import gc
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from gptjax import checkpoints
from gptjax import train_step as steps_lib
from gptjax.configs import build_model_config, load_config_file
from gptjax.errors import UserError
from gptjax.model import ModelConfig
from gptjax.train import train_and_evaluate
from tests.conftest import TEST_XLA_FLAGS, run_command_forked

pytestmark = pytest.mark.slow  # every test here trains, most in subprocesses: `pytest -m "not slow"` skips them

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, timeout=300):
    """`python -m module args` from the repository root, as a user runs it; output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO_ROOT))


def small_config(**train):
    config = load_config_file(os.path.join(REPO_ROOT, "experiments/tiny.py"))
    config.model.update(dict(max_len=16, n_layer=2, n_head=2, d_model=32, d_ff=64))
    # A stated peak: MFU needs one, and measuring the CPU's (seconds of matmuls) in every test run buys nothing
    # (tests/test_bad_inputs.py and benchmarks/ measure it).
    config.train.update(dict(steps=8, batch_size=4, warmup_steps=2, log_every=1, eval_every=0, eval_steps=2,
                             checkpoint_every=4, learning_rate=3e-3, async_checkpoints=False, peak_flops=1e14))
    config.train.update(train)
    return config


def command_config(**train):
    """The config `run_train_command` gives, as `train_and_evaluate` takes it: a baseline computed in this process
    (no second interpreter, TensorFlow import and compile) for runs of the command. small_config's other differences
    (a stated peak, eval_steps, synchronous saves) change no loss."""
    return small_config(warmup_steps=30, **train)  # tiny.py's warmup


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def restore_params(workdir, config):
    model_config = build_model_config(config.model)
    optimizer = steps_lib.make_optimizer(config.train, config.train.steps)
    state = steps_lib.create_train_state(model_config, optimizer, seed=123)
    manager = checkpoints.make_manager(workdir)
    params, _, meta = checkpoints.restore_latest(manager, workdir, config.model.to_dict(), state.params)
    return params, meta


def test_loss_falls_on_real_text(tmp_path):
    config = small_config(steps=40, eval_every=40, checkpoint_every=40, learning_rate=1e-2, warmup_steps=5)
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    losses = [m["loss"] for m in read_metrics(str(tmp_path))]
    # Where it starts depends on the text (tests/test_model.py: test_a_fresh_model_starts_near_log_vocab_...): 10.3
    # on Python 3.11's manual, 8.9 on Python 3.12's, whose first batch repeats more tokens.
    assert np.mean(losses[-5:]) < min(losses[0] - 1.5, 7.0)
    assert result["eval_loss"] < 8.0 and result["tokens_per_second"] > 0 and 0 < result["mfu"] < 1


def test_schedule_warms_up_then_decays_to_the_floor():
    config = small_config(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    schedule = steps_lib.learning_rate_schedule(config.train, 100)
    assert float(schedule(0)) == pytest.approx(1e-4)  # lr / warmup_steps: never 0 at step 0
    assert float(schedule(5)) == pytest.approx(1e-4 + 5 / 10 * (1e-3 - 1e-4))
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # cosine midpoint
    assert float(schedule(100)) == pytest.approx(1e-4)


def test_weight_decay_mask_covers_matrices_only():
    cfg = ModelConfig(max_len=8, n_layer=1, n_head=2, d_model=8, d_ff=16, pos_embedding="learned")
    params = steps_lib.create_train_state(cfg, steps_lib.make_optimizer(small_config().train, 10), 0).params
    mask = steps_lib.weight_decay_mask(params)
    assert mask["blocks_0"]["attn"]["qkv"]["kernel"] and mask["blocks_0"]["mlp"]["fc"]["kernel"]
    assert not mask["blocks_0"]["attn"]["qkv"]["bias"] and not mask["blocks_0"]["ln_1"]["scale"]
    assert not mask["ln_f"]["bias"]
    assert mask["token_embedding"]["embedding"] and mask["position_embedding"]["embedding"]
    no_embedding = steps_lib.weight_decay_mask(params, decay_embeddings=False)
    assert not no_embedding["token_embedding"]["embedding"] and no_embedding["blocks_0"]["mlp"]["proj"]["kernel"]


def test_gradient_accumulation_equals_one_bigger_batch():
    config = small_config()
    model_config = build_model_config(config.model)
    optimizer = steps_lib.make_optimizer(config.train, 10)
    state = steps_lib.create_train_state(model_config, optimizer, seed=0)
    batch = jax.random.randint(jax.random.key(5), (8, 17), 0, 50257)
    mesh = steps_lib.data_mesh(jax.devices()[:1])
    sharding = steps_lib.replicated_sharding(state, mesh)
    step = steps_lib.make_train_step(model_config, optimizer, mesh, sharding, seed=0, donate=False)
    one, metrics_one = step(state, batch.reshape(1, 8, 17))
    four, metrics_four = step(state, batch.reshape(4, 2, 17))
    np.testing.assert_allclose(metrics_one["loss"], metrics_four["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_one["grad_norm"], metrics_four["grad_norm"], rtol=1e-5)
    # Adam's first update is about lr x g / (|g| + eps), which turns float rounding of a gradient near eps into up to
    # ~1e-5 of parameter change; a wrong accumulation would be off by the update itself (lr = 1.5e-3 here).
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, atol=1e-4)


XLA_LEVEL_SCRIPT = """
import json, jax, numpy as np
from gptjax import train_step as steps_lib
from gptjax.configs import build_model_config, load_config_file
config = load_config_file("experiments/tiny.py")
config.model.update(dict(max_len=16, n_layer=2, n_head=2, d_model=32, d_ff=64))  # small_config's model
cfg = build_model_config(config.model)
opt = steps_lib.make_optimizer(config.train, 10)
state = steps_lib.create_train_state(cfg, opt, seed=0)
mesh = steps_lib.data_mesh(jax.devices()[:1])
step = steps_lib.make_train_step(cfg, opt, mesh, steps_lib.replicated_sharding(state, mesh), seed=0, donate=False)
batch = np.asarray(jax.random.randint(jax.random.key(1), (2, 4, 17), 0, 50257))  # 2 micro-batches of 4
plan = step.lower(state, batch).compile().memory_analysis()
losses = []
for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
plan = {"temp_bytes": plan.temp_size_in_bytes, "argument_bytes": plan.argument_size_in_bytes}
params = [float(np.abs(leaf).sum()) for leaf in jax.tree.leaves(state.params)]
print(json.dumps({"plan": plan, "losses": losses, "params": params}))
"""


def test_the_tests_xla_level_changes_no_memory_plan_and_only_float_rounding():
    """tests/conftest.py compiles every test's programs at XLA's cheapest LLVM level. The same train step at JAX's
    default level has the same memory plan, and after 3 steps the same losses and parameters to float32 rounding
    (measured: losses ~1e-7 apart, parameter sums up to ~6e-6, where Adam's first updates divide by |g| + eps),
    far inside the 1e-5 the tests compare numbers to."""
    runs = {}
    for level, flags in (("default", ""), ("the tests'", TEST_XLA_FLAGS)):
        result = subprocess.run([sys.executable, "-c", XLA_LEVEL_SCRIPT], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=REPO_ROOT))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[level] = json.loads(result.stdout.strip().splitlines()[-1])
    default, tests = runs["default"], runs["the tests'"]
    assert default["plan"] == tests["plan"]
    np.testing.assert_allclose(tests["losses"], default["losses"], rtol=1e-6)
    np.testing.assert_allclose(tests["params"], default["params"], rtol=1e-5)


def test_resume_gives_the_same_run(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_and_evaluate(small_config(), straight, progress=False)
    first = train_and_evaluate(small_config(stop_at_step=3), resumed, progress=False)  # pauses at step 3
    assert first["step"] == 3
    train_and_evaluate(small_config(), resumed, progress=False)  # the same command continues to step 8
    assert [m["step"] for m in read_metrics(resumed)] == list(range(1, 9))
    np.testing.assert_allclose([m["loss"] for m in read_metrics(resumed)],
                               [m["loss"] for m in read_metrics(straight)], rtol=1e-6)
    params_a, _ = restore_params(straight, small_config())
    params_b, meta = restore_params(resumed, small_config())
    assert meta["step"] == 8 and meta["data_position"]["step"] == 8
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)


def test_resume_onto_other_data_or_batches_is_refused_unless_accepted(tmp_path, capsys):
    train_and_evaluate(small_config(steps=2), str(tmp_path), progress=False)
    with pytest.raises(UserError, match=r"the checkpoint at step 2 was trained on other data or batches "
                                        r"\(train.batch_size 4 there, 8 here; train.seed 0 there, 1 here\), so "
                                        r"resuming would change which tokens come next; .*accept_data_change=true"):
        train_and_evaluate(small_config(steps=4, batch_size=8, seed=1), str(tmp_path), progress=False)
    other_text = small_config(steps=4)
    other_text.data.eval_fraction = 0.1  # another split of the corpus: another token cache, refused before making it
    with pytest.raises(UserError, match=r"token_cache_name 'python_docs-[0-9a-f]{12}-[0-9a-f]{12}' there, "
                                        r"'python_docs-[0-9a-f]{12}-[0-9a-f]{12}' here"):
        train_and_evaluate(other_text, str(tmp_path), progress=False)
    assert len(os.listdir(tmp_path / "data")) == 1  # nothing tokenized
    result = train_and_evaluate(small_config(steps=4, batch_size=8, accept_data_change=True), str(tmp_path),
                                progress=False)
    assert result["step"] == 4 and "as train.accept_data_change asks" in capsys.readouterr().out


def test_a_resume_after_the_text_files_changed_is_refused_before_tokenizing_unless_accepted(tmp_path, capsys):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in sorted(topics)[:30]:
        (corpus / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    config = small_config(steps=2)
    config.data.update(dict(source="text", path=str(corpus / "*.txt")))
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, progress=False)
    (corpus / "my_new_notes.txt").write_text(topics[sorted(topics)[40]], encoding="utf-8")
    config.train.steps = 4
    with pytest.raises(UserError, match=r"the checkpoint at step 2 was trained on other data or batches "
                                        r"\(token_cache_name 'text-[0-9a-f]{12}-[0-9a-f]{12}' there, "
                                        r"'text-[0-9a-f]{12}-[0-9a-f]{12}' here\)"):
        train_and_evaluate(config, workdir, progress=False)
    assert len(os.listdir(os.path.join(workdir, "data"))) == 1  # refused before tokenizing the new text
    capsys.readouterr()
    config.train.accept_data_change = True
    assert train_and_evaluate(config, workdir, progress=False)["step"] == 4
    out = capsys.readouterr().out
    assert "changed since it was tokenized into" in out and "(files 1 added: my_new_notes.txt)" in out
    assert "resuming at step 2 with other data or batches (token_cache " in out


def run_train_command(workdir, *overrides, **popen):
    command = [sys.executable, "-m", "gptjax.train", "--config", "experiments/tiny.py", f"--workdir={workdir}",
               "--config.model.max_len=16", "--config.model.n_layer=2", "--config.model.n_head=2",
               "--config.model.d_model=32", "--config.model.d_ff=64", "--config.train.batch_size=4",
               "--config.train.log_every=1", "--config.train.eval_every=0", *overrides]
    popen.setdefault("env", dict(os.environ, PYTHONPATH=REPO_ROOT))
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def test_compiled_programs_are_kept_on_disk_unless_turned_off(tmp_path):
    """train.compilation_cache=false writes nothing; sample keeps its programs, and a second call that loads them
    samples the same text."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    process = run_train_command(str(tmp_path / "run"), "--config.train.steps=2", "--config.train.peak_flops=1e12",
                                "--config.train.compilation_cache=false", env=env)
    assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    programs = tmp_path / "cache" / "gptjax" / "jax"
    assert not programs.exists()
    sample = [sys.executable, "-m", "gptjax.sample", f"--workdir={tmp_path / 'run'}", "--max_new_tokens=4"]
    first = subprocess.run(sample, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    if jax.__version_info__ < (0, 10):  # off before jax 0.10 (see hardware.use_compilation_cache)
        assert not programs.exists()
        return
    kept = sorted(os.listdir(programs))
    second = subprocess.run(sample, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and kept and first.stdout == second.stdout
    assert sorted(os.listdir(programs)) == kept  # loaded, not compiled and written again


COMPILE_PROGRAMS = """
import os, sys
import jax, jax.numpy as jnp
from gptjax import hardware
hardware.COMPILATION_CACHE_MAX_BYTES = int(sys.argv[1])
hardware.use_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # keep even these small programs
for n in range(1, 9):
    jax.jit(lambda x: jnp.tanh(x @ x.T) * n)(jnp.ones((8 * n, 16))).block_until_ready()
"""


def test_the_kept_compiled_programs_are_bounded_least_recently_used_first(tmp_path):
    """hardware.use_compilation_cache keeps the compilation cache within its bound as a command starts, deleting the
    least recently read programs first: eight small programs, kept whole under no bound, then cut to 10 KB by the
    next command, which keeps the newest."""
    if jax.__version_info__ < (0, 10):
        pytest.skip("the compilation cache is off before jax 0.10 (see hardware.use_compilation_cache)")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XDG_CACHE_HOME=str(tmp_path))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    programs = tmp_path / "gptjax" / "jax"
    unbounded = subprocess.run([sys.executable, "-c", COMPILE_PROGRAMS, str(2**40)], env=env, capture_output=True,
                               text=True, timeout=300)
    assert unbounded.returncode == 0, unbounded.stderr[-3000:]
    files = sorted(programs.iterdir(), key=lambda path: path.stat().st_mtime)
    for age, path in enumerate(reversed(files)):  # read in the order written, a day apart: the first is the oldest
        os.utime(path, (time.time() - 86400 * (age + 1),) * 2)
    sizes = [path.stat().st_size for path in files]
    assert len(files) >= 8 and sum(sizes) > 10000, sizes
    bounded = subprocess.run([sys.executable, "-c", "from gptjax import hardware; hardware.COMPILATION_CACHE_MAX_BYTES"
                              " = 10000; hardware.use_compilation_cache()"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert bounded.returncode == 0, bounded.stderr[-3000:]
    kept = sorted(programs.iterdir(), key=lambda path: path.stat().st_mtime)
    newest_that_fit = next(n for n in range(len(files), -1, -1) if sum(sizes[len(files) - n:]) <= 10000)
    assert kept == files[len(files) - newest_that_fit:] and newest_that_fit >= 1


def test_ctrl_c_saves_a_restorable_checkpoint(tmp_path):
    # SIGTERM (a scheduler's stop) takes the same path: test_a_signal_to_one_process_stops_both_at_the_same_step_...
    workdir = str(tmp_path)
    process = run_train_command(workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=100000")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not (
            os.path.exists(metrics_path) and len(open(metrics_path).readlines()) >= 3):
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Interrupted: saving step" in stderr
    params, meta = restore_params(workdir, small_config(steps=100000))
    assert meta["step"] >= 3 and np.isfinite(jax.tree.leaves(params)[0]).all()


class Output:
    """A subprocess's stdout and stderr, read as they come (threads), so a test can wait for a phase to begin."""

    def __init__(self, process):
        self.text = {"stdout": "", "stderr": ""}
        self.threads = [threading.Thread(target=self.read, args=(name, getattr(process, name))) for name in self.text]
        for thread in self.threads:
            thread.start()

    def read(self, name, stream):
        for chunk in iter(lambda: stream.read(1), ""):
            self.text[name] += chunk

    def wait_for(self, process, name, marker, timeout=240):
        deadline = time.time() + timeout
        while marker not in self.text[name] and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker in self.text[name] and process.poll() is None, self.text["stderr"][-3000:]

    def finish(self, process, timeout=240):
        process.wait(timeout=timeout)
        for thread in self.threads:
            thread.join()
        return self.text["stdout"], self.text["stderr"]


def test_ctrl_c_at_a_random_moment_of_training_stops_within_2_steps_of_the_step_in_progress(tmp_path):
    """A run whose step takes ~1 s (the tiny experiment at 32 rows) interrupted at a random moment: it saves at most
    DISPATCH_AHEAD steps after the one in progress (the progress bar, which counts finished steps, says which),
    exits 130, and the checkpoint is the step it names."""
    import random
    import re

    from gptjax.train import DISPATCH_AHEAD

    workdir = str(tmp_path / "run")
    process = subprocess.Popen(
        [sys.executable, "-m", "gptjax.train", "--config", "experiments/tiny.py", f"--workdir={workdir}",
         "--config.train.steps=100000", "--config.train.batch_size=32", "--config.train.checkpoint_every=100000",
         "--config.train.eval_every=0", "--config.train.log_every=100000", "--config.train.peak_flops=1e12"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    output = Output(process)

    def finished_steps():
        counts = re.findall(r"(\d+)/100000 \[", output.text["stderr"])
        return int(counts[-1]) if counts else 0

    try:
        deadline = time.time() + 240
        while finished_steps() < 3 and process.poll() is None and time.time() < deadline:  # compiled, and stepping
            time.sleep(0.05)
        time.sleep(random.uniform(0, 2))
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)  # what the bar had printed when the signal arrived (it reaches this process's pipe late)
        finished_at_signal = finished_steps()
        _, stderr = output.finish(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    saved = int(re.search(r"Interrupted: saving step (\d+) to", stderr).group(1))
    in_progress = finished_at_signal + 1
    assert in_progress - 1 <= saved <= in_progress + DISPATCH_AHEAD, (in_progress, saved)
    assert checkpoints.make_manager(workdir).all_steps() == [saved]


@pytest.mark.parametrize("phase", ["tokenizing", "compiling"])
def test_ctrl_c_before_the_first_step_stops_says_so_and_saves_nothing(tmp_path, phase):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus"  # ~9 MB of English to catch tokenizing (seconds); one part to reach the compile
    corpus.mkdir()
    for i in range(20 if phase == "tokenizing" else 1):
        (corpus / f"part{i:02d}.txt").write_text("\n\n".join(topics[name] for name in sorted(topics)))
    workdir = str(tmp_path / "run")
    process = run_train_command(workdir, "--config.data.source=text", f"--config.data.path={corpus}/*.txt",
                                "--config.data.txt_documents=blank_lines", "--config.train.peak_flops=1e12",
                                env=dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1"))
    output = Output(process)
    if phase == "tokenizing":
        output.wait_for(process, "stderr", "tokenizing: ")
    else:
        output.wait_for(process, "stdout", "workdir  |")  # the plan's last line: next comes the first step's compile
    process.send_signal(signal.SIGINT)
    stdout, stderr = output.finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert "Stopping at the next safe point" in stderr and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    if phase == "tokenizing":
        assert last == (f"Stopped before training: no checkpoint was saved in {workdir}/checkpoints, and an "
                        f"unfinished token cache resumes; rerun the same command to go on")
        [cache] = os.listdir(os.path.join(workdir, "data"))
        with open(os.path.join(workdir, "data", cache, "manifest.json")) as f:
            manifest = json.load(f)
        assert not manifest["complete"] and manifest["documents_done"] > 0  # what was tokenized is kept
    elif "saving step" in last:  # the first step finished before the loop saw the request: it is saved
        step = int(last.split("saving step ")[1].split()[0])
        assert checkpoints.make_manager(workdir).all_steps() == [step]
    else:
        assert last == (f"Interrupted at step 0: no checkpoint was saved yet in {workdir}/checkpoints; rerun the "
                        f"same command to resume")
        assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
            os.path.join(workdir, "checkpoints"))


def test_checkpoint_from_another_shape_is_a_clear_error(tmp_path):
    train_and_evaluate(small_config(steps=2), str(tmp_path), progress=False)
    other = small_config(steps=4)
    other.model.d_model = 64
    with pytest.raises(UserError, match=r"another model shape \(model.d_model=32 there, 64 here\)"):
        train_and_evaluate(other, str(tmp_path), progress=False)
    result = run_command_forked("gptjax.train", "--config", "experiments/tiny.py", f"--workdir={tmp_path}",
                                "--config.model.max_len=16", "--config.model.n_layer=2", "--config.model.n_head=2",
                                "--config.model.d_model=64", "--config.model.d_ff=64")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: the checkpoint in")


def test_the_logged_loss_is_the_mean_over_the_log_interval(tmp_path):
    every_step = str(tmp_path / "every_step")
    train_and_evaluate(small_config(steps=4, log_every=1, checkpoint_every=100), every_step, progress=False)
    train_and_evaluate(small_config(steps=4, log_every=2, checkpoint_every=100), str(tmp_path), progress=False)
    losses = [m["loss"] for m in read_metrics(every_step)]
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [2, 4]
    np.testing.assert_allclose([m["loss"] for m in read_metrics(str(tmp_path))],
                               [np.mean(losses[:2]), np.mean(losses[2:])], rtol=1e-6)


def test_an_mfu_above_100_percent_has_the_low_kept_peak_measured_again_keeping_the_best(tmp_path, monkeypatch):
    from gptjax import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, key = hardware.kept_peak_key("float32")
    hardware.write_json_atomically(path, {key: 1e6})  # as if measured while the machine was busy: far too low
    train_and_evaluate(small_config(steps=2, peak_flops=0.0, checkpoint_every=100), str(tmp_path / "run"),
                       progress=False)
    assert read_metrics(str(tmp_path / "run"))[-1]["mfu"] > 1  # (the first interval, compiling, counts none)
    assert hardware.read_json(path) == {key: 1e6, f"{key} | found low": True}
    measured, source = hardware.peak_flops_per_device("float32")  # measured again
    assert measured > 1e6 and source == "best measured matmul on cpu"
    assert hardware.read_json(path) == {key: measured}
    hardware.write_json_atomically(path, {key: 1e18, f"{key} | found low": True})  # higher than any CPU measures
    assert hardware.peak_flops_per_device("float32")[0] == 1e18  # the best seen is kept
    assert hardware.read_json(path) == {key: 1e18}


def test_profile_steps_writes_a_trace_of_the_train_step(tmp_path, capsys):
    train_and_evaluate(small_config(steps=4, profile_steps="2:3"), str(tmp_path), progress=False)
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1
    with open(traces[0], "rb") as f:
        assert b"train_step" in f.read()  # the compiled step, by name
    assert f"profile  | steps 2-3 traced in {tmp_path / 'profile'}" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"train.profile_steps='3' is not FIRST:LAST with 1 <= FIRST <= LAST"):
        train_and_evaluate(small_config(profile_steps="3"), str(tmp_path / "other"), progress=False)


def test_wandb_logs_the_same_metrics_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    """train.wandb_project logs every metrics.jsonl scalar to a wandb run (offline here: read back from the run's
    .wandb file); the resumed run has the same id, so wandb shows one run."""
    pytest.importorskip("wandb", reason="wandb is a test-only dependency: pip install -e .[test]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_and_evaluate(small_config(steps=2, log_every=1, wandb_project="gptjax-test"), str(tmp_path), progress=False)
    train_and_evaluate(small_config(steps=3, log_every=1, wandb_project="gptjax-test"), str(tmp_path), progress=False)
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2 and len({os.path.basename(run) for run in runs}) == 1, runs  # one run id, resumed
    logged = {}
    for run in runs:
        logged.update(wandb_history(run))
    for line in read_metrics(str(tmp_path)):
        assert logged[line["step"]]["loss"] == pytest.approx(line["loss"], rel=1e-6)
        assert logged[line["step"]]["learning_rate"] == pytest.approx(line["learning_rate"], rel=1e-6)
    assert sorted(logged) == [1, 2, 3]


def wandb_history(path: str) -> dict:
    """{step: {name: value}} of the history records in a .wandb file: a 7-byte header (':W&B', magic, version), then
    records in 32 KiB blocks, each chunk after a 7-byte header (crc32, little-endian length, type: full, first,
    middle, last), the record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    position, pieces, history = 7, b"", {}
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # too little room for a chunk header: the block's padding
            position += left_in_block
            continue
        length, kind = int.from_bytes(data[position + 4: position + 6], "little"), data[position + 6]
        if kind == 0:
            break
        pieces += data[position + 7: position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history[items.pop("_step")] = items
    return history


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    train_and_evaluate(small_config(steps=4, checkpoint_every=2), str(tmp_path), progress=False)
    latest = os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), "4", "params")
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    result = train_and_evaluate(small_config(steps=6, checkpoint_every=2), str(tmp_path), progress=False)
    err = capsys.readouterr().err
    assert "checkpoint 4 in" in err and "moved the unloadable checkpoint 4" in err
    assert result["step"] == 6
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]


def test_a_truncated_checkpoint_is_reported_in_one_line(tmp_path):
    """Array files cut short (a disk filled mid-copy): the command says so in one warning and uses the older
    checkpoint, without the tracebacks of the reads still in flight when the first one failed."""
    train_and_evaluate(small_config(steps=4, checkpoint_every=2), str(tmp_path), progress=False)
    arrays = os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), "4", "params", "ocdbt.process_0", "d")
    for name in os.listdir(arrays):
        os.truncate(os.path.join(arrays, name), 10)
    result = run_command_forked("gptjax.sample", "--workdir", str(tmp_path), "--max_new_tokens", "2")
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 2, result.stderr
    warning, header = result.stderr.strip().splitlines()
    assert warning.startswith(f"warning: checkpoint 4 in {tmp_path}/checkpoints could not be restored (ValueError: "
                              f"OUT_OF_RANGE: ") and warning.endswith("; trying an older one")
    assert header == f"[step 2 of {tmp_path}]"


def damage_checkpoint(step_dir: str, damage: str) -> None:
    if damage == "meta":  # the JSON cut short
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
            f.write('{"step": 4, "con')
    else:  # an item missing: a copy that stopped before the parameters
        shutil.rmtree(os.path.join(step_dir, "params"))


@pytest.mark.parametrize("damage", ["meta", "params"])
def test_every_command_that_reads_a_checkpoint_skips_a_damaged_newest_one(tmp_path, damage, capsys):
    """sample, evaluate, convert --to_hf and train.init_from each warn in one line naming the damaged checkpoint,
    and go on from the older one (as resuming does: test_corrupt_latest_checkpoint_falls_back_to_the_previous_one),
    moving nothing: only a resume, which overwrites it, sets a damaged checkpoint aside."""
    run = str(tmp_path / "run")
    config = small_config(steps=4, checkpoint_every=2)
    config.model.update(dict(pos_embedding="learned", activation="gelu"))  # a GPT-2 layout, for the export
    train_and_evaluate(config, run, progress=False)
    damage_checkpoint(os.path.join(checkpoints.checkpoint_dir(run), "4"), damage)
    warning = (f"warning: checkpoint 4 in {checkpoints.checkpoint_dir(run)} "
               f"{'is unreadable (JSONDecodeError' if damage == 'meta' else 'could not be restored (KeyError'}")

    def check_one_warning(stderr: str) -> None:
        lines = [line for line in stderr.splitlines() if line.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith(warning) and lines[0].endswith("trying an older one"), stderr
        assert "Traceback" not in stderr, stderr

    sampled = run_command_forked("gptjax.sample", "--workdir", run, "--max_new_tokens", "2")
    assert sampled.returncode == 0, sampled.stderr
    check_one_warning(sampled.stderr)
    assert f"[step 2 of {run}]" in sampled.stderr
    evaluated = run_command_forked("gptjax.evaluate", "--workdir", run, "--max_batches", "1")
    assert evaluated.returncode == 0, evaluated.stderr
    check_one_warning(evaluated.stderr)
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["step"] == 2
    exported = run_command_forked("gptjax.convert", "--workdir", run, "--to_hf", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    check_one_warning(exported.stderr)
    assert os.path.exists(tmp_path / "hf" / "config.json")
    capsys.readouterr()
    fine_tuned = small_config(steps=1, init_from=run)
    fine_tuned.model.update(dict(pos_embedding="learned", activation="gelu"))
    assert train_and_evaluate(fine_tuned, str(tmp_path / "fine_tuned"), progress=False)["step"] == 1
    check_one_warning(capsys.readouterr().err)
    assert sorted(os.listdir(checkpoints.checkpoint_dir(run))) == ["2", "4"]
    assert not os.path.exists(os.path.join(run, "checkpoints_damaged"))


def test_a_checkpoint_of_other_arrays_than_the_model_is_refused_in_one_line_and_left_in_place(tmp_path):
    """A tree of parameters this code's model does not have (saved by another version of gptjax) is not damage:
    one line naming the arrays that differ, and nothing moved."""
    train_and_evaluate(small_config(steps=2, checkpoint_every=2), str(tmp_path), progress=False)
    params, meta = restore_params(str(tmp_path), small_config())
    renamed = {("final_norm" if name == "ln_f" else name): value for name, value in params.items()}
    manager = checkpoints.make_manager(str(tmp_path))
    with pytest.raises(UserError, match=r"^checkpoint 2 in .* holds other arrays than this version of gptjax's model "
                                        r"\(final_norm only in the model; ln_f only in the checkpoint\); it was left "
                                        r"in place"):
        checkpoints.restore_latest(manager, str(tmp_path), meta["config"]["model"], renamed)
    assert manager.all_steps() == [2] and not os.path.exists(tmp_path / "checkpoints_damaged")


def test_a_restore_that_met_damage_leaves_no_error_filter_behind(tmp_path):
    """The late reports of a damaged restore are dropped during the restore only: after it, Python's unraisable
    hook and asyncio's log are as they were (a notebook that restored once still sees its own errors)."""
    train_and_evaluate(small_config(steps=4, checkpoint_every=2), str(tmp_path), progress=False)
    arrays = os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), "4", "params", "ocdbt.process_0", "d")
    for name in os.listdir(arrays):
        os.truncate(os.path.join(arrays, name), 10)
    reports = []
    hook, sys.unraisablehook = sys.unraisablehook, reports.append
    try:
        _, meta = restore_params(str(tmp_path), small_config())
        assert meta["step"] == 2 and sys.unraisablehook == reports.append
        time.sleep(1)
        gc.collect()
        assert reports == []  # the abandoned reads reported inside the restore, where they were dropped
    finally:
        sys.unraisablehook = hook
    # An error of the notebook's own, like those dropped during the restore, is logged again.
    own_error = ValueError("DATA_LOSS: a notebook's own read")
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 0, "Task exception was never retrieved", (),
                               (ValueError, own_error, None))
    assert logging.getLogger("asyncio").filter(record)


@contextlib.contextmanager
def without_root():
    """Root reads every file whatever its mode, so where the tests run as root (CI) the process takes nobody's user
    id for the block (and root's back after), to meet a permission error as a user would."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_newest_checkpoint_stops_in_one_line_and_stays_in_place():
    workdir = tempfile.mkdtemp()  # not under pytest's tmp_path, which only its owner may enter
    try:
        os.chmod(workdir, 0o755)
        train_and_evaluate(small_config(steps=4, checkpoint_every=2), workdir, progress=False)
        latest = os.path.join(checkpoints.checkpoint_dir(workdir), "4")
        for root, _, files in os.walk(os.path.join(latest, "params")):
            for name in files:
                os.chmod(os.path.join(root, name), 0)
        with without_root(), pytest.raises(UserError, match=r"checkpoint 4 in .* could not be read \(PermissionError: "
                                                            r".*\), which does not look like damage, so it was left "
                                                            r"in place"):
            train_and_evaluate(small_config(steps=6, checkpoint_every=2), workdir, progress=False)
        assert os.path.isdir(latest) and not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
        assert checkpoints.make_manager(workdir).all_steps() == [2, 4]
    finally:
        shutil.rmtree(workdir)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train_and_evaluate(small_config(steps=2, checkpoint_every=2), str(tmp_path), progress=False)
    with pytest.raises(UserError, match="became NaN/inf at step 3.*last good checkpoint is kept"):
        train_and_evaluate(small_config(steps=6, checkpoint_every=1, learning_rate=float("inf")), str(tmp_path),
                           progress=False)
    manager = checkpoints.make_manager(str(tmp_path))
    assert manager.latest_step() == 2


def test_unknown_config_key_on_the_command_line_is_one_line():
    result = run_module("gptjax.train", "--config.train.learning_rat=1", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: unknown config key 'train.learning_rat': train has no 'learning_rat'; "
                                     "valid keys there: " + str(sorted(small_config().train.keys())))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_processes(workdir, *overrides):
    """The two processes of one run; any still running when the block ends (a failed assertion, a timeout) is
    killed, so none is left behind holding its port and cores."""
    port = free_port()
    workers = [run_train_command(workdir, *overrides, f"--config.train.coordinator_address=localhost:{port}",
                                 "--config.train.num_processes=2", f"--config.train.process_id={i}")
               for i in range(2)]
    try:
        yield workers
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()


def test_a_signal_to_one_process_stops_both_at_the_same_step_and_fsdp_resumes_like_one_process(tmp_path):
    """Two processes (replicated, the default) stop together when one of them is signalled; two processes that each
    hold and save half of the state (fsdp) go on from their checkpoint; every step's loss is one process's."""
    multi = str(tmp_path / "multi")
    common = ["--config.train.steps=1000", "--config.train.checkpoint_every=1000",
              "--config.train.async_checkpoints=false"]
    metrics_path = os.path.join(multi, "metrics.jsonl")
    with two_processes(multi, *common) as workers:
        deadline = time.time() + 240
        while time.time() < deadline and all(w.poll() is None for w in workers) and not (
                os.path.exists(metrics_path) and len(open(metrics_path).readlines()) >= 3):
            time.sleep(0.2)
        assert all(w.poll() is None for w in workers), [w.communicate()[1][-2000:] for w in workers]
        workers[1].send_signal(signal.SIGTERM)  # the second process only
        outputs = [w.communicate(timeout=240) for w in workers]
    assert [w.returncode for w in workers] == [130, 130], [err[-2000:] for _, err in outputs]
    assert "2 process(es)" in outputs[0][0]
    saved = checkpoints.make_manager(multi).all_steps()
    assert len(saved) == 1 and saved[0] >= 3, saved  # one checkpoint, written by both processes together
    assert f"Interrupted: saving step {saved[0]}" in outputs[0][1]
    # The rerun, with fsdp, goes on from there with the losses of a run that was never interrupted.
    resume_to = saved[0] + 2
    with two_processes(multi, *common, f"--config.train.stop_at_step={resume_to}",
                       "--config.train.sharding=fsdp") as workers:
        outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "the checkpoint was saved replicated over 2 device(s); restored fsdp over 2" in outputs[0][0]
    assert checkpoints.make_manager(multi).all_steps() == [saved[0], resume_to]
    train_and_evaluate(command_config(steps=1000, checkpoint_every=1000, stop_at_step=resume_to),
                       str(tmp_path / "straight"), progress=False)
    losses = [m["loss"] for m in read_metrics(multi)]
    assert [m["step"] for m in read_metrics(multi)] == list(range(1, resume_to + 1))
    np.testing.assert_allclose(losses, [m["loss"] for m in read_metrics(str(tmp_path / "straight"))], rtol=1e-5)
