"""The one thread that owns the model: it runs the engine and hands each request's outputs to its HTTP handler.

MLX work (preprocessing into arrays, prefill, decode steps, mask decoding) happens here only; the HTTP side puts
jobs and cancellations into an inbox and reads events from a per-request asyncio queue.
"""

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx

from ..detection import add_masks, objects_to_json, parse_detections
from ..engine import Engine
from ..processor import InputError


class QueueFull(Exception):
    """More requests than running rows plus the waiting queue, or a server shutting down: a 503."""


@dataclass
class Job:
    """One checked request: its images (decoded, already at the model's input size), the first one's size as sent
    (objects are in its pixels), the prompt, the engine's settings, whether to parse objects."""

    images: List[Any]  # PIL images
    prompt: str
    settings: Dict[str, Any]
    objects: bool = False
    size: Tuple[int, int] = (0, 0)


@dataclass
class Event:
    """What the worker tells a handler: `accepted` (or `error`) once, then text pieces, the last with
    `finish_reason` (and `objects` when asked)."""

    kind: str  # "accepted", "error", "output"
    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    objects: Optional[list] = None
    message: str = ""
    status: int = 400


@dataclass
class Handle:
    job: Job
    loop: asyncio.AbstractEventLoop
    events: "asyncio.Queue[Event]" = field(default_factory=asyncio.Queue)
    uid: Optional[int] = None
    text: str = ""  # the answer so far, for the objects
    done: bool = False

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Worker(threading.Thread):
    def __init__(self, model, processor, batch_size: int = 8, queue_size: int = 32, mask_decoder=None):
        super().__init__(name="mlx-paligemma-engine", daemon=True)
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.engine = Engine(model, processor, batch_size=batch_size)
        self.capacity = batch_size + queue_size
        self.mask_decoder = mask_decoder
        if mask_decoder is not None:
            mx.eval(mask_decoder.parameters())  # lazy arrays are computed on their own thread's stream: here
        self.inbox: List[Tuple[str, Handle]] = []
        self.wake = threading.Condition()
        self.held = 0  # requests taken and not yet finished, cancelled or refused
        self.handles: Dict[int, Handle] = {}
        # For /health: running rows, waiting requests, answers finished, requests cancelled before their end.
        self.stats = {"active": 0, "waiting": 0, "finished": 0, "cancelled": 0, "peak_memory_gb": 0.0}
        self.closing: Optional[float] = None  # after shutdown(): when the running rows are cut

    # Called from the HTTP side.

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Handle:
        handle = Handle(job, loop)
        with self.wake:
            if self.closing is not None:
                raise QueueFull("the server is shutting down")
            if self.held >= self.capacity:
                raise QueueFull(f"the server is busy: {self.held} requests running or waiting, the limit is "
                                f"{self.capacity}; try again shortly")
            self.held += 1
            self.inbox.append(("submit", handle))
            self.wake.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        with self.wake:
            self.inbox.append(("cancel", handle))
            self.wake.notify()

    def shutdown(self, grace: float = 0.0) -> None:
        """Take no more requests; refuse the waiting ones now, let the running rows finish for `grace` seconds, then
        cut them with an error. The thread ends when nothing is left (join it). Safe from a signal handler."""
        with self.wake:
            if self.closing is None:
                self.closing = time.monotonic() + grace
            self.wake.notify()

    # The thread.

    def run(self) -> None:
        from mlx_lm.generate import generation_stream

        # MLX streams belong to a thread: this one has none by default, so all its work (the engine's steps have
        # their own `with`; the mask decoder and the processor's arrays too) runs on the generation stream.
        with mx.stream(generation_stream):
            self._serve()

    def _serve(self) -> None:
        while True:
            with self.wake:
                while not self.inbox and self.closing is None:
                    self.wake.wait()
            with self.engine.running():
                while True:
                    self._take_inbox()
                    if self.closing is not None:
                        self._close()
                    if not self.engine.has_work:
                        break
                    self._step()
                    self.stats.update(active=self.engine.active, waiting=len(self.engine.waiting),
                                      peak_memory_gb=round(mx.get_peak_memory() / 1e9, 3))
            self.stats.update(active=0, waiting=0)
            if self.closing is not None:
                return

    def _close(self) -> None:
        """Shutting down: requests not yet running get an error now, running ones when the grace period ends."""
        waiting = {row.uid for row in self.engine.waiting}
        cut = time.monotonic() >= self.closing
        for handle in list(self.handles.values()):
            if cut or handle.uid in waiting:
                self.engine.cancel(handle.uid)
                handle.put(Event("error", message="the server is shutting down" + (
                    ": the answer was cut short" if handle.uid not in waiting else ""), status=503))
                self._finish(handle)

    def _finish(self, handle: Handle) -> None:
        if handle.done:
            return
        handle.done = True
        self.handles.pop(handle.uid, None)
        with self.wake:
            self.held -= 1

    def _take_inbox(self) -> None:
        with self.wake:
            items, self.inbox = self.inbox, []
        for kind, handle in items:
            if kind == "cancel":
                if not handle.done:  # a request that finished has nothing to cancel
                    self.engine.cancel(handle.uid)
                    self.stats["cancelled"] += 1
                    self._finish(handle)
                continue
            try:
                handle.uid = self.engine.submit(handle.job.images, handle.job.prompt, **handle.job.settings)
            except Exception as e:  # InputError is the request's fault (400); anything else is ours (500)
                bad_input = isinstance(e, InputError)
                handle.put(Event("error", message=str(e) if bad_input else f"{type(e).__name__}: {e}",
                                 status=400 if bad_input else 500))
                self._finish(handle)
                continue
            self.handles[handle.uid] = handle
            handle.put(Event("accepted"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug or an MLX failure must not take the server down: fail the running requests
            message = f"generation failed: {type(e).__name__}: {e}"
            for handle in list(self.handles.values()):
                handle.put(Event("error", message=message, status=500))
                self._finish(handle)
            self.engine = Engine(self.model, self.processor, batch_size=self.batch_size)
            return
        for out in outputs:
            handle = self.handles.get(out.uid)
            if handle is None:  # cancelled while its last token was being computed
                continue
            handle.text += out.text
            event = Event("output", out.text, out.finish_reason, out.prompt_tokens, out.generation_tokens)
            if out.finish_reason:
                if handle.job.objects:
                    try:
                        event.objects = self._objects(handle)
                    except Exception as e:  # this request fails, the others go on
                        event = Event("error", message=f"cannot read the answer's objects: {e}", status=500)
                self.stats["finished"] += 1
                self._finish(handle)
            handle.put(event)

    def _objects(self, handle: Handle) -> list:
        """The answer's boxes (and masks, with a mask decoder) in pixels of the request's first image."""
        size = handle.job.size
        objects = parse_detections(handle.text, size)
        if self.mask_decoder is not None:
            add_masks(objects, self.mask_decoder, size)
        return objects_to_json(objects)
