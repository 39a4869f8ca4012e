"""The benchmark suite runs end to end (speed itself is measured, never asserted: see benchmarks/)."""

import json
import os

import pytest

from gptjax.configs import load_config_file
from tests.conftest import run_command_forked
from tests.test_train import REPO_ROOT

pytestmark = pytest.mark.slow  # each runs a benchmark: `pytest -m "not slow"` skips them


def test_benchmark_suite_reports_ratios_against_the_measured_peak():
    result = run_command_forked("benchmarks.run", "--config", "experiments/tiny.py", "--quick", "--repeats", "1",
                                "--new_tokens", "8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["train_tokens_per_second"] > 0 and report["eval_tokens_per_second"] > 0
    assert 0 < report["mfu_vs_measured_matmul"] < 1.5
    assert report["mfu_vs_measured_matmul"] == report["train_model_flops_per_second"] / report[
        "matmul_peak_flops_per_second"]
    assert report["cache_speedup_batch1"] > 0 and report["sample_tokens_per_second_batch8_cached"] > 0
    assert report["sample_batch1_head_bfloat16_of_roofline"] == pytest.approx(
        report["sample_tokens_per_second_batch1_head_bfloat16_cached"] / report[
            "roofline_tokens_per_second_batch1_head_bfloat16"])
    assert report["bytes_per_token_batch1_head_bfloat16"] < report["bytes_per_token_batch1"]
    assert report["attention"] == "chunked"  # 'auto' on a CPU


def test_benchmark_overrides_are_checked_before_anything_runs():
    result = run_command_forked("benchmarks.run", "--config", "experiments/tiny.py", "--quick", "--attention", "flash")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith("model.attention='flash' is not one of "
                                                           "('auto', 'xla', 'chunked', 'cudnn')")
    assert "Traceback" not in result.stderr


def test_layers_benchmark_measures_every_layout_with_every_kernel_and_loss():
    from benchmarks import layers

    report = layers.main(["--config", os.path.join(REPO_ROOT, "experiments/tiny.py"), "--n_layer", "1",
                          "--batch_size", "1", "--steps", "1",
                          "--layouts", "unrolled:none,unrolled:full", "--attention", "xla,chunked",
                          "--loss_chunk_tokens", "64"])
    # Two values in two of the three axes show the product (each compile costs seconds; the plain loss is tested
    # equal to the fused one in test_kernels.py).
    measured = [(r["attention"], r["loss_chunk_tokens"], r["layout"]) for r in report["layouts"]]
    assert measured == [(attention, 64, f"unrolled, remat={remat}") for attention in ("xla", "chunked")
                        for remat in ("none", "full")]
    for r in report["layouts"]:
        assert r["compile_seconds"] > 0 and r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1.5


def test_head_to_head_against_pytorch_takes_turns_and_reports_ratios():
    pytest.importorskip("torch", reason="PyTorch is not installed: pip install -e \".[test,hf]\" (README, Tests)")
    from benchmarks.run import head_to_head, make_train_step

    # More new tokens than tiny's context: gptjax slides its window, the reference is held to its context.
    config = load_config_file(os.path.join(REPO_ROOT, "experiments/tiny.py"))
    report = head_to_head(make_train_step(config, batch_size=4, accum=1), rounds=1, new_tokens=100)
    assert report["torch_train_tokens_per_second"] > 0
    assert report["train_speed_vs_torch"] == pytest.approx(
        report["head_to_head_train_tokens_per_second"] / report["torch_train_tokens_per_second"])
    assert report["sample_speed_vs_torch_batch1"] > 0 and report["sample_speed_vs_torch_batch8"] > 0
    assert report["sample_speed_vs_torch_batch1_head_bfloat16"] > 0


def test_the_loop_benchmark_times_every_dispatch_bound_and_leaves_the_default():
    from benchmarks import loop
    from gptjax import train

    default = train.DISPATCH_AHEAD
    best = loop.loop_speed(os.path.join(REPO_ROOT, "experiments/tiny.py"), steps=4, rounds=1, batch_size=2)
    assert set(best) == set(loop.SETTINGS) and all(tokens_per_second > 0 for tokens_per_second in best.values())
    assert train.DISPATCH_AHEAD == default
