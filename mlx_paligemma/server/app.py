"""The HTTP side (Starlette on uvicorn): routes, API key, body limit, OpenAI's response shapes, server-sent events.

Handlers never touch MLX: they check the request (chat.parse_request, in a thread pool), hand a Job to the worker
and relay its events. Every exit from a request, finished or not, tells the worker to cancel it, which frees the
row of a client that went away (a no-op for one that finished).
"""

import asyncio
import hmac
import time
import uuid
from importlib import resources
from typing import Optional

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import InputError, cause
from ..generation.constraints import make_constraint
from ..generation.settings import CONSTRAINTS
from ..models.adapters import adapter_names
from . import responses, tools
from .adapters import adapter_routes, listed
from .body import dumps
from .chat import ApiError, Limits, check_request, chosen_adapter, parse_json
from .decoding import DECODING
from .images import read_images
from .relay import collect, each, event_error
from .worker import Handle, Job, QueueFull, Worker

BODY_TIMEOUT_S = 30.0  # to send the whole body: a client that trickles it is cut off
FETCHING = 16  # requests downloading image URLs at once; more get 503 (a slow URL holds a thread until its deadline)


class JSON(JSONResponse):
    """A JSON body as body.dumps writes it: valid JSON, in ASCII."""

    def render(self, content) -> bytes:
        return dumps(content).encode("ascii")


def error_body(status: int, message: str, type: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type or ("invalid_request_error" if status < 500 else "server_error"),
                      "param": None, "code": code}}


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
             max_body_bytes: int = 32 * 2**20, body_budget: Optional[int] = None,
             adapter_root: Optional[str] = None) -> Starlette:
    """`body_budget`: bytes of request bodies held at once (read, or being checked; 8 bodies by default); a
    request that would go beyond gets 503, so many large bodies together cannot exhaust memory. `adapter_root`:
    the folder inside which /v1/adapters may load adapters at run time (None: no loading at run time)."""
    page = resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")
    budget = {"left": body_budget or 8 * max_body_bytes}
    fetching = anyio.CapacityLimiter(FETCHING)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def too_large(what: str) -> ApiError:
        return ApiError(413, f"the request body is {what}, more than this server's limit of {max_body_bytes} bytes",
                        code="request_too_large")

    def busy(why: str) -> ApiError:
        return ApiError(503, f"the server is busy: {why}; try again shortly", type="server_error", code="server_busy")

    async def read_body(request: Request, held: list) -> bytearray:
        """The body, within max_body_bytes, BODY_TIMEOUT_S and the budget; `held` counts what it took of it."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise too_large(f"{length} bytes")
        body = bytearray()

        async def read():
            async for chunk in request.stream():
                if len(body) + len(chunk) > max_body_bytes:
                    raise too_large("larger")
                if len(chunk) > budget["left"]:
                    raise busy("too many large requests are being read")
                budget["left"] -= len(chunk)
                held[0] += len(chunk)
                body.extend(chunk)

        try:
            await asyncio.wait_for(read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                           code="request_timeout") from None
        return body  # not copied to bytes: the JSON parse reads it as it is

    def compiled(job: Job) -> Job:
        """The request's grammar made here, on a request thread within its deadline (constraints.py), so the model
        thread never waits on one; the engine takes it as made."""
        given = {k: job.settings.pop(k) for k in CONSTRAINTS if k in job.settings}
        if any(v is not None and v is not False for v in given.values()):
            try:
                vocab_size = worker.model.config.text_config.vocab_size
                job.settings["constraint"] = make_constraint(worker.processor, vocab_size, job.prompt, **given)
            except InputError as e:
                raise ApiError(400, str(e), param=tools.param(e.param)) from None
        return job

    def prepare(data: bytes, translate):
        """Everything that needs no image, in a thread (a large body takes a while to parse): the checked request,
        the name of the model that answers it, the body as sent. `translate` makes another API's body a chat
        completion's."""
        sent = parse_json(data)
        body = sent if translate is None else translate(sent)
        adapter = chosen_adapter(body.get("model") if isinstance(body, dict) else None, model_id,
                                 adapter_names(worker.model))
        checked = check_request(body, limits)  # a body that is not an object, or a `model` not a string, ends here
        checked.settings["adapter"] = adapter
        return checked, adapter or model_id, sent

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSON({"status": "ok", "model": model_id, **worker.stats, "images_waiting": len(DECODING.waiting)})

    async def models(request: Request):
        check_key(request)
        return JSON({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx-paligemma"},
            *listed(worker.model, model_id)]})

    async def one_model(request: Request):
        check_key(request)
        entries = [{"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx-paligemma"},
                   *listed(worker.model, model_id)]
        name = request.path_params["id"]
        for entry in entries:
            if entry["id"] == name:
                return JSON(entry)
        known = ", ".join(repr(e["id"]) for e in entries)
        raise ApiError(404, f"model {name[:200]!r} is not served here; this server serves {known}", param="model",
                       code="model_not_found")

    async def start(request: Request, translate=None):
        """A request checked, its images read, handed to the worker and accepted: (checked, handle, the name of the
        model that answers it, the body as sent)."""
        check_key(request)
        held = [0]
        try:
            checked, model, body = await run_in_threadpool(prepare, await read_body(request, held), translate)
            # A download may take its whole deadline: downloads have threads of their own, `fetching`.
            if checked.urls and fetching.available_tokens < 1:
                raise busy(f"{FETCHING} requests are downloading images")
            job = await read_images(checked, limits, fetching)
            job = await run_in_threadpool(compiled, job)
        finally:
            budget["left"] += held[0]
        try:
            handle = worker.submit(job, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="server_busy") from None
        try:
            first = await handle.events.get()  # accepted, or refused by the processor (e.g. too many images)
            if first.kind == "error":
                raise event_error(first)
        except BaseException:
            worker.cancel(handle)
            raise
        return checked, handle, model, body

    async def chat_completions(request: Request):
        checked, handle, model, _ = await start(request)
        reply = Reply(handle, model, checked.call)
        if checked.stream:
            return _Stream(reply.events(checked.include_usage), on_close=lambda: worker.cancel(handle))
        try:
            return await reply.whole(request)
        finally:
            worker.cancel(handle)

    async def create_response(request: Request):
        try:
            checked, handle, model, body = await start(request, responses.to_chat)
        except ApiError as e:
            raise responses.renamed(e) from None
        reply = responses.Reply(handle, model, body, checked.call)
        if checked.stream:
            return _Stream(reply.events(), on_close=lambda: worker.cancel(handle))
        try:
            return JSON(await reply.whole(request) or {})  # nobody reads an empty one: its client left
        finally:
            worker.cancel(handle)

    async def api_error(request: Request, e: ApiError):
        return JSON(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException):
        return JSON(error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}"),
                    status_code=e.status_code)

    async def disconnected(request: Request, e: ClientDisconnect):
        return JSON(error_body(400, "the client closed the connection before sending the whole body"), 400)

    async def server_error(request: Request, e: Exception):
        return JSON(error_body(500, f"internal error: {type(e).__name__}: {cause(e)}"), status_code=500)

    return Starlette(
        routes=[Route("/", index), Route("/health", health), Route("/v1/models", models),
                Route("/v1/models/{id:path}", one_model),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/responses", create_response, methods=["POST"]),
                *adapter_routes(worker, api_key, check_key, adapter_root, JSON, model_id)],
        exception_handlers={ApiError: api_error, HTTPException: http_error, ClientDisconnect: disconnected,
                            Exception: server_error},
    )


class Reply:
    """OpenAI's chat.completion and chat.completion.chunk shapes around one request's events: n choices, each
    with its index, its finish reason and, when asked, its tokens' logprobs; with a forced call, its tool_calls."""

    def __init__(self, handle: Handle, model_id: str, call: Optional[tools.Call] = None):
        self.handle, self.model_id, self.call = handle, model_id, call
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _logprobs(self, entries: list) -> Optional[dict]:
        return {"content": entries, "refusal": None} if self.handle.job.logprobs else None

    def _chunk(self, index: int, delta: dict, finish_reason: Optional[str] = None, logprobs=None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def _objects(self, out: dict, choice: dict, objects) -> None:
        """Each choice carries its objects; with one choice they are also at the top, where they were first."""
        if self.handle.job.objects:
            choice["objects"] = objects
            if self.handle.job.n == 1:
                out["objects"] = objects

    @staticmethod
    def _sse(data) -> str:
        return f"data: {dumps(data)}\n\n"

    async def events(self, include_usage: bool):
        n = self.handle.job.n
        calls = [tools.Answer(self.call) for _ in range(n)] if self.call else None
        for i in range(n):
            yield self._sse(self._chunk(i, calls[i].first() if calls else {"role": "assistant", "content": ""}))
        left, prompt_tokens, completion_tokens = n, 0, 0
        async for event in each(self.handle):
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if event.kind == "error":  # the headers are sent: the error goes in the stream, as OpenAI does
                yield self._sse(event_error(event).body())
                return
            if event.text or event.logprobs:
                delta = calls[event.index].piece(event.text) if calls else {"content": event.text}
                if delta or event.logprobs:  # a choice among several tools arrives whole at its end
                    yield self._sse(self._chunk(event.index, delta or {},
                                                logprobs=self._logprobs(event.logprobs or [])))
            if event.finish_reason:
                delta, finish = calls[event.index].last(event.finish_reason) if calls else (None, event.finish_reason)
                if delta:
                    yield self._sse(self._chunk(event.index, delta))
                last = self._chunk(event.index, {}, finish)
                self._objects(last, last["choices"][0], event.objects)
                yield self._sse(last)
                left -= 1
                prompt_tokens, completion_tokens = event.prompt_tokens, completion_tokens + event.completion_tokens
                if left == 0:
                    break
        if include_usage:
            yield self._sse({**self._head("chat.completion.chunk"), "choices": [],
                             "usage": self._usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    async def whole(self, request: Request) -> JSONResponse:
        got = await collect(self.handle, request)
        if got is None:
            return JSON({})  # nobody reads it; the caller cancels the request
        texts, entries, last = got
        out = {**self._head("chat.completion"), "choices": [],
               "usage": self._usage(last[0].prompt_tokens, sum(e.completion_tokens for e in last))}
        for i, event in enumerate(last):
            message, finish = ({"role": "assistant", "content": texts[i]}, event.finish_reason) if self.call is None \
                else tools.message(self.call, texts[i], event.finish_reason)
            choice = {"index": i, "message": message, "logprobs": self._logprobs(entries[i]), "finish_reason": finish}
            self._objects(out, choice, event.objects)
            out["choices"].append(choice)
        return JSON(out)
