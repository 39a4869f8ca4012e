"""`python -m gptjax.sweep`: the plan (budgets spent to within one step, schedules that end at the last step), the
one-line refusals before any training, and a whole tiny sweep: interrupted with Ctrl-C, resumed, and equal to one
that ran straight through. The fits themselves are checked against a known L(N, D) in test_isoflop.py."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from gptjax import sweep as sweep_lib
from gptjax import train_step as steps_lib
from gptjax.configs import SWEEP_KEYS, describe_keys, load_config_file
from gptjax.errors import UserError
from gptjax.scaling import flops_per_token, param_count
from tests.conftest import REPO_ROOT, run_command_forked
from tests.test_train import Output

SWEEP = os.path.join(REPO_ROOT, "experiments", "sweep.py")
WIKITEXT_SWEEP = os.path.join(REPO_ROOT, "experiments", "sweep_wikitext.py")
# A sweep of seconds per run: 2 budgets x 3 widths of one block, 4 sequences of 64 tokens a step, 7 to 72 steps.
TINY_OVERRIDES = {"sweep.budgets": (3e10, 9e10), "sweep.d_models": (16, 32, 48), "train.batch_size": 4,
                  "train.log_every": 5, "sweep.min_steps": 5, "sweep.bootstrap": 100}


def tiny_sweep_config(**overrides):
    config = load_config_file(SWEEP)
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


def as_flags(**overrides) -> list[str]:
    return [f"--config.{key}={value}".replace(" ", "") for key, value in {**TINY_OVERRIDES, **overrides}.items()]


@pytest.mark.parametrize("path", [SWEEP, WIKITEXT_SWEEP])
def test_every_run_spends_its_budget_to_within_one_step_and_its_schedule_ends_at_its_last_step(path, tmp_path):
    config = load_config_file(path)
    runs = sweep_lib.plan(config, str(tmp_path))
    assert len(runs) == sum(len(sweep_lib.widths_of(config.sweep, i)) for i in range(len(config.sweep.budgets)))
    for run in runs:
        seq_len, batch = run.config.data.seq_len, run.config.train.batch_size
        one_step = flops_per_token(run.model, seq_len) * batch * seq_len
        assert run.flops - one_step < run.flops_used <= run.flops, run.name
        assert run.steps * batch * seq_len == run.tokens
        assert run.params == param_count(run.model) > run.non_embedding_params
        # The shape rule: d_model / n_layer ~ width_per_layer, heads of head_dim, d_ff = 4 d_model.
        assert run.model.n_layer == max(1, round(run.model.d_model / config.sweep.width_per_layer + 1e-9))
        head_dim = min(config.sweep.head_dim, run.model.d_model)  # a model narrower than head_dim has one head
        assert run.model.n_head * head_dim == run.model.d_model == run.model.d_ff // 4
        # The learning rate the run's optimizer uses: warmup, then a cosine that reaches its end value exactly at
        # the last step, not after it.
        schedule = steps_lib.learning_rate_schedule(run.config.train, run.steps)
        train = run.config.train
        end = train.learning_rate * train.min_lr_ratio
        assert float(schedule(run.steps)) == pytest.approx(end, rel=1e-6)
        assert float(schedule(run.steps - 1)) > end * (1 + 1e-7)
        assert float(schedule(train.warmup_steps)) == pytest.approx(train.learning_rate, rel=1e-6)
        assert 1 <= train.warmup_steps < run.steps and train.eval_every == run.steps
        assert run.config.data.cache_dir == os.path.join(str(tmp_path), "data")  # one token cache for all


@pytest.mark.parametrize("path", [SWEEP, WIKITEXT_SWEEP])
def test_every_run_is_evaluated_on_the_same_held_out_windows(path, tmp_path):
    # Evaluation reads the first eval_steps batches of the validation stream in order (input_pipeline.eval_batches):
    # the same cache, seq_len, batch rows and count of batches give every run the same windows.
    runs = sweep_lib.plan(load_config_file(path), str(tmp_path))
    assert len({(r.config.data.cache_dir, r.config.data.seq_len, r.config.train.eval_steps,
                 r.config.train.batch_size // r.config.train.grad_accum_steps) for r in runs}) == 1


def test_runs_that_repeat_the_text_more_than_four_times_are_warned_about_and_beyond_max_epochs_refused(tmp_path):
    runs = sweep_lib.plan(tiny_sweep_config(), str(tmp_path))  # the largest run: 72 x 256 = 18,432 tokens
    largest = max(r.tokens for r in runs)
    assert sweep_lib.check_corpus(runs, largest // 4 + 1, max_epochs=8.0) == []  # just under 4 passes
    warnings = sweep_lib.check_corpus(runs, largest // 5, max_epochs=8.0)
    assert len(warnings) == 1 and warnings[0].startswith("warning  | C9e10_d16_L1 passes over the training text 5.0")
    with pytest.raises(UserError, match="run C9e10_d16_L1 would train on .* passes over the .*sweep.max_epochs=8"):
        sweep_lib.check_corpus(runs, largest // 9, max_epochs=8.0)


def test_each_budget_can_have_its_own_widths_as_in_the_paper(tmp_path):
    runs = sweep_lib.plan(tiny_sweep_config(**{"sweep.budgets": (1e11, 3e11), "sweep.d_models": ((8, 16, 32),
                                                                                                 (16, 32, 48))}),
                          str(tmp_path))
    assert [r.name for r in runs] == ["C1e11_d8_L1", "C1e11_d16_L1", "C1e11_d32_L1", "C3e11_d16_L1", "C3e11_d32_L1",
                                      "C3e11_d48_L1"]
    assert runs[0].model.n_head == 1 and runs[0].model.head_dim == 8  # narrower than head_dim: one head


def test_every_sweep_key_is_listed_with_its_comment():
    listing = describe_keys(load_config_file(SWEEP))
    for key, (_, meaning) in SWEEP_KEYS.items():
        assert meaning.endswith(".") and "  " not in meaning, key
        assert f"{key} = " in listing and f"    # {meaning}" in listing, key


def test_non_embedding_count_by_hand():
    # Kaplan et al.'s N: everything but the token table (the tied output layer is the same matrix).
    run = sweep_lib.plan(tiny_sweep_config(), "unused")[0]  # d_model 16, one block, biases, sinusoidal positions
    d, f = 16, 64
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    assert run.non_embedding_params == block + 2 * d  # + the final LayerNorm
    assert run.params == run.non_embedding_params + 50304 * d


@pytest.mark.parametrize("overrides, message", [
    ({"sweep.budgets": (1e11,)}, "needs at least two different positive budgets"),
    ({"sweep.d_models": (16, 32)}, "needs at least three different positive widths"),
    ({"sweep.d_models": (16, 20, 32)}, r"sweep.d_models \[20\] are not divisible by sweep.head_dim=8"),
    ({"sweep.budgets": (1e9, 1e11)}, "the budget 1e\\+09 FLOPs buys d_model=16 .* only 0 steps of 256 tokens, fewer "
                                     "than sweep.min_steps=5"),
    ({"sweep.count": "embedding"}, "sweep.count='embedding' is not one of"),
    ({"sweep.d_models": ((16, 32, 48),)}, "sweep.d_models has 1 tuples of widths for 2 budgets"),
    ({"sweep.d_models": ((16, 32, 48), (16, 32))}, "needs at least three different positive widths per budget"),
])
def test_a_sweep_that_cannot_be_fitted_is_refused_in_one_line_before_any_data(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        sweep_lib.plan(tiny_sweep_config(**overrides), str(tmp_path))


@pytest.mark.slow
def test_bad_sweeps_as_commands_are_one_line_and_a_corpus_too_small_is_refused_before_training(tmp_path):
    result = run_command_forked("gptjax.sweep", "--config", SWEEP, f"--workdir={tmp_path / 'a'}",
                                *as_flags(**{"sweep.budgets": (1e11,)}))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: sweep.budgets=(100000000000.0,) needs at least two")
    assert not os.path.exists(tmp_path / "a")  # nothing read, nothing written
    result = run_command_forked("gptjax.sweep", "--config", SWEEP, f"--workdir={tmp_path / 'b'}",
                                *as_flags(**{"sweep.budgets": (1e11, 1e13), "sweep.max_epochs": 2.0}))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run C1e13_d16_L1 would train on 2.06M tokens, 15.3 passes over the 134k-token "
                           "training text (sweep.max_epochs=2)"), last
    assert not os.path.exists(tmp_path / "b" / "runs")  # no run was started


@pytest.mark.slow
def test_a_tiny_sweep_interrupted_and_resumed_equals_one_run_straight_through(tmp_path):
    straight = sweep_lib.run_sweep(tiny_sweep_config(), str(tmp_path / "straight"), progress=False)

    # The same sweep as a command, Ctrl-C in the middle of its fourth run (72 steps), then the same command again.
    workdir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "gptjax.sweep", "--config", SWEEP, f"--workdir={workdir}", *as_flags()]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    output = Output(process)
    output.wait_for(process, "stdout", "run 4/6 C9e10_d16_L1")
    fourth = workdir / "runs" / "C9e10_d16_L1"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not (
            (fourth / "metrics.jsonl").exists() and (fourth / "metrics.jsonl").read_text().strip()):
        time.sleep(0.1)  # until its fifth step is logged
    process.send_signal(signal.SIGINT)
    stdout, stderr = output.finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("Sweep stopped: 3 run(s) finished; rerun the same command")
    assert "Interrupted: saving step" in stderr and not (fourth / sweep_lib.RESULT).exists()
    resumed = run_command_forked("gptjax.sweep", "--config", SWEEP, f"--workdir={workdir}", *as_flags(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("finished before") == 3 and "resumed at step" in resumed.stdout
    with open(workdir / "summary.json") as f:
        again = json.load(f)

    # The same runs, losses and fits (float32 training resumes exactly; the fits are the same arithmetic).
    assert [r["name"] for r in again["runs"]] == [r["name"] for r in straight["runs"]]
    for a, b in zip(again["runs"], straight["runs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"], a["name"]
    for count in ("total", "non_embedding"):
        for key in ("a", "b", "n_opt_at_target", "d_opt_at_target"):
            if key in straight["fits"][count]:
                assert again["fits"][count][key] == pytest.approx(straight["fits"][count][key], rel=1e-4), key

    # A finished run is reused only by the config that trained it.
    with pytest.raises(UserError, match="holds a finished run of another config"):
        sweep_lib.run_sweep(tiny_sweep_config(**{"train.learning_rate": 1e-3}), str(tmp_path / "straight"),
                            progress=False)

    # Every point is an ordinary run: its checkpoint, metrics and held-out loss at the last step.
    planned = {run.name: run for run in sweep_lib.plan(tiny_sweep_config(), str(tmp_path / "straight"))}
    for run in straight["runs"]:
        run_dir = tmp_path / "straight" / "runs" / run["name"]
        with open(run_dir / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert rows[-1]["step"] == run["steps"] and rows[-1]["eval_loss"] == run["loss"]
        assert [r for r in rows if "eval_loss" in r] == rows[-1:]  # held-out loss once, at the end
        schedule = steps_lib.learning_rate_schedule(planned[run["name"]].config.train, run["steps"])
        assert rows[-1]["learning_rate"] == pytest.approx(float(schedule(run["steps"] - 1)))  # its last step's
        assert max(int(step) for step in os.listdir(run_dir / "checkpoints")) == run["steps"]
        assert not math.isnan(run["loss"]) and run["flops_used"] <= run["flops"]
    for name in ("summary.md", "summary.json"):
        assert (tmp_path / "straight" / name).stat().st_size > 0
    with open(tmp_path / "straight" / "isoflop.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "straight" / "summary.md").read_text()
    assert "| C3e10_d16_L1 |" in markdown and "## N counted as total (the default)" in markdown
