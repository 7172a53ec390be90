"""What one request asks of the engine: its prompt ids (or images to encode), its decoding settings (checked by
settings.check_settings, the one check every surface uses), and its constraint, forced continuations or sampler."""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .. import defaults
from .constraints import Constraint
from ..errors import InputError
from .settings import Settings, check_settings


@dataclass
class Request:
    """One prompt and how to answer it. `prompt_ids` is the unpadded prefix; `pixel_values` (N, H, W, 3) its
    images, or `image_features` (N, T, D) when already computed."""

    prompt_ids: List[int]
    pixel_values: Optional[np.ndarray] = None
    image_features: Optional[mx.array] = None
    max_tokens: int = defaults.MAX_TOKENS
    temperature: float = defaults.TEMPERATURE
    top_p: float = defaults.TOP_P
    top_k: int = defaults.TOP_K
    min_p: float = defaults.MIN_P
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = defaults.REPETITION_CONTEXT_SIZE
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    sampler: Optional[Callable[[mx.array], mx.array]] = None  # replaces temperature/top_p/top_k/min_p
    logprobs: Optional[int] = defaults.LOGPROBS  # top alternatives handed out with each token
    num_beams: int = defaults.NUM_BEAMS
    length_penalty: float = defaults.LENGTH_PENALTY
    early_stopping: Union[bool, str] = defaults.EARLY_STOPPING  # True, False or "never", as transformers
    num_return_sequences: int = 1
    # big_vision's best_of_n: sample this many answers (rows sharing one prefill, row i seeded seed + i) and return
    # the likeliest (summed log-probability, <eos> included) first, as a beam search returns its sequences.
    best_of: int = defaults.BEST_OF
    # n answers sampled side by side (rows sharing one prefill, row i seeded seed + i, so choice i is what seed + i
    # answers alone), each handed out as it is made, as OpenAI's n.
    n: int = 1
    # Given continuations, one row each (scoring): their tokens are fed, not chosen, and their log-probabilities
    # handed out. They share the prefix's keys and values.
    forced: Optional[List[List[int]]] = None
    # Structured output (constraints.py): every row's tokens kept inside its grammar; Engine.submit builds it from
    # response_format= / json_schema= / regex= / choices= / constrain=.
    constraint: Optional[Constraint] = None
    # The LoRA adapter its rows run through, by the name it was loaded under (load(..., adapters=)); None: the base.
    adapter: Optional[str] = None

    def __post_init__(self):
        checked = check_settings(**{name: getattr(self, name) for name in Settings().decoding()
                                    if not (name == "temperature" and self.sampler is not None)})
        self.stop = list(checked.stop)
        if self.forced is not None and not (
                self.forced and all(isinstance(f, list) and f and all(isinstance(t, int) for t in f)
                                    for f in self.forced)):
            raise InputError("forced must be a non-empty list of non-empty token id lists", param="forced")
        if self.forced is not None and self.constraint is not None:
            raise InputError("forced continuations are scored as given: they take no constraint", param="forced")
        if self.num_beams > 1 and self.sampler is not None:
            raise InputError("num_beams > 1 decodes deterministically: give no sampler", param="sampler")

    @classmethod
    def of(cls, prompt_ids: List[int], settings: Settings, **more) -> "Request":
        """A request of checked settings (its constraint built from settings.constraint())."""
        return cls(prompt_ids, **settings.decoding(), **more)
