"""The bad-input catalogue: every command, given a mistake a user makes, ends in exactly one `error: ...` line on
stderr that names the problem and the fix, exits with status 2, and leaves the user's files as they were."""

import json
import os
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from gptjax import hardware, input_pipeline
from gptjax.configs import base_config, build_model_config, KEYS, describe_keys, load_config_file, validate
from gptjax.errors import UserError
from gptjax.console import summary
from gptjax.stopping import save_on_interrupt
from gptjax.train import train_and_evaluate
from tests.conftest import run_command_forked
from tests.test_train import REPO_ROOT, read_metrics, run_module, small_config

TINY = os.path.join(REPO_ROOT, "experiments/tiny.py")

COMMAND_LINE_CASES = [
    # Non-positive or ill-typed numbers, for every kind of key: sizes, steps, intervals, fractions.
    ("gptjax.train", ["--config.train.batch_size=0"],
     "train.batch_size=0 is out of range: it must be an integer >= 1"),
    ("gptjax.train", ["--config.train.steps=-5"], "train.steps=-5 is out of range: it must be an integer >= 0"),
    ("gptjax.train", ["--config.train.eval_every=-1"], "train.eval_every=-1 is out of range"),
    ("gptjax.train", ["--config.train.checkpoint_every=0"], "train.checkpoint_every=0 is out of range"),
    ("gptjax.train", ["--config.train.learning_rate=-0.1"], "train.learning_rate=-0.1 is out of range: it must be a "
                                                           "number > 0"),
    ("gptjax.train", ["--config.train.batch_size=abc"], "flag --config.train.batch_size=abc: invalid literal"),
    ("gptjax.train", ["--config.train.steps=1e3"],
     "flag --config.train.steps=1e3: invalid literal for int() with base 10: '1e3' (an integer: write "
     "--config.train.steps=1000)"),
    # Pairings gptjax cannot run as the words promise.
    ("gptjax.train", ["--config.model.dtype=float16"], "model.dtype='float16' would need loss scaling"),
    ("gptjax.train", ["--config.train.sharding=fsdp", "--config.train.parallelism=shard_map"],
     "train.parallelism='shard_map' takes every parameter whole into each device's step"),
    ("gptjax.prepare", ["--config.data.eval_fraction=1.5"], "data.eval_fraction=1.5 is out of range: it must be a "
                                                            "number in [0, 1)"),
    ("gptjax.prepare", ["--config.data.seq_len=0"], "data.seq_len=0 is out of range"),
    ("gptjax.sample", ["--num_samples=abc"], "flag --num_samples=abc"),
    ("gptjax.sample", ["--head_dtype=float16"], "flag --head_dtype=float16: value should be one of"),
    ("gptjax.evaluate", ["--batch_size=0"], "--batch_size=0 must be >= 1"),
    ("gptjax.evaluate", ["--max_batches=-1"], "--max_batches=-1 must be >= 0"),
    ("gptjax.scaling", ["--flops", "-1"], "--flops=-1.0 must be a positive number"),
    ("gptjax.scaling", ["--flops", "1e17", "--mfu", "2"], "--mfu=2.0 must be in (0, 1]"),
    ("gptjax.scaling", ["--flops", "lots"], "flag --flops=lots: could not convert string to float: 'lots'"),
    ("benchmarks.run", ["--config", TINY, "--batch_size", "0"], "--batch_size=0 must be >= 1"),
    ("benchmarks.input_pipeline", ["--steps", "0"], "--steps=0 must be >= 1"),
    ("benchmarks.layers", ["--config", TINY, "--loss_chunk_tokens", "0,big"],
     "--loss_chunk_tokens=0,big must be whole numbers >= -1"),
    ("benchmarks.layers", ["--config", TINY, "--layouts", "scan"], "--layouts='scan' is not 'all' or a list like"),
    ("benchmarks.layers", ["--config", TINY, "--layouts", "unrolled:none,unrolled:some"],
     "model.remat='some' is not one of"),
    ("benchmarks.layers", ["--config", TINY, "--attention", "xla,flash"], "model.attention='flash' is not one of"),
    # Arguments in the wrong form or place.
    ("gptjax.train", ["experiments/tiny.py"],
     "unexpected argument 'experiments/tiny.py': options are passed as --name=value; did you mean --config"),
    ("gptjax.train", ["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'; see --help"),
    ("gptjax.train", ["--train.steps=10"],
     "Unknown command line flag 'train.steps' (did you mean --config.train.steps?)"),
    ("gptjax.train", ["--config.data.path=my_corpus.txt"],
     "data.path='my_corpus.txt' is set but data.source='python_docs' does not read it; add "
     "--config.data.source=text"),
    ("gptjax.configs", ["--config", "experiments/nope.py"], f"config file 'experiments/nope.py' does not exist (a "
                                                            f"relative path is read from the current directory, "
                                                            f"{REPO_ROOT})"),
    ("gptjax.train", ["--config.model.scan_layers=yes"],
     "--config.model.scan_layers=yes is not a boolean: use true or false"),
    ("gptjax.plot", ["--workdir=/no/such/run"], "--workdir '/no/such/run' does not exist"),
    ("gptjax.convert", ["--hf=/no/such/dir", "--workdir=/tmp/unused"], "--hf '/no/such/dir' is not a directory"),
]


def assert_one_error_line(result, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: " + expected), result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("module, args, expected", COMMAND_LINE_CASES,
                         ids=[f"{m}-{' '.join(a)}" for m, a, _ in COMMAND_LINE_CASES])
def test_command_line_mistakes_are_one_line(module, args, expected):
    assert_one_error_line(run_command_forked(module, *args), expected)


@pytest.mark.slow
@pytest.mark.parametrize("module, args", [
    ("gptjax.train", []), ("gptjax.prepare", []), ("gptjax.sample", []), ("gptjax.evaluate", []),
    ("gptjax.plot", []), ("gptjax.convert", ["--hf=experiments"]),
])
def test_a_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path, module, args):
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    assert_one_error_line(run_command_forked(module, f"--workdir={path}", *args),
                          f"--workdir '{path}' is a file, not a directory")
    assert path.read_text() == "my notes"


@pytest.mark.slow
def test_help_exits_0_and_shows_config_and_how_to_list_the_keys():
    result = run_module("gptjax.train", "--help", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--config:" in result.stdout and "--workdir:" in result.stdout
    assert "python -m gptjax.configs --config experiments/tiny.py" in result.stdout
    listing = run_command_forked("gptjax.configs", "--config", "experiments/m1.py")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "train.flop_budget = 1e+17\n    # Training compute budget in FLOPs" in listing.stdout


def test_every_key_is_listed_with_its_comment():
    config = load_config_file(TINY)
    assert [f"{group}.{name}" for group in ("model", "data", "train") for name in config[group]] == sorted(
        KEYS, key=lambda key: (("model", "data", "train").index(key.split(".")[0]), key))
    for key, (_, meaning) in KEYS.items():
        assert meaning.endswith(".") and "  " not in meaning, key
    assert "model.n_layer = 2\n    # Number of transformer blocks." in describe_keys(config)


@pytest.mark.parametrize("key, value, message", [
    ("train.process_id", 2, "train.process_id=2 must be below train.num_processes=1"),
    ("train.steps", 0, "train.steps is 0, which derives the steps from train.flop_budget, but that is not set"),
    ("data.seq_len", 300, "data.seq_len=300 is longer than the context model.max_len=256"),
    ("data.txt_documents", "lines", r"data.txt_documents='lines' is not one of \('file', 'blank_lines'\)"),
    ("model.dropout", 1.0, r"model.dropout=1.0 is out of range: it must be a number in \[0, 1\)"),
    ("train.b2", float("nan"), "train.b2=nan is out of range"),
])
def test_config_values_are_checked_before_any_work(key, value, message):
    config = base_config()
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(UserError, match=message):
        validate(config)


@pytest.mark.slow
def test_a_single_text_file_is_refused_before_the_first_step_with_fixes_that_work(tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text("\n\n".join(open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read().split("\n\n")))
    config = small_config(steps=2, eval_every=2)
    config.data.update(dict(source="text", path=str(corpus)))
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=r"the validation split has 0 tokens.*data.txt_documents=blank_lines.*"
                                        r"data.eval_fraction=0"):
        train_and_evaluate(config, str(workdir), progress=False)
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()
    # Each fix the message names works.
    for fix in (dict(txt_documents="blank_lines", eval_fraction=0.5), dict(eval_fraction=0.0)):
        fixed = small_config(steps=2, eval_every=2)
        fixed.data.update(dict(source="text", path=str(corpus), **fix))
        result = train_and_evaluate(fixed, str(tmp_path / str(len(fix))), progress=False)
        assert result["step"] == 2 and ("eval_loss" in result) == (fix["eval_fraction"] > 0)


@pytest.mark.slow
def test_a_finished_run_says_so_and_how_to_extend_it(tmp_path, capsys):
    train_and_evaluate(small_config(steps=2), str(tmp_path), progress=False)
    capsys.readouterr()
    result = train_and_evaluate(small_config(steps=2), str(tmp_path), progress=False)
    assert "already at step 2 of 2: nothing to do. To train longer, raise --config.train.steps" in \
        capsys.readouterr().out
    assert result["step"] == 2 and result["loss"] == read_metrics(str(tmp_path))[-1]["loss"]
    text = summary(result, str(tmp_path))
    assert text.startswith("done     | step 2 of 2 | train loss ")
    assert f"python -m gptjax.sample --workdir {tmp_path}" in text and "gptjax.plot" in text


@pytest.mark.slow
def test_an_interrupt_after_a_save_says_which_checkpoint_a_rerun_resumes(tmp_path, capsys):
    from gptjax import checkpoints
    from gptjax import train_step as steps_lib

    train_and_evaluate(small_config(steps=2), str(tmp_path), progress=False)
    config = small_config(steps=2)
    optimizer = steps_lib.make_optimizer(config.train, 2)
    state = steps_lib.create_train_state(build_model_config(config.model), optimizer, seed=0)
    manager = checkpoints.make_manager(str(tmp_path))
    state = state.replace(step=jax.numpy.asarray(2, jax.numpy.int32))
    save_on_interrupt(state, 0, manager, save=None, last={}, workdir=str(tmp_path), is_chief=True)
    assert (f"Interrupted at step 2: the latest checkpoint is step 2 in {checkpoints.checkpoint_dir(str(tmp_path))}; "
            f"rerun the same command to resume") in capsys.readouterr().err


def test_an_offline_tfds_download_fails_fast_and_leaves_nothing_behind(tmp_path, monkeypatch):
    with socket.socket() as s:  # a local port nobody listens on: refused at once, like an offline machine
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setattr(input_pipeline, "TFDS_DOWNLOAD_HOST", ("127.0.0.1", closed_port))
    config = base_config()
    config.data.update(dict(source="tfds", name="wikipedia/20230601.en", data_dir=str(tmp_path / "tfds")))
    with pytest.raises(UserError, match=r"TFDS dataset 'wikipedia/20230601.en' is not prepared in .* and cannot be "
                                        r"downloaded: 127.0.0.1 is unreachable"):
        input_pipeline.prepare(config, str(tmp_path / "work"), progress=False)
    assert not (tmp_path / "tfds").exists()


@pytest.mark.slow
def test_an_offline_hub_dataset_fails_at_once_in_one_line(tmp_path):
    """Offline (the Hub refused, as on a machine without network), a Hub dataset that is not in the cache fails in one
    line without Hugging Face's retries, in a fresh process as a user meets it (huggingface_hub reads its offline
    switch when it is imported)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    script = (f"from gptjax import input_pipeline, cli\n"
              f"from gptjax.configs import base_config\n"
              f"input_pipeline.HF_HOST = ('127.0.0.1', {closed_port})\n"
              f"config = base_config()\n"
              f"config.data.update(dict(source='hf', name='wikimedia/wikipedia', hf_config='20231101.en'))\n"
              f"cli.run(lambda: next(iter(input_pipeline.hf_documents(config.data))))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HOME=str(tmp_path / "hf")))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Hugging Face dataset 'wikimedia/wikipedia' is not in the local cache and 127.0.0.1 is unreachable; go "
        "online once (the first run downloads it) or train on local files (--config.data.source=text "
        "--config.data.path=...)"]


def test_mfu_above_one_says_the_peak_was_measured_low():
    assert hardware.format_mfu(0.42) == "42.0%"
    assert hardware.format_mfu(1.17) == ("over 100%: the peak it divides by is low (measured again next run, or set "
                                         "train.peak_flops)")
    best = hardware.peak_from_seconds({100: 2e-3, 200: 1e-3})
    assert best == 2 * 200**3 / 1e-3  # the best size wins
    assert hardware.measure_matmul_flops(sizes=(64, 128), repeats=2) > 0


def test_a_measured_peak_is_kept_per_machine_and_measured_again_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured, source = hardware.peak_flops_per_device("float32")
    assert measured > 0 and source == "best measured matmul on cpu"
    path = tmp_path / "gptjax" / "peak_flops.json"
    (key, value), = json.loads(path.read_text()).items()
    assert value == measured and key.endswith(f"| cpu | jax {jax.__version__} | float32")
    path.write_text(json.dumps({key: 1.5e9}))  # a number no measurement gives: proves the kept one is read
    assert hardware.peak_flops_per_device("float32") == (1.5e9, f"measured matmul on cpu, kept in {path}; "
                                                                 f"train.remeasure_peak=true measures again")
    assert hardware.peak_flops_per_device("float32", configured=2e12) == (2e12, "train.peak_flops")
    again, _ = hardware.peak_flops_per_device("float32", remeasure=True)
    assert again != 1.5e9 and json.loads(path.read_text()) == {key: again}


def test_an_apple_gpus_peak_is_apples_figure_by_generation_and_cores():
    # What `system_profiler SPDisplaysDataType` prints on an M1 Max (trimmed), and on chips Apple gave no figure for.
    m1_max = "Graphics/Displays:\n\n    Apple M1 Max:\n\n      Chipset Model: Apple M1 Max\n      Type: GPU\n" \
             "      Bus: Built-In\n      Total Number of Cores: 32\n      Vendor: Apple (0x106b)\n"
    assert hardware.apple_gpu_peak(m1_max) == (10.4e12, "Apple's figure for the Apple M1 Max's 32-core GPU")
    assert hardware.apple_gpu_peak(m1_max.replace("32", "24"))[0] == pytest.approx(7.8e12)  # the 24-core M1 Max
    m2 = "      Chipset Model: Apple M2\n      Total Number of Cores: 10\n"
    assert hardware.apple_gpu_peak(m2)[0] == pytest.approx(3.6e12, rel=0.01)  # Apple: 3.6 TFLOPS
    assert hardware.apple_gpu_peak(m2.replace("M2", "M4 Pro")) is None  # measured instead
    assert hardware.apple_gpu_peak("") is None  # not a Mac


@pytest.mark.slow
@pytest.mark.parametrize("platform, plugin", [("mps", "jax-mps"), ("METAL", "jax-metal")])
def test_an_apple_gpu_platform_without_its_plugin_names_the_install(trained_run, platform, plugin):
    for module, args, flag in (("gptjax.sample", ["--workdir", trained_run, f"--platform={platform}"], "--platform"),
                               ("gptjax.train", ["--config", TINY, f"--config.train.platform={platform}"],
                                "train.platform")):
        here = ", ".join(sorted({device.platform for device in jax.devices()}))
        assert_one_error_line(run_command_forked(module, *args), (
            f"{flag}={platform!r} needs the {plugin} plugin, which is not installed ({hardware.APPLE_GPU_ROUTES}); "
            f"this machine has {here}"))


@pytest.mark.slow
@pytest.mark.parametrize("plugin, declared, needs", [("jax-mps", "jax<0.5,>=0.4.0", "<0.5,>=0.4.0"),
                                                     ("jax-metal", "jax>=0.4.34", "==0.5.0")])
def test_an_apple_gpu_plugin_beside_a_jax_it_does_not_run_with_is_refused_in_one_line(tmp_path, trained_run, plugin,
                                                                                      declared, needs):
    if jax.__version__ == "0.5.0" and plugin == "jax-metal":
        pytest.skip("jax-metal runs with this JAX")
    # The plugin as pip would leave it installed on a Mac (its metadata; its macOS-only library cannot load here):
    # importlib.metadata finds it on the path, as it would in site-packages.
    version = {"jax-mps": "0.11.1", "jax-metal": "0.1.1"}[plugin]
    dist_info = tmp_path / "site" / f"{plugin.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {plugin}\nVersion: {version}\n"
                                        f"Requires-Dist: {declared}\n")
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{tmp_path / 'site'}")
    for platform in ("", {"jax-mps": "mps", "jax-metal": "METAL"}[plugin]):  # asked for, or JAX's own choice
        result = subprocess.run([sys.executable, "-m", "gptjax.sample", "--workdir", trained_run,
                                 f"--platform={platform}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        assert_one_error_line(result, f"{plugin} {version} runs with jax {needs} and this is jax {jax.__version__}; "
                                      f"install the versions it needs ({hardware.APPLE_GPU_ROUTES}), or set "
                                      f"--platform=cpu")
    result = subprocess.run([sys.executable, "-m", "gptjax.sample", "--workdir", trained_run, "--platform=cpu",
                             "--max_new_tokens=2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # the CPU does not need the plugin


@pytest.mark.slow
def test_the_train_step_uses_no_deprecated_optax_spelling():
    from gptjax import train_step as steps_lib

    config = small_config()
    model_config = build_model_config(config.model)
    optimizer = steps_lib.make_optimizer(config.train, 10)
    state = steps_lib.create_train_state(model_config, optimizer, seed=0)
    mesh = steps_lib.data_mesh(jax.devices()[:1])
    step = steps_lib.make_train_step(model_config, optimizer, mesh, steps_lib.replicated_sharding(state, mesh), 0,
                                     donate=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(state, np.zeros((1, 2, 17), np.int32))
    assert not [w for w in caught if "optax" in str(w.message)], [str(w.message) for w in caught]


HIDE_TORCH = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "torch" else find_spec(name, *a)  # as without PyTorch
sys.argv = ["prepare", "--config", "experiments/tiny.py", "--workdir", sys.argv[1]]
runpy.run_module("gptjax.prepare", run_name="__main__")
"""


@pytest.mark.slow
def test_a_run_prints_no_library_noise(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", HIDE_TORCH, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("oneDNN", "InitializeLog", "PyTorch was not found", "Traceback"):
        assert noise not in result.stderr, result.stderr[-3000:]


SMALL_SHAPE = ["--config.model.max_len=16", "--config.model.n_layer=2", "--config.model.n_head=2",
               "--config.model.d_model=32", "--config.model.d_ff=64"]  # small_config's model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    train_and_evaluate(small_config(steps=1), workdir, progress=False)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("case", ["init_from missing", "init_from of another shape", "a workdir of another shape",
                                  "batch and accumulation", "a path that matches nothing", "a platform not here"])
def test_what_the_config_and_checkpoints_can_tell_is_refused_before_any_data_work(trained_run, tmp_path, case):
    cache = tmp_path / "cache"
    workdir, args = tmp_path / "run", [*SMALL_SHAPE, "--config.train.eval_every=0", f"--config.data.cache_dir={cache}"]
    if case == "init_from missing":
        args.append(f"--config.train.init_from={tmp_path / 'nothing'}")
        expected = f"train.init_from='{tmp_path / 'nothing'}' holds no checkpoint"
    elif case == "init_from of another shape":
        args += [f"--config.train.init_from={trained_run}", "--config.model.d_model=64"]
        expected = f"the checkpoint in {trained_run}/checkpoints is from another model shape (model.d_model=32 there"
    elif case == "a workdir of another shape":
        workdir = trained_run
        args.append("--config.model.d_model=64")
        expected = f"the checkpoint in {trained_run}/checkpoints is from another model shape (model.d_model=32 there"
    elif case == "batch and accumulation":
        args += ["--config.train.batch_size=4", "--config.train.grad_accum_steps=3"]
        expected = "train.batch_size=4 is not divisible by train.grad_accum_steps=3"
    elif case == "a path that matches nothing":
        args += ["--config.data.source=text", f"--config.data.path={tmp_path / 'corpus' / '*.txt'}"]
        expected = f"data.path='{tmp_path / 'corpus' / '*.txt'}' matches no files"
    else:
        here = sorted({device.platform for device in jax.devices()})
        missing = next(name for name in ("gpu", "tpu", "cpu") if name not in here)
        args.append(f"--config.train.platform={missing}")
        expected = f"train.platform='{missing}' is not available on this machine ("
        expected_end = f"); it has {', '.join(here)}: set train.platform to one of them, or to '' to let JAX choose"
    saved = sorted(os.listdir(os.path.join(trained_run, "checkpoints")))
    result = run_command_forked("gptjax.train", "--config", "experiments/tiny.py", f"--workdir={workdir}", *args)
    assert_one_error_line(result, expected)
    if case == "a platform not here":
        assert result.stderr.strip().endswith(expected_end), result.stderr
    assert not cache.exists()  # no token cache, not even an empty directory
    assert sorted(os.listdir(os.path.join(trained_run, "checkpoints"))) == saved


def test_wandb_asked_for_but_not_installed_is_refused_before_any_data_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    config = small_config(wandb_project="my-project")
    config.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(UserError, match=r"^train.wandb_project='my-project' needs wandb: pip install wandb"):
        train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "cache").exists()


def test_a_warmup_longer_than_the_run_states_the_peak_it_reaches(tmp_path, capsys):
    train_and_evaluate(small_config(steps=2, warmup_steps=10), str(tmp_path), progress=False)
    assert ("note     | train.warmup_steps=10 is longer than the run's 2 steps: the learning rate rises to 0.00057, "
            "never to train.learning_rate=0.003; lower train.warmup_steps to reach it") in capsys.readouterr().out


BAD_RECORDS = {  # a line of a user's .jsonl file -> the one error line that names it
    "not JSON": ('{"text": "An unfinished record', "line 2 is not JSON (Unterminated string starting at: column 10); "
                                                   "each line must be one JSON object"),
    "not an object": ('["a", "list"]', "line 2 is a JSON list, not an object with a 'text' field"),
    "no text field": ('{"body": "text under another name"}', "line 2 has no text field 'text' (it has ['body']); "
                                                             "set data.text_field"),
    "text not a string": ('{"text": 42}', "line 2 field 'text' is a int, not text; set data.text_field"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD_RECORDS)
def test_a_bad_record_in_a_users_jsonl_is_one_line_naming_file_and_line(tmp_path, kind):
    line, message = BAD_RECORDS[kind]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "A first document that reads well."}\n' + line + "\n", encoding="utf-8")
    if kind != "not JSON":  # the same UserError, raised where the command's would be (a process costs seconds)
        config = small_config()
        config.data.update(dict(source="text", path=str(corpus)))
        with pytest.raises(UserError) as error:
            input_pipeline.prepare(config, str(tmp_path / "run"), progress=False)
        assert str(error.value).startswith(f"{corpus} {message}") and "\n" not in str(error.value)
        return
    result = run_module("gptjax.train", "--config", "experiments/tiny.py", f"--workdir={tmp_path / 'run'}",
                        *SMALL_SHAPE, "--config.data.source=text", f"--config.data.path={corpus}", timeout=120)
    # The tokenizing progress bar, then one error line (what was tokenized before it is kept for a rerun).
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("tokenizing: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: {corpus} {message}"), result.stderr[-3000:]


@pytest.mark.slow
def test_a_bad_parquet_column_and_bad_lambada_files_are_one_line(tmp_path, trained_run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    config = small_config()
    config.data.update(dict(source="text", path=str(tmp_path / "numbers.parquet")))
    with pytest.raises(UserError, match=r"numbers.parquet column 'text' holds int64, not text; set data.text_field"):
        input_pipeline.prepare(config, str(tmp_path / "run"), progress=False)
    plain = tmp_path / "lambada.txt"
    plain.write_text("A plain text line, not JSON\n")
    assert_one_error_line(run_command_forked("gptjax.evaluate", f"--workdir={trained_run}", f"--lambada={plain}"),
                          f"{plain} line 1 is not JSON (Expecting value: column 1)")
    other_field = tmp_path / "lambada.jsonl"
    other_field.write_text('{"passage": "the cat sat on the mat"}\n')
    assert_one_error_line(run_command_forked("gptjax.evaluate", f"--workdir={trained_run}",
                                             f"--lambada={other_field}"),
                          f"{other_field} line 1 has no text field 'text' (it has ['passage']); pass --text_field")
    result = run_command_forked("gptjax.evaluate", f"--workdir={trained_run}", f"--lambada={other_field}",
                                "--text_field=passage")
    assert result.returncode == 0 and '"lambada_examples": 1' in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_evaluating_a_run_that_held_nothing_out_names_the_fixes(tmp_path):
    config = small_config(steps=1)
    config.data.eval_fraction = 0.0
    train_and_evaluate(config, str(tmp_path), progress=False)
    assert_one_error_line(run_command_forked("gptjax.evaluate", f"--workdir={tmp_path}"),
                          f"the run in {tmp_path} was trained with data.eval_fraction=0: it held out no documents to "
                          f"evaluate on; pass --split train")
    result = run_command_forked("gptjax.evaluate", f"--workdir={tmp_path}", "--split=train", "--max_batches=1")
    assert result.returncode == 0 and '"eval_loss"' in result.stdout, result.stderr[-2000:]
