import os
import subprocess
import sys

import pytest

from gptjax.cli import check_command_line, check_key
from gptjax.configs import base_config, build_model_config, load_config_file
from gptjax.errors import UserError
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "experiments/tiny.py")


def test_experiments_load_and_build_models():
    for name in ("m1", "tiny"):
        config = load_config_file(os.path.join(REPO_ROOT, f"experiments/{name}.py"))
        build_model_config(config.model)
        assert config.data.seq_len == config.model.max_len


def test_seq_len_follows_max_len_unless_set():
    config = base_config()
    config.model.max_len = 128
    assert config.data.seq_len == 128
    config.data.seq_len = 64  # a shorter training window keeps the model's context
    assert config.model.max_len == 128 and config.data.seq_len == 64


def test_unknown_key_is_a_clear_error():
    config = base_config()
    with pytest.raises(UserError, match="unknown config key 'train.stepz': train has no 'stepz'"):
        check_key(config, "train.stepz")
    with pytest.raises(UserError, match="config file 'experiments/nope.py' does not exist"):
        check_command_line(["--config", "experiments/nope.py"], default_config=TINY)


def test_command_line_checks_run_before_absl():
    check_command_line([f"--config={REPO_ROOT}/experiments/m1.py", "--config.train.batch_size=8"], TINY)
    with pytest.raises(UserError, match="'model.n_layers'"):
        check_command_line(["--config.model.n_layers=3"], TINY)


@pytest.mark.slow
def test_the_test_command_runs_without_pytest_xdist():
    """`pip install -e .` (without `.[test]`) has no pytest-xdist, whose options setup.cfg's addopts pass: the plain
    `python -m pytest` still runs, in one process, and says why (xdist left out here with `-p no:xdist`)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider",
                             "tests/test_configs.py", "-k", "not without_pytest_xdist"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pytest-xdist is not loaded: the tests run in one process" in result.stdout
    assert " passed" in result.stdout.splitlines()[-1]
