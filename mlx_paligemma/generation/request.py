"""What one request asks of the engine: its prompt ids (or images to encode), its decoding settings (checked by
settings.check_settings, the one check every surface uses), and its constraint, forced continuations or sampler."""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np

from .constraints import Constraint
from ..errors import InputError
from .settings import Settings


@dataclass
class Request:
    """One prompt and how to answer it. `prompt_ids` is the unpadded prefix; `pixel_values` (N, H, W, 3) its
    images, or `image_features` (N, T, D) when already computed."""

    prompt_ids: List[int]
    pixel_values: Optional[np.ndarray] = None
    image_features: Optional[mx.array] = None
    settings: Settings = field(default_factory=Settings)  # how to answer, checked by check_settings
    stop_at_eos: bool = True
    sampler: Optional[Callable[[mx.array], mx.array]] = None  # replaces temperature/top_p/top_k/min_p
    # Given continuations, one row each (scoring): their tokens are fed, not chosen, and their log-probabilities
    # handed out. They share the prefix's keys and values.
    forced: Optional[List[List[int]]] = None
    # Structured output (constraints.py): every row's tokens kept inside its grammar; Engine.submit builds it from
    # response_format= / json_schema= / regex= / choices= / constrain=.
    constraint: Optional[Constraint] = None

    def __post_init__(self):
        if not isinstance(self.settings, Settings):
            raise InputError("a Request's settings come from check_settings(...)", param="settings")
        if self.forced is not None and not (
                self.forced and all(isinstance(f, list) and f and all(isinstance(t, int) for t in f)
                                    for f in self.forced)):
            raise InputError("forced must be a non-empty list of non-empty token id lists", param="forced")
        if self.forced is not None and self.constraint is not None:
            raise InputError("forced continuations are scored as given: they take no constraint", param="forced")
        if self.settings.num_beams > 1 and self.sampler is not None:
            raise InputError("num_beams > 1 decodes deterministically: give no sampler", param="sampler")
