"""The tests, and the scripts they run in fresh processes (which import from here), start as every gptjax command
does: with the Apple stack's shims installed (gptjax/compat.py; nothing on current releases)."""

from gptjax import compat

compat.install()
