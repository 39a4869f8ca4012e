"""docs/tour.md cannot rot: every ```python block of it, then of its exercises' solutions (docs/tour_solutions.md),
runs in order in one namespace, from the repository root, and pastes into a plain Python REPL."""

import code

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import TEST_XLA_FLAGS
from tests.test_train import REPO_ROOT

TOUR = os.path.join(REPO_ROOT, "docs", "tour.md")
SOLUTIONS = os.path.join(REPO_ROOT, "docs", "tour_solutions.md")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


# Runs the blocks as a reader does, in order, in one namespace of a fresh interpreter (the tour's first block splits
# the CPU into 4 devices, which only works before JAX starts); a failing block names itself in the traceback.
RUNNER = """
import json, sys
namespace = {"__name__": "tour"}
for number, block in enumerate(json.load(open(sys.argv[1])), 1):
    exec(compile(block, f"docs/tour.md block {number}", "exec"), namespace)
print("TOUR OK: " + str(len(namespace["jax"].devices())) + " devices")
"""


@pytest.mark.slow
@pytest.mark.every_stack
def test_every_block_of_the_tour_and_its_solutions_runs_in_order(tmp_path):
    with open(TOUR) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 12  # one per stop, at least
    with open(SOLUTIONS) as f:
        solutions = python_blocks(f.read())
    assert len(solutions) == 3  # one per exercise
    blocks += solutions
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS)  # without a device count: the tour's first block sets it
    result = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=REPO_ROOT,
                            env=dict(env, PYTHONPATH=REPO_ROOT), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "TOUR OK: 4 devices", result.stdout[-2000:]


class PastedIntoTheREPL(code.InteractiveConsole):
    """Python's own interactive console, fed a block line by line as a paste into `python` is, compiling each
    statement as the REPL does but running nothing: it records the syntax errors a reader would meet (a top-level
    line straight after an indented block, which the REPL reads as part of it; a blank line inside a function)."""

    def __init__(self, errors: list):
        super().__init__()
        self.errors, self.line = errors, ""

    def runcode(self, compiled):
        pass

    def showsyntaxerror(self, filename=None, **kwargs):
        self.errors.append(f"{self.line!r}: {sys.exc_info()[1]}")


@pytest.mark.parametrize("page", [TOUR, SOLUTIONS], ids=os.path.basename)
def test_every_block_pastes_into_a_plain_python_repl(page):
    with open(page) as f:
        blocks = python_blocks(f.read())
    errors = []
    for number, block in enumerate(blocks, 1):
        console = PastedIntoTheREPL(errors)
        for line in block.splitlines() + [""]:  # the paste, then Enter
            console.line = f"block {number}: {line}"
            console.push(line)
    assert not errors, errors


def test_the_line_counts_readme_quotes_are_true():
    """README's '~N lines' for a file stays within 10% of the file's length."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    quoted = re.findall(r"`(gptjax/[\w/]+\.py)`[^`~]*?~(\d+) lines", readme)
    assert quoted, "README quotes no line count"
    for path, lines in quoted:
        with open(os.path.join(REPO_ROOT, path)) as f:
            actual = len(f.readlines())
        assert abs(actual - int(lines)) <= 0.1 * int(lines), f"README says {path} has ~{lines} lines; it has {actual}"


def test_the_reading_path_page_is_the_code_and_at_most_800_lines():
    """docs/reading_path.md is regenerated from the code here: a changed function on the path, or a path grown past
    800 lines, fails until the page is rewritten (python docs/make_reading_path.py). The page's line count is the
    one README quotes."""
    spec = importlib.util.spec_from_file_location("make_reading_path", os.path.join(REPO_ROOT, "docs",
                                                                                    "make_reading_path.py"))
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    page, code_lines = maker.render()
    with open(maker.PAGE) as f:
        assert f.read() == page, "docs/reading_path.md is stale: run python docs/make_reading_path.py"
    assert code_lines <= maker.MAX_LINES == 800
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        quoted = re.search(r"reading_path\.md\)[^~]*~(\d+) lines", f.read())
    assert quoted and abs(int(quoted.group(1)) - code_lines) <= 0.1 * code_lines, (quoted, code_lines)


def test_every_stop_names_the_jax_idea_it_teaches():
    with open(TOUR) as f:
        stops = re.split(r"^## (?=\d+\. )", f.read(), flags=re.MULTILINE)[1:]
    assert len(stops) >= 12
    for stop in stops:
        assert "*JAX idea" in stop.split("\n## ")[0], f"stop {stop.splitlines()[0]!r} names no JAX idea"
