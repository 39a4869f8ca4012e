"""README's quickstart as a user runs it: the command README gives, ending at the held-out loss README gives for this
stack. The quickstart trains on this Python's own reference manual (pydoc_data), whose text differs between Python
releases, and JAX releases round differently, so README gives the figure per stack (Python and JAX)."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How far a rerun on another CPU lands from README's figure for the same stack (XLA's CPU kernels differ by
# instruction set), and from the nearest figure of the same Python where README has none for this JAX.
SAME_STACK, SAME_PYTHON = 0.02, 0.1


def readme() -> str:
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def quickstart_commands() -> str:
    """The quickstart's commands after the install: `python -m gptjax.train ... && python -m gptjax.sample ...`."""
    section = readme().split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)
    return block.split("pip install -e . && ", 1)[1]


def quickstart_figures() -> dict[tuple[str, str], float]:
    """{(Python minor version, jax version): held-out loss} from README's table of the quickstart's ends."""
    rows = re.findall(r"^\| Python (3\.\d+) \| jax ([\d.]+) \|[^|]*\| ([\d.]+) \|", readme(), re.M)
    return {(python, jax_version): float(loss) for python, jax_version, loss in rows}


def test_readme_gives_the_quickstarts_end_for_the_four_stacks_ci_runs():
    figures = quickstart_figures()
    assert {python for python, _ in figures} >= {"3.11", "3.12", "3.13"}, figures
    assert len(figures) >= 4, figures
    assert "python -m gptjax.train --config experiments/tiny.py --workdir runs/tiny" in quickstart_commands()


@pytest.mark.slow
@pytest.mark.every_stack
def test_the_quickstart_ends_at_the_held_out_loss_readme_gives_for_this_stack(tmp_path):
    # README's commands, with `python` this interpreter and the run's directory a temporary one.
    commands = quickstart_commands().replace("runs/tiny", str(tmp_path / "tiny"))
    commands = re.sub(r"(^|&& )python ", lambda m: f"{m.group(1)}{sys.executable} ", commands)
    result = subprocess.run(["bash", "-c", commands], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The import statement" in result.stdout  # the sample continues the prompt
    with open(tmp_path / "tiny" / "metrics.jsonl") as f:
        evaluations = [record for record in map(json.loads, f) if "eval_loss" in record]
    assert evaluations[-1]["step"] == 300
    loss = evaluations[-1]["eval_loss"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    figures = quickstart_figures()
    if (python, jax.__version__) in figures:
        expected, margin = figures[python, jax.__version__], SAME_STACK
    else:
        same_python = [value for (p, _), value in figures.items() if p == python]
        if not same_python:
            pytest.skip(f"README gives no quickstart loss for Python {python} (held-out loss here: {loss:.3f})")
        expected, margin = min(same_python, key=lambda value: abs(value - loss)), SAME_PYTHON
    assert abs(loss - expected) <= margin, (
        f"the quickstart ended at a held-out loss of {loss:.3f} on Python {python} with jax {jax.__version__}; "
        f"README gives {expected}")
