"""The one thread that owns the model: it runs the engine and hands each request's outputs to its HTTP handler.

MLX work (preprocessing into arrays, prefill, decode steps, mask decoding) happens here only; the HTTP side puts
jobs and cancellations into an inbox and reads events from a per-request asyncio queue. A request is one engine
request: n choices are n rows sharing one prefill (seeds seed, seed+1, ...), a beam search or best_of returns its n
best sequences; its events carry the choice's index, and the capacity counts rows. A request's own fault (its
constraint failing while decoding) ends it alone with a 400 naming its field; a fault of the engine itself fails
the running requests with a message that quotes none of them. An engine step is bounded (a decode step and a budget
of prefill work), so cancellations and the shutdown's grace are seen between steps, whatever prompt is prefilling.
"""

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx

from .. import defaults
from ..tasks.detection import ObjectReader, objects_to_json
from ..generation.engine import PREFILL_BUDGET, Engine
from ..errors import InputError
from ..processing.tokens import logprob_entry


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
    n: int = 1  # choices
    logprobs: bool = False  # hand out each token's log-probability (and settings["logprobs"] alternatives)
    min_score: float = defaults.MIN_SCORE  # objects scoring less are left out

    @property
    def rows(self) -> int:
        """Engine rows the request holds: its beams or samples (best_of), or one per choice."""
        return max(self.settings.get("num_beams", 1), self.settings.get("best_of", 1)) if self.beams else self.n

    @property
    def beams(self) -> bool:
        """A beam search or a best_of: one engine request that returns the n choices itself."""
        return self.settings.get("num_beams", 1) > 1 or self.settings.get("best_of", 1) > 1


@dataclass
class Event:
    """What the worker tells a handler: `accepted` (or `error`) once, then text pieces of choice `index`, the last
    of each choice with `finish_reason` (and `objects` when asked)."""

    kind: str  # "accepted", "error", "output"
    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    objects: Optional[list] = None
    message: str = ""
    status: int = 400
    index: int = 0
    logprobs: Optional[list] = None  # OpenAI's logprobs.content entries of this piece's tokens, when asked
    param: Optional[str] = None  # the request field an error is about


@dataclass(eq=False)  # compared and hashed by identity: one request may sit under several uids
class Handle:
    job: Job
    loop: asyncio.AbstractEventLoop
    events: "asyncio.Queue[Event]" = field(default_factory=asyncio.Queue)
    uids: Dict[int, int] = field(default_factory=dict)  # engine uid -> choice index
    done: bool = False

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Worker(threading.Thread):
    def __init__(self, model, processor, batch_size: int = 8, queue_size: int = 32, mask_decoder=None,
                 deterministic: bool = False, prefill_budget: float = PREFILL_BUDGET):
        super().__init__(name="mlx-paligemma-engine", daemon=True)
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.deterministic, self.prefill_budget = deterministic, prefill_budget
        self.engine = self._engine()
        self.capacity = batch_size + queue_size
        self.mask_decoder = mask_decoder
        if mask_decoder is not None:
            mx.eval(mask_decoder.parameters())  # lazy arrays are computed on their own thread's stream: here
        self.objects = ObjectReader(None, processor.tokenizer.decode, decoder=mask_decoder, fetch=False)
        self.inbox: List[Tuple[str, Handle]] = []
        self.wake = threading.Condition()
        self.held = 0  # rows of the requests taken and not yet finished, cancelled or refused
        self.handles: Dict[int, Handle] = {}  # by engine uid
        # For /health: running rows, waiting requests, requests whose prefill runs, answers finished, requests
        # cancelled before their end.
        self.stats = {"active": 0, "waiting": 0, "prefilling": 0, "finished": 0, "cancelled": 0,
                      "peak_memory_gb": 0.0}
        self.closing: Optional[float] = None  # after shutdown(): when the running rows are cut

    def _engine(self) -> Engine:
        return Engine(self.model, self.processor, batch_size=self.batch_size, deterministic=self.deterministic,
                      prefill_budget=self.prefill_budget)

    # Called from the HTTP side.

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Handle:
        handle = Handle(job, loop)
        with self.wake:
            if self.closing is not None:
                raise QueueFull("the server is shutting down")
            if self.held + job.rows > self.capacity:
                raise QueueFull(f"the server is busy: {self.held} rows running or waiting, this request needs "
                                f"{job.rows} and the limit is {self.capacity}; try again shortly")
            self.held += job.rows
            self.inbox.append(("submit", handle))
            self.wake.notify()
        return handle

    def admin(self, fn) -> Future:
        """Run fn(engine) on this thread, between steps (adapters loaded or unloaded at run time change the model
        the steps use); its result, or its exception, comes in the future."""
        future = Future()
        with self.wake:
            if self.closing is not None:
                raise QueueFull("the server is shutting down")
            self.inbox.append(("admin", (fn, future)))
            self.wake.notify()
        return future

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
                                      prefilling=self.engine.prefilling,
                                      peak_memory_gb=round(mx.get_peak_memory() / 1e9, 3))
            self.stats.update(active=0, waiting=0, prefilling=0)
            if self.closing is not None:
                return

    def _close(self) -> None:
        """Shutting down: requests still waiting get an error now; those being prefilled or answered go on until the
        grace period ends, and the answers under way are then cut short."""
        waiting = {row.uid for row in self.engine.waiting}
        answering = {row.uid for batch in self.engine.batches for row in batch.rows}
        cut = time.monotonic() >= self.closing
        for handle in set(self.handles.values()):
            if cut or all(uid in waiting for uid in handle.uids):
                handle.put(Event("error", message="the server is shutting down" + (
                    ": the answer was cut short" if any(uid in answering for uid in handle.uids) else ""),
                    status=503))
                self._finish(handle)

    def _finish(self, handle: Handle) -> None:
        """The request is over (answered, failed or cancelled): its rows leave the engine and free their places."""
        if handle.done:
            return
        handle.done = True
        for uid in handle.uids:
            self.engine.cancel(uid)  # a no-op for rows that finished
            self.handles.pop(uid, None)
        with self.wake:
            self.held -= handle.job.rows


    def _take_inbox(self) -> None:
        with self.wake:
            items, self.inbox = self.inbox, []
        for kind, handle in items:
            if kind == "admin":
                fn, future = handle
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:  # the caller answers it (InputError: the request's fault)
                    future.set_exception(e)
                continue
            if kind == "cancel":
                if not handle.done:  # a request that finished has nothing to cancel
                    self.stats["cancelled"] += 1
                    self._finish(handle)
                continue
            job = handle.job
            try:
                uid = self.engine.submit(job.images, job.prompt, **job.settings, **choices(job))
                handle.uids[uid] = 0
                self.handles[uid] = handle
            except InputError as e:  # the request's fault: a 400 naming its field
                handle.put(Event("error", message=str(e), status=400, param=e.param))
                self._finish(handle)
                continue
            except Exception:  # ours: a 500 that quotes nothing of the request
                handle.put(Event("error", message="the request could not be queued: internal error", status=500))
                self._finish(handle)
                continue
            handle.put(Event("accepted"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # the engine's own fault (a request's fault ends that request in the engine): the
            # running requests fail with a message naming no request's input, and the server goes on
            message = f"generation failed: internal error ({type(e).__name__})"
            for handle in set(self.handles.values()):
                handle.put(Event("error", message=message, status=500))
                self._finish(handle)
            self.engine = self._engine()
            return
        for out in outputs:
            handle = self.handles.get(out.uid)
            if handle is None:  # cancelled while its last token was being computed
                continue
            if out.result is not None and out.result.error is not None:  # its own constraint, sampler, ...
                error = out.result.error
                handle.put(Event("error", message=str(error), status=400, param=getattr(error, "param", None)))
                self._finish(handle)
                continue
            if out.sequences is not None:  # a beam search (best_of) ends at once: its n sequences are the n choices
                answers = list(enumerate(out.sequences))
                events = [Event("output", a.text, a.finish_reason, out.prompt_tokens, len(a.tokens), index=i)
                          for i, a in answers]
                pairs = [list(zip(a.tokens, a.logprobs)) for _, a in answers]
            else:
                answers = [(out.index, out.answer)]
                events = [Event("output", out.text, out.finish_reason, out.prompt_tokens, out.generation_tokens,
                                index=out.index)]
                pairs = [[(out.token, out.logprob)]]
            for event, pair, (_, answer) in zip(events, pairs, answers):
                if handle.job.logprobs:
                    top = out.top_logprobs if out.sequences is None else None
                    event.logprobs = [self._logprob(t, v, top or []) for t, v in pair]
                if event.finish_reason and handle.job.objects:
                    try:
                        event.objects = objects_to_json(self.objects.read(answer, handle.job.size,
                                                                          handle.job.min_score))
                    except Exception:  # this request fails, the others go on
                        event = Event("error", message="cannot read the answer's objects", status=500)
                handle.put(event)
                if event.kind == "error":
                    self._finish(handle)
                    break
            if not handle.done and out.result is not None:  # every choice ended
                self.handles.pop(out.uid, None)
                self.stats["finished"] += 1
                self._finish(handle)

    def _logprob(self, token: int, logprob: float, top: list) -> dict:
        """OpenAI's logprobs.content entry of one token, with its top alternatives (and each token's id)."""
        return logprob_entry(self.processor.tokenizer, token, logprob, top)


def choices(job: Job) -> dict:
    """How the request makes its n choices: a beam search (best_of) returns its n best, otherwise n sampled rows
    (seeds seed, seed+1, ..., so choice i is what a request of seed+i answers alone)."""
    return {"num_return_sequences": job.n} if job.beams else {"n": job.n}
