"""python -m mlx_paligemma.server --model M [--host 127.0.0.1] [--port 8080] ...: see mlx_paligemma/server/__init__.py."""

import argparse
import os
import sys

from ..cli import ArgumentParser
from ..processor import InputError
from .chat import Limits


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


def build_parser() -> ArgumentParser:
    d = Limits()
    p = ArgumentParser(description="Serve PaliGemma: OpenAI-compatible chat completions and a web page.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--batch-size", type=positive(int), default=8, help="rows sharing each decode step (8)")
    p.add_argument("--queue-size", type=int, default=32,
                   help="requests that may wait beyond the running rows; more get 503 (32)")
    p.add_argument("--api-key", default=os.environ.get("MLX_PALIGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MLX_PALIGEMMA_API_KEY, else none)")
    p.add_argument("--max-tokens-limit", type=positive(int), default=d.max_tokens,
                   help=f"largest max_tokens a request may ask for ({d.max_tokens})")
    p.add_argument("--default-max-tokens", type=positive(int), default=d.default_max_tokens,
                   help=f"max_tokens when a request gives none ({d.default_max_tokens})")
    p.add_argument("--max-image-pixels", type=positive(int), default=d.max_image_pixels,
                   help=f"per image, width x height ({d.max_image_pixels})")
    p.add_argument("--max-images", type=positive(int), default=d.max_images, help=f"per request ({d.max_images})")
    p.add_argument("--max-image-bytes", type=positive(int), default=d.max_image_bytes,
                   help=f"per image, encoded, from a data URL, a URL or a file ({d.max_image_bytes})")
    p.add_argument("--max-body-bytes", type=positive(int), default=32 * 2**20, help="per request (32 MiB)")
    p.add_argument("--fetch-timeout", type=positive(float), default=d.fetch_timeout,
                   help=f"seconds to download an image URL ({d.fetch_timeout:g})")
    p.add_argument("--allow-local-files", action="store_true",
                   help="let image URLs be paths or file:// URLs on this machine (off: only data: and http(s))")
    p.add_argument("--mask-decoder", metavar="PATH",
                   help="vae-oid.npz or its safetensors copy, to return masks of segment answers; 'download' fetches "
                        "big_vision's once (without it, segmented objects carry their 16 codes)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.queue_size < 0:
        raise InputError(f"--queue-size must be >= 0, got {args.queue_size}")
    try:
        import uvicorn

        from .app import make_app
    except ImportError as e:
        raise InputError(f'the server needs starlette and uvicorn ({e}): pip install "mlx-paligemma[server]"') from None
    from ..loading import load
    from ..mask_decoder import fetch_vae_oid, load_mask_decoder
    from .worker import Worker

    mask_decoder = None
    if args.mask_decoder:
        mask_decoder = load_mask_decoder(fetch_vae_oid() if args.mask_decoder == "download" else args.mask_decoder)
    model, processor = load(args.model, revision=args.revision)
    limits = Limits(max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                    max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                    max_image_bytes=args.max_image_bytes, fetch_timeout=args.fetch_timeout,
                    allow_local_files=args.allow_local_files)
    worker = Worker(model, processor, args.batch_size, args.queue_size, mask_decoder)
    worker.start()
    app = make_app(worker, args.model, limits, args.api_key, args.max_body_bytes)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    # Connections beyond what the queue can hold get uvicorn's own 503 before their bodies are read.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                limit_concurrency=2 * (args.batch_size + args.queue_size) + 32)
    worker.stop()
    return 0


def entry() -> None:
    """The console script: bad input ends with one `error:` line (cli.run_main)."""
    from ..cli import run_main

    run_main(main)


if __name__ == "__main__":
    entry()
