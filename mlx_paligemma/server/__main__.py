"""python -m mlx_paligemma.server --model M [--host 127.0.0.1] [--port 8080] ...

See mlx_paligemma/server/__init__.py."""

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from .. import limits as process_limits
from ..cli import ArgumentParser, add_settings
from ..extras import require
from ..generation.adapters import add_limit_arguments, command_adapters
from ..generation.engine import PREFILL_BUDGET, check_prefill_budget
from ..errors import InputError
from .body import dumps
from .chat import Limits

HEAD_TIMEOUT_S = 10.0  # a connection must send a whole request head this soon after it opens or its last answer
MAX_CONNECTIONS = 1000  # open connections beyond which uvicorn answers 503 (idle ones close after HEAD_TIMEOUT_S)
BACKLOG = 2048  # connections the system holds until the server accepts them (while the model loads, too)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def budget(text: str) -> float:
    """--prefill-budget, checked as the engine checks it, before the model loads."""
    try:
        return check_prefill_budget(float(text))
    except (ValueError, InputError) as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, InputError) else f"{text!r} is not a number") from None


def build_parser() -> ArgumentParser:
    d = Limits()
    p = ArgumentParser(description="Serve PaliGemma: OpenAI-compatible chat completions and a web page.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model (default: the main branch)")
    p.add_argument("--adapter-path", default=None,
                   help="LoRA adapters (or fine-tuned weights) written by mlx_paligemma.lora, applied to --model "
                        "(default: none)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="LoRA adapters loaded beside --model, unfused, under NAME: a request chooses them with "
                        "`model` (repeat the flag for several; docs/ADAPTERS.md) (default: none)")
    p.add_argument("--adapter-root", default=None, metavar="ROOT",
                   help="let POST /v1/adapters (with --api-key) load adapters at run time from folders inside ROOT "
                        "(default: off)")
    add_limit_arguments(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (`model` of requests, /v1/models) (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 is this machine only")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    add_settings(p, "server")  # --batch-size, --deterministic: the settings table's
    p.add_argument("--prefill-budget", type=budget, default=PREFILL_BUDGET, metavar="SECONDS",
                   help="prefill work an engine step does beside the running rows' decode step: the longest a "
                        "streaming answer waits between two tokens while other prompts are prefilled (docs/SPEED.md)")
    p.add_argument("--queue-size", type=int, default=32,
                   help="rows that may wait beyond the running ones (a request takes n rows, or num_beams for a beam "
                        "search); more get 503")
    p.add_argument("--api-key", default=os.environ.get("MLX_PALIGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MLX_PALIGEMMA_API_KEY, else none)")
    p.add_argument("--max-tokens-limit", type=positive(int), default=d.max_tokens,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=positive(int), default=d.default_max_tokens,
                   help="max_tokens when a request gives none")
    p.add_argument("--max-prompt-bytes", type=positive(int), default=d.max_prompt_bytes,
                   help="UTF-8 bytes of a prompt, checked before it is tokenized")
    p.add_argument("--max-image-pixels", type=positive(int), default=d.max_image_pixels,
                   help="per image, width x height")
    p.add_argument("--max-images", type=positive(int), default=d.max_images, help="per request")
    p.add_argument("--max-image-bytes", type=positive(int), default=d.max_image_bytes,
                   help="per image, encoded, from a data URL, a URL or a file")
    p.add_argument("--max-body-bytes", type=positive(int), default=32 * 2**20, help="per request")
    c = process_limits.LIMITS
    p.add_argument("--max-choices", type=positive(int), default=c.max_choices, help="strings in `choices`")
    p.add_argument("--max-constraint-bytes", type=positive(int), default=c.max_constraint_bytes,
                   help="UTF-8 bytes of a regex, of the choices together, or of a JSON schema")
    p.add_argument("--compile-seconds", type=positive(float), default=c.compile_seconds,
                   help="time to compile a constraint's grammar and take its first step")
    p.add_argument("--mask-seconds", type=positive(float), default=c.mask_seconds,
                   help="time a constraint's token mask may take (measured on its first)")
    p.add_argument("--decode-budget-bytes", type=positive(int), default=c.decode_budget_bytes,
                   help="memory that image decoding takes at most, all requests together")
    p.add_argument("--max-request-tokens", type=positive(int), default=c.max_request_tokens,
                   help="a request of several rows (n, best_of, num_beams): rows x (prompt tokens + max_tokens) at "
                        "most")
    p.add_argument("--fetch-timeout", type=positive(float), default=d.fetch_timeout,
                   help="seconds for the whole download of an image URL: lookup, connection and every byte")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="also fetch image URLs on loopback, private, link-local and other non-public addresses "
                        "(off: public addresses only; for a trusted network)")
    p.add_argument("--allow-local-files", nargs="?", const=".", default=None, metavar="ROOT",
                   help="let image URLs be paths or file:// URLs of files inside the folder ROOT (symlinks and .. "
                        "resolved; ROOT defaults to the current folder when the flag is given alone) (default: off)")
    p.add_argument("--mask-decoder", metavar="PATH",
                   help="vae-oid.npz or its safetensors copy, to return masks of segment answers; 'download' fetches "
                        "big_vision's once (default: none; segmented objects carry their 16 codes)")
    p.add_argument("--shutdown-grace", type=float, default=3.0,
                   help="seconds running answers may go on after SIGINT or SIGTERM before they are cut")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    return p


def protocol_class():
    """uvicorn's h11 protocol with a deadline for each request head and its plain-text 400 as OpenAI's JSON.

    uvicorn has no deadline for a request head (its --timeout-request-start is an open wish, uvicorn issue #157;
    timeout_keep_alive starts only after a response and stops at the first byte), so a connection that sends
    nothing, or a header a byte at a time, would hold its place for ever, and an ASGI app cannot help: it is called
    once the head is whole. uvicorn's public `http=` setting takes a protocol class; this one is its h11 protocol
    with a timer armed where a head is awaited (connection made, response complete). tests/test_hostile_server.py
    holds both behaviours, so a uvicorn release that moves these hooks fails there, not in use."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout)

        def _head_timeout(self):
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no whole request head yet
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = dumps({"error": {"message": f"bad HTTP request: {msg}", "type": "invalid_request_error",
                                    "param": None, "code": None}}).encode("ascii")
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(body)).encode())]
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                try:
                    self.transport.write(self.conn.send(event))
                except h11.LocalProtocolError:  # a state h11 cannot answer from: close without an answer
                    break
            self.transport.close()

    return Protocol


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, listening before the model loads: a port in use (or a host that is not this machine's)
    is one error line at once. Bound by uvicorn once the model had loaded, it failed with the model's thread
    running, which could end in `terminate called without an active exception` (SIGABRT) instead."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)  # at once, so that a second server started meanwhile cannot bind it too
    except (OSError, OverflowError) as e:
        sock.close()
        raise InputError(f"cannot listen on {host} port {port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def make_server(config, worker, grace: float):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, with its signal handling replaced. uvicorn re-raises the signal once it has shut down:
        SIGTERM then kills the process by the default handler, and SIGINT becomes a KeyboardInterrupt while the
        worker thread still runs MLX, which ends in `terminate called without an active exception` (SIGABRT).
        Here a signal also tells the worker to wind down, and main() joins it and returns normally."""

        received = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in original.items():
                    signal.signal(s, handler)

        def handle_exit(self, sig, frame):
            self.received = self.received or sig
            worker.shutdown(grace)
            super().handle_exit(sig, frame)

    return Server(config)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.queue_size < 0:
        raise InputError(f"--queue-size must be >= 0, got {args.queue_size}")
    if args.shutdown_grace < 0:
        raise InputError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    local_files = None
    if args.allow_local_files is not None:
        local_files = Path(args.allow_local_files).resolve()
        if not local_files.is_dir():
            raise InputError(f"--allow-local-files {args.allow_local_files}: not a folder")
    require("server", "the server")
    import uvicorn

    from .app import make_app
    from ..formats.loading import load
    from ..formats.mask_decoder import fetch_vae_oid, load_mask_decoder
    from .worker import Worker

    if args.adapter and args.adapter_path is not None:
        raise InputError("give --adapter-path (one adapter, applied to --model) or --adapter NAME=PATH (several, "
                         "chosen per request), not both")
    adapters = command_adapters(args, reserved=(args.served_model_name or args.model,))
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise InputError(f"--adapter-root {args.adapter_root}: not a folder")
    listening = listening_socket(args.host, args.port)
    mask_decoder = None
    if args.mask_decoder:
        mask_decoder = load_mask_decoder(fetch_vae_oid() if args.mask_decoder == "download" else args.mask_decoder)
    model, processor = load(args.model, revision=args.revision, adapter_path=args.adapter_path,
                            adapters=adapters or None)
    process_limits.configure(max_choices=args.max_choices, max_constraint_bytes=args.max_constraint_bytes,
                             compile_seconds=args.compile_seconds, mask_seconds=args.mask_seconds,
                             decode_budget_bytes=args.decode_budget_bytes, max_request_tokens=args.max_request_tokens)
    limits = Limits(max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                    max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                    max_image_bytes=args.max_image_bytes, max_prompt_bytes=args.max_prompt_bytes,
                    fetch_timeout=args.fetch_timeout, allow_private_urls=args.allow_private_urls,
                    local_files=local_files, image_size=processor.image_size)
    worker = Worker(model, processor, args.batch_size, args.queue_size, mask_decoder, args.deterministic,
                    args.prefill_budget)
    worker.start()
    app = make_app(worker, args.served_model_name or args.model, limits, args.api_key, args.max_body_bytes,
                   adapter_root=args.adapter_root)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    # Idle connections do not count against the requests: the app answers 503 (JSON) beyond the worker's capacity
    # and bounds bodies and downloads itself; uvicorn's own limit is a last guard on open sockets.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, http=protocol_class(),
                            timeout_keep_alive=5, timeout_graceful_shutdown=int(args.shutdown_grace) + 3,
                            limit_concurrency=MAX_CONNECTIONS, backlog=BACKLOG,
                            h11_max_incomplete_event_size=16 * 2**10)
    server = make_server(config, worker, args.shutdown_grace)
    try:
        server.run(sockets=[listening])
    finally:
        worker.shutdown(0)
        worker.join(timeout=args.shutdown_grace + 10)
    return 130 if server.received == signal.SIGINT else 0


def entry() -> None:
    """The console script: bad input ends with one `error:` line (cli.run_main)."""
    from ..cli import run_main

    run_main(main)


if __name__ == "__main__":
    entry()
