"""Many requests through one engine: each request's Result as it ends, in the order they end.

The one loop under batch_generate, the batch command, evaluation and scoring: requests are submitted lazily, about
`window` waiting at a time, so their images are read as their rows are about to join and a long list streams
through in bounded memory.

    for key, result in run_all(engine, ((i, lambda i=i: engine.submit(images[i], prompts[i])) for i in ...)):
        ...   # result: the engine's Result, or the InputError that refused the request at submit
"""

from typing import Callable, Hashable, Iterable, Iterator, List, Optional, Tuple, Union

from ..errors import InputError
from .engine import Engine
from .results import Output, Result


def run_all(engine: Engine, submits: Iterable[Tuple[Hashable, Callable[[], int]]], window: Optional[int] = None,
            on_step: Optional[Callable[[List[Output]], None]] = None
            ) -> Iterator[Tuple[Hashable, Union[Result, InputError]]]:
    """(key, Result) of every request as it ends; (key, InputError) for one refused at submit (the others go on).
    `submits` gives each request's key and the call that submits it (returning its uid); `on_step` sees each
    step's outputs (pieces, progress)."""
    window = engine.batch_size if window is None else window
    queue = iter(submits)
    keys = {}
    with engine.running():
        while True:
            while len(engine.waiting) < window:
                item = next(queue, None)
                if item is None:
                    break
                key, submit = item
                try:
                    keys[submit()] = key
                except InputError as e:
                    yield key, e
            if not engine.has_work:
                return
            outputs = engine.step()
            if on_step is not None:
                on_step(outputs)
            for out in outputs:
                if out.result is not None:
                    yield keys.pop(out.uid), out.result
