"""The HTTP side (Starlette on uvicorn): routes, API key, body limit, OpenAI's response shapes, server-sent events.

Handlers never touch MLX: they check the request (chat.parse_request, in a thread pool), hand a Job to the worker
and relay its events. Every exit from a request, finished or not, tells the worker to cancel it, which frees the
row of a client that went away (a no-op for one that finished).
"""

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .chat import ApiError, Limits, parse_request
from .worker import Event, Handle, QueueFull, Worker

KEEPALIVE_S = 1.0  # an SSE comment this often while a request waits, so a client that left is noticed


class _Stream(StreamingResponse):
    """Server-sent events that cancel their request however the response ends (done, error, disconnect)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def make_app(worker: Worker, model_id: str, limits: Limits, api_key: Optional[str] = None,
             max_body_bytes: int = 32 * 2**20) -> Starlette:
    page = resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes, more than this server's limit of "
                                f"{max_body_bytes}", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"the request body is more than this server's limit of {max_body_bytes} bytes",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_id, **worker.stats})

    async def models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx-paligemma"}]})

    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request)
        model = body.get("model") if isinstance(body, dict) else None
        if model not in (None, "", model_id):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {model_id!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        job = await run_in_threadpool(parse_request, body, limits)
        try:
            handle = worker.submit(job, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="server_busy") from None
        try:
            first = await handle.events.get()  # accepted, or refused by the processor (e.g. too many images)
            if first.kind == "error":
                raise ApiError(first.status, first.message, type="invalid_request_error" if first.status < 500
                               else "server_error")
        except BaseException:
            worker.cancel(handle)
            raise
        reply = Reply(handle, model_id)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _Stream(reply.events(include_usage), on_close=lambda: worker.cancel(handle))
        try:
            return await reply.whole(request)
        finally:
            worker.cancel(handle)

    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException):
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {e.detail}",
                                       "type": "invalid_request_error", "param": None, "code": None}},
                            status_code=e.status_code)

    async def server_error(request: Request, e: Exception):
        return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    return Starlette(
        routes=[Route("/", index), Route("/health", health), Route("/v1/models", models),
                Route("/v1/chat/completions", chat_completions, methods=["POST"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
    )


class Reply:
    """OpenAI's chat.completion and chat.completion.chunk shapes around one request's events."""

    def __init__(self, handle: Handle, model_id: str):
        self.handle, self.model_id = handle, model_id
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    @staticmethod
    def _usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def _chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    @staticmethod
    def _sse(data) -> str:
        return f"data: {json.dumps(data)}\n\n"

    async def events(self, include_usage: bool):
        yield self._sse(self._chunk({"role": "assistant", "content": ""}))
        while True:
            try:
                event = await asyncio.wait_for(self.handle.events.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event.kind == "error":  # the headers are sent: the error goes in the stream, as OpenAI does
                yield self._sse(ApiError(event.status, event.message, type="server_error").body())
                return
            if event.text:
                yield self._sse(self._chunk({"content": event.text}))
            if event.finish_reason:
                last = self._chunk({}, event.finish_reason)
                if self.handle.job.objects:
                    last["objects"] = event.objects
                yield self._sse(last)
                if include_usage:
                    yield self._sse({**self._head("chat.completion.chunk"), "choices": [],
                                     "usage": self._usage(event)})
                yield "data: [DONE]\n\n"
                return

    async def whole(self, request: Request) -> JSONResponse:
        text, checked = "", time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self.handle.events.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                event = None
            # Tokens may arrive faster than the check interval: look for a departed client by the clock.
            if time.monotonic() - checked >= KEEPALIVE_S:
                if await request.is_disconnected():
                    return JSONResponse({})  # nobody reads it; the caller cancels the request
                checked = time.monotonic()
            if event is None:
                continue
            if event.kind == "error":
                raise ApiError(event.status, event.message, type="server_error")
            text += event.text
            if event.finish_reason:
                break
        out = {**self._head("chat.completion"),
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": event.finish_reason}],
               "usage": self._usage(event)}
        if self.handle.job.objects:
            out["objects"] = event.objects
        return JSONResponse(out)
