"""The benchmark suite runs end to end (speed itself is measured, never asserted: see benchmarks/)."""

import json

from tests.test_train import run_module


def test_benchmark_suite_reports_ratios_against_the_measured_peak():
    result = run_module("benchmarks.run", "--config", "experiments/tiny.py", "--quick", "--repeats", "1", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["train_tokens_per_second"] > 0 and report["eval_tokens_per_second"] > 0
    assert 0 < report["mfu_vs_measured_matmul"] < 1.5
    assert report["mfu_vs_measured_matmul"] == report["train_model_flops_per_second"] / report[
        "matmul_peak_flops_per_second"]
    assert report["cache_speedup_batch1"] > 0 and report["sample_tokens_per_second_batch8_cached"] > 0
