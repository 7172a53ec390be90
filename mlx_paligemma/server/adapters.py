"""Adapters on the server: /v1/models lists each one beside the base, and /v1/adapters loads and unloads them at
run time, behind the API key, from folders inside the one root the server was given (--adapter-root).

    GET    /v1/adapters                 each loaded adapter: name, folder, rank, scale, layers, memory_bytes (its
                                        factors), added_bytes (what loading it added, padding to larger ranks too)
    POST   /v1/adapters  {"name": "receipts", "path": "receipts-v2"}   (path relative to the root, or inside it;
                                        read and checked by formats.adapters.read_adapter)
    DELETE /v1/adapters/receipts        refused (409) while a running or waiting request uses it

Loading and unloading run on the worker's thread between decode steps (Worker.admin), so no step sees a model
half changed; a request already checked against a name that has gone since gets a 400 naming it.
"""

import asyncio
import time
from pathlib import Path
from typing import Callable, List, Optional

from starlette.requests import Request
from starlette.routing import Route

from ..errors import Conflict, InputError
from ..formats.adapters import OutsideRoot, read_adapter
from ..generation.adapters import load_at_run_time, unload_at_run_time
from ..models.adapters import MAX_ADAPTERS, adapter_set, check_name
from .chat import ApiError, parse_json
from .worker import QueueFull, Worker

MAX_ADMIN_BODY = 4096  # bytes of an admin request: a name and a path
BODY_TIMEOUT_S = 10.0  # to send it whole


def listed(model, parent: str) -> List[dict]:
    """/v1/models entries of the loaded adapters (vLLM's shape: `parent` is the base's id)."""
    found = adapter_set(model)
    if found is None:
        return []
    return [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "mlx-paligemma",
             "parent": parent, "memory_bytes": info["bytes"], "added_bytes": info["added_bytes"]}
            for name, info in found.info.items()]


def adapter_json(name: str, info: dict) -> dict:
    """One loaded adapter as /v1/adapters shows it (models.adapters' info, its folder added by formats.adapters)."""
    return {"name": name, "path": info.get("path"), "rank": info["rank"], "scale": info["scale"],
            "layers": len(info["layers"]), "memory_bytes": info["bytes"], "added_bytes": info["added_bytes"]}


def described(model) -> List[dict]:
    found = adapter_set(model)
    return [adapter_json(name, info) for name, info in (found.info.items() if found else [])]


def refused(e: InputError) -> ApiError:
    """An adapter refused, as the server answers it: outside the root 403, for what is loaded now 409, else 400."""
    if isinstance(e, OutsideRoot):
        return ApiError(403, str(e), param=e.param, code="forbidden_path")
    return ApiError(409 if isinstance(e, Conflict) else 400, str(e), param=e.param)


def adapter_routes(worker: Worker, api_key: Optional[str], check_key: Callable, root: Optional[str],
                   respond: Callable, served: str) -> List[Route]:
    """The /v1/adapters routes; `respond` makes the JSON response, `check_key` refuses a missing or wrong key,
    `served`: the base's name in requests, which no adapter may take."""
    root_path = Path(root).resolve() if root is not None else None

    def guard(request: Request, loading: bool) -> None:
        check_key(request)
        if api_key is None:
            raise ApiError(403, "adapters are loaded and unloaded at run time only on a server with --api-key",
                           code="admin_disabled")
        if loading and root_path is None:
            raise ApiError(403, "this server loads no adapters at run time: start it with --adapter-root ROOT",
                           code="admin_disabled")

    async def on_worker(fn):
        try:
            return await asyncio.wrap_future(worker.admin(fn))
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="server_busy") from None

    async def listing(request: Request):
        check_key(request)
        return respond({"object": "list", "data": described(worker.model), "limit": MAX_ADAPTERS})

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) as soon as it runs past MAX_ADMIN_BODY: never held whole when too large."""
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_ADMIN_BODY:
                raise ApiError(413, f"an adapter request takes at most {MAX_ADMIN_BODY} bytes",
                               code="request_too_large")
        return bytes(body)

    async def load(request: Request):
        guard(request, loading=True)
        try:
            body = parse_json(await asyncio.wait_for(read_body(request), BODY_TIMEOUT_S))
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                           code="request_timeout") from None
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object: {"name": ..., "path": ...}')
        name = body.get("name")
        try:
            check_name(name, (served,))  # a name at all, so the folder is read as LoRA beside the base
            # Read on the worker's thread too: MLX's evaluation is not to run on two threads at once.
            info = await on_worker(lambda engine: load_at_run_time(
                engine, name, read_adapter(body.get("path"), name, root_path, (served,))))
        except InputError as e:
            raise refused(e) from None
        return respond(adapter_json(name, info))

    async def unload(request: Request):
        guard(request, loading=False)
        name = request.path_params["name"]

        try:
            await on_worker(lambda engine: unload_at_run_time(engine, name))
        except Conflict as e:
            raise ApiError(409, str(e), code="adapter_in_use") from None
        except InputError as e:
            raise ApiError(404, str(e), param="name", code="model_not_found") from None
        return respond({"name": name, "deleted": True})

    return [Route("/v1/adapters", listing), Route("/v1/adapters", load, methods=["POST"]),
            Route("/v1/adapters/{name}", unload, methods=["DELETE"])]
