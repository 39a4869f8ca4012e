import math
import os

import pytest

from gptjax import scaling
from tests.conftest import REPO_ROOT


def test_twenty_tokens_rule_by_hand():
    n, d = scaling.twenty_tokens_rule(1e17)
    assert n == pytest.approx(math.sqrt(1e17 / 120))  # 28.87M
    assert d == pytest.approx(20 * n)
    assert 6 * n * d == pytest.approx(1e17)


def test_fitted_optimum_by_hand():
    # Hand arithmetic from the paper's constants: a = beta/(alpha+beta) = 0.28/0.62,
    # G = (0.34 * 406.4 / (0.28 * 410.7))^(1/0.62) = 1.2016^(1.6129) = 1.3448.
    g = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    assert g == pytest.approx(1.3448, rel=1e-3)
    n, d = scaling.fitted_optimum(1e17)
    assert n == pytest.approx(g * (1e17 / 6) ** (0.28 / 0.62))
    assert n == pytest.approx(28.5e6, rel=0.01) and d == pytest.approx(0.585e9, rel=0.01)
    assert 6 * n * d == pytest.approx(1e17)
    # At the optimum, moving along C = 6ND in either direction cannot lower the fitted loss.
    best = scaling.predicted_loss(n, d)
    for factor in (0.8, 1.25):
        assert scaling.predicted_loss(n * factor, d / factor) > best


def test_predicted_loss_formula():
    assert scaling.predicted_loss(1e8, 2e9) == pytest.approx(1.69 + 406.4 / 1e8 ** 0.34 + 410.7 / 2e9 ** 0.28)


def test_report_lands_near_the_seed_and_suggests_exact_shapes():
    result = scaling.report(1e17)
    assert 15e6 < result["fitted_optimum"]["params"] < 35e6 and result["fitted_optimum"]["tokens"] < 1e9
    assert result["seed_shape"]["params"] == 19_196_416
    assert result["seed_shape"]["predicted_loss"] - result["fitted_optimum"]["predicted_loss"] < 0.05
    for shape in result["shapes"]:
        assert abs(math.log(shape["params"] / result["fitted_optimum"]["params"])) < 0.1
        assert shape["d_model"] % shape["n_head"] == 0


def test_budget_from_device_hours(capsys):
    scaling.main(["--device_flops", "10e12", "--mfu", "0.5", "--hours", "2", "--json"])
    assert '"flops": 3.6e+16' in capsys.readouterr().out


def test_projected_hours_of_an_experiment_by_hand(capsys):
    from gptjax.configs import build_model_config, load_config_file
    from gptjax.scaling import flops_per_token

    config = load_config_file(os.path.join(REPO_ROOT, "experiments/m1.py"))
    result = scaling.projection(config, device_flops=10.4e12, mfu=0.3)
    per_token = flops_per_token(build_model_config(config.model))
    assert result["steps"] == int(1e17 // (per_token * 128 * 256))  # steps derived from the 1e17 budget
    assert result["flops"] == pytest.approx(1e17, rel=1e-4)
    assert result["hours"] == pytest.approx(1e17 / (10.4e12 * 0.3) / 3600, rel=1e-4)  # 8.9 hours, not 3
    assert 40 < result["tokens_per_parameter"] < 45
    scaling.main(["--config", os.path.join(REPO_ROOT, "experiments/m1.py"), "--device_flops", "10.4e12",
                  "--mfu", "0.3"])
    assert "at 30% MFU of 10.4 TFLOP/s (--device_flops): 25.7k tokens/s, 8.9 hours" in capsys.readouterr().out


def test_a_projection_without_device_flops_uses_this_machines_kept_peak_and_counts_small_runs(tmp_path, monkeypatch,
                                                                                             capsys):
    from gptjax import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path, key = hardware.kept_peak_key("float32")
    hardware.write_json_atomically(path, {key: 1e11})
    scaling.main(["--config", os.path.join(REPO_ROOT, "experiments/tiny.py"), "--mfu", "0.5"])
    # 300 steps of 16 x 64 tokens; 6.84M parameters (the 50304 x 128 embedding, mostly)
    assert capsys.readouterr().out == (
        f"{REPO_ROOT}/experiments/tiny.py: 6.84M parameters, 41.2M FLOPs per token, 300 steps = 307k tokens "
        f"(0.0449 per parameter) = 1.27e+13 FLOPs\n  at 50% MFU of 0.1 TFLOP/s (measured matmul on cpu, "
        f"kept in {path}; train.remeasure_peak=true measures again): 1.21k tokens/s, 4.22 minutes\n")


def test_flops_follow_the_trained_sequence_length_not_the_context(tmp_path):
    from gptjax.configs import build_model_config, load_config_file
    from gptjax.scaling import flops_per_token, matmul_param_count, planned_steps
    from gptjax.train import train_and_evaluate
    from tests.test_train import small_config

    # Steps from a budget: m1 trained on 128-token windows of its 256-token context.
    config = load_config_file(os.path.join(REPO_ROOT, "experiments/m1.py"))
    config.data.seq_len = 128
    cfg = build_model_config(config.model)
    per_token = 6 * matmul_param_count(cfg) + 12 * 8 * 128 * 256
    assert flops_per_token(cfg, 128) == per_token < flops_per_token(cfg)
    assert planned_steps(config, cfg) == int(1e17 // (per_token * 128 * 128))
    assert scaling.projection(config, 10.4e12, 0.3)["flops"] == pytest.approx(1e17, rel=1e-4)
    # MFU of a run on 8-token windows of a 16-token context, against a stated peak.
    config = small_config(steps=2, peak_flops=1e12)
    config.data.seq_len = 8
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    cfg = build_model_config(config.model)
    assert result["mfu"] == pytest.approx(result["tokens_per_second"] * flops_per_token(cfg, 8) / 1e12)


@pytest.mark.parametrize("flops, sentence", [
    (1e12, "It has 122x the optimum's parameters (more) and so fewer tokens (0.0078x), and its predicted loss is "
           "18.862 nats above the best: at this budget the seed shape is far from compute-optimal"),
    (1e17, "It has 0.67x the optimum's parameters (fewer) and so more tokens (1.4x), and its predicted loss is within "
           "0.039 nats of the best: the loss surface is flat near the optimum"),
    (1e21, "It has 0.011x the optimum's parameters (fewer) and so more tokens (90x), and its predicted loss is 0.818 "
           "nats above the best"),
])
def test_the_seed_comparison_is_made_from_the_numbers(flops, sentence, capsys):
    scaling.main(["--flops", str(flops)])
    out = capsys.readouterr().out
    assert sentence in out and "0.00B" not in out
    assert scaling.describe(8230) == "8.23k" and scaling.describe(8.23e12) == "8.23T"
