"""A running request's events as its reply reads them, for every reply shape (chat completions, responses)."""

import asyncio
import time
from typing import AsyncIterator, List, Optional, Tuple

from starlette.requests import Request

from . import tools
from .chat import ApiError
from .worker import Event, Handle

KEEPALIVE_S = 1.0  # an SSE comment this often while a request waits, so a client that left is noticed


def event_error(event: Event) -> ApiError:
    """A request's error once it runs: its own fault (a 4xx naming its field) or the server's."""
    return ApiError(event.status, event.message, type="invalid_request_error" if event.status < 500 else "server_error",
                    param=tools.param(event.param))


async def each(handle: Handle) -> AsyncIterator[Optional[Event]]:
    """The request's events as they come, and None after each KEEPALIVE_S without one (a stream sends a comment
    then: a client that left is noticed). The caller stops reading at the last one."""
    while True:
        try:
            yield await asyncio.wait_for(handle.events.get(), KEEPALIVE_S)
        except asyncio.TimeoutError:
            yield None


async def collect(handle: Handle, request: Request) -> Optional[Tuple[List[str], List[list], List[Event]]]:
    """Each choice's text, log-probability entries and last event (with its finish reason); None when the client
    left meanwhile; a request's error raised as an ApiError."""
    n = handle.job.n
    texts, entries, last = [""] * n, [[] for _ in range(n)], [None] * n
    checked = time.monotonic()
    async for event in each(handle):
        # Tokens may arrive faster than the check interval: look for a departed client by the clock.
        if time.monotonic() - checked >= KEEPALIVE_S:
            if await request.is_disconnected():
                return None
            checked = time.monotonic()
        if event is None:
            continue
        if event.kind == "error":
            raise event_error(event)
        texts[event.index] += event.text
        entries[event.index] += event.logprobs or []
        if event.finish_reason:
            last[event.index] = event
            if all(last):
                return texts, entries, last
