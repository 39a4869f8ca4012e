"""docs/tour.md cannot rot: every ```python block of it runs, in order, in one namespace, from the repository root."""

import os
import re

import pytest

from tests.test_train import REPO_ROOT

TOUR = os.path.join(REPO_ROOT, "docs", "tour.md")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.slow
def test_every_block_of_the_tour_runs_in_order(monkeypatch):
    with open(TOUR) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 9  # one per stop, at least
    monkeypatch.chdir(REPO_ROOT)
    namespace = {"__name__": "tour"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"docs/tour.md block {number}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"docs/tour.md block {number} failed: {e!r}\n{block}") from e


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

