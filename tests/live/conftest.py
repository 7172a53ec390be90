"""Tests that run transformers itself beside this project: collected only where torch and transformers are installed
(CI's live-reference step), so that the fast suite neither runs nor counts them."""

from importlib.util import find_spec

if find_spec("torch") is None or find_spec("transformers") is None:
    collect_ignore_glob = ["test_*.py"]
