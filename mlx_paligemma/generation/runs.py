"""The one loop that drives an engine for a caller: requests in, each step's outputs out, by the caller's keys.

generate and stream_generate (one request), batch_generate, the batch command, evaluation, scoring and
generate_tokens all run on it; the server's worker is the one owner of a long-running engine, and drives it from its
inbox. Requests are submitted lazily, about `window` waiting at a time, so their images are read as their rows are
about to join and a long list streams through in bounded memory.

    for key, result in run_all(engine, ((i, lambda i=i: engine.submit(images[i], prompts[i])) for i in ...)):
        ...   # result: the engine's Result, or the InputError that refused the request at submit
"""

from typing import Callable, Hashable, Iterable, Iterator, List, Optional, Tuple, Union

from ..errors import InputError
from .engine import Engine
from .results import Output, Result

Submits = Iterable[Tuple[Hashable, Callable[[], int]]]


def run_steps(engine: Engine, submits: Submits, window: Optional[int] = None
              ) -> Iterator[List[Tuple[Hashable, Union[Output, InputError]]]]:
    """Each engine step's outputs, as (key, Output) pairs (a step that only prefilled gives an empty list), and
    (key, InputError) for a request refused at submit (the others go on). `submits` gives each request's key and
    the call that submits it (returning its uid)."""
    window = engine.batch_size if window is None else window
    queue = iter(submits)
    keys = {}
    with engine.running():
        while True:
            refused = []
            while len(engine.waiting) < window:
                item = next(queue, None)
                if item is None:
                    break
                key, submit = item
                try:
                    keys[submit()] = key
                except InputError as e:
                    refused.append((key, e))
            if refused:
                yield refused
            if not engine.has_work:
                return
            outputs = []
            for out in engine.step():
                outputs.append((keys[out.uid], out))
                if out.result is not None:  # it ended: its key is not needed again
                    del keys[out.uid]
            yield outputs


def run_all(engine: Engine, submits: Submits, window: Optional[int] = None,
            on_step: Optional[Callable[[List[Output]], None]] = None
            ) -> Iterator[Tuple[Hashable, Union[Result, InputError]]]:
    """(key, Result) of every request as it ends, in the order they end; (key, InputError) for one refused at
    submit. `on_step` sees each step's outputs (pieces, progress)."""
    for outputs in run_steps(engine, submits, window):
        if on_step is not None:
            on_step([out for _, out in outputs if isinstance(out, Output)])
        for key, out in outputs:
            if isinstance(out, InputError):
                yield key, out
            elif out.result is not None:
                yield key, out.result
