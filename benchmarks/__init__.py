"""Speed measurements (`python -m benchmarks.run`). Like every gptjax command, they start by installing the Apple
stack's shims (gptjax/compat.py; nothing on current releases)."""

from gptjax import compat

compat.install()
