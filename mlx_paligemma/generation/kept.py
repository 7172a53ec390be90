"""What the engine keeps for a model from call to call, beside the model rather than on it: its compiled decode
steps and its image-feature cache, shared by every engine on that model (generate, stream_generate, the servers).
The model stays a plain function of its inputs; what is kept here goes when the model goes."""

import weakref
from typing import Dict

_KEPT: Dict[int, dict] = {}


def kept(model) -> dict:
    """The model's own dict of kept things (by the model's identity)."""
    key = id(model)
    if key not in _KEPT:
        _KEPT[key] = {}
        weakref.finalize(model, _KEPT.pop, key, None)
    return _KEPT[key]
