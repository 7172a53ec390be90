"""Generation: the whole prefix in one pass, then one token at a time over a KV cache; and the command line.

    python -m mlx_paligemma.generate --model google/paligemma2-3b-mix-224 --image cat.jpg --prompt "caption en"
"""

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Generator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .cli import ArgumentParser, command, run_main
from .engine import Engine, Request, check_generation_args
from .model import PaliGemma
from .processor import InputError, PaliGemmaProcessor, load_image


@dataclass
class GenerationResponse:
    text: str  # the new piece of text
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop" (eos, a stop string) or "length" on the last response


def generate_step(
    model: PaliGemma,
    input_ids: mx.array,
    pixel_values: Optional[mx.array] = None,
    attention_mask: Optional[mx.array] = None,
    image_features: Optional[mx.array] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    max_tokens: int = 256,
    kv_bits: Optional[int] = None,
) -> Generator[mx.array, None, None]:
    """Yields (B,) token arrays, max_tokens of them (eos does not stop a row), for a batch of left-padded
    prompts as the processor makes them. The rows run on the engine, one row per prompt. `sampler` takes the
    batch's (B, vocab) log-probabilities, as mlx-lm's `make_sampler(...)` returns (default: greedy).
    kv_bits (4 or 8) keeps the KV cache quantized, for long prompts."""
    ids = np.array(input_ids)
    real = np.array(attention_mask).astype(bool) if attention_mask is not None else np.ones(ids.shape, bool)
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values)
    engine = Engine(model, batch_size=ids.shape[0], kv_bits=kv_bits)
    n_image_tokens = (ids == model.config.image_token_index).sum(axis=1)
    first = 0
    for row, keep, n in zip(ids, real, n_image_tokens):
        n_images = int(n) // model.config.image_seq_length
        features = image_features[first : first + n_images] if n_images else None
        first += n_images
        engine.add(Request(row[keep].tolist(), image_features=features, max_tokens=max_tokens, sampler=sampler,
                           stop_at_eos=False))
    with engine.running():
        while engine.has_work:
            outputs = sorted(engine.step(), key=lambda o: o.uid)
            yield mx.array([o.token for o in outputs])


def stream_generate(
    model: PaliGemma,
    processor: PaliGemmaProcessor,
    images=None,
    prompt: str = "",
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    kv_bits: Optional[int] = None,
    **settings,
) -> Generator[GenerationResponse, None, None]:
    """Text pieces for one prompt about one or more images, as they are generated. Stops at eos.
    More settings (min_p, repetition_penalty, repetition_context_size, logit_bias, seed, stop) as for
    batch_generate."""
    engine = Engine(model, processor, batch_size=1, kv_bits=kv_bits)
    engine.submit(images, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  **settings)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                if out.generation_tokens == 1:
                    prompt_tps = out.prompt_tokens / (time.perf_counter() - tic)
                    tic = time.perf_counter()
                elapsed = time.perf_counter() - tic
                n = out.generation_tokens - 1
                yield GenerationResponse(
                    text=out.text, token=out.token, prompt_tokens=out.prompt_tokens, prompt_tps=prompt_tps,
                    generation_tokens=out.generation_tokens, generation_tps=n / elapsed if n and elapsed > 0 else 0.0,
                    peak_memory=mx.get_peak_memory() / 1e9, finish_reason=out.finish_reason,
                )


def generate(model, processor, images=None, prompt: str = "", max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, kv_bits: Optional[int] = None, verbose: bool = False,
             **settings) -> str:
    """The answer to one prompt about one or more images, as a string."""
    text, last = "", None
    for last in stream_generate(model, processor, images, prompt, max_tokens, temperature, top_p, top_k, kv_bits,
                                **settings):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_stats(last)
    return text


def batch_generate(model, processor, images: Sequence, prompts: Sequence[str], max_tokens: int = 100,
                   temperature: float = 0.0, batch_size: int = 8, kv_bits: Optional[int] = None,
                   verbose: bool = False, **settings) -> List[str]:
    """Answers to many prompts, in input order. `images[i]` is what generate takes for prompts[i] (an image, a
    path or URL, or a list of them). Up to `batch_size` rows share each decode step; finished rows make room for
    waiting prompts at once. Every other keyword (top_p, top_k, min_p, repetition_penalty, logit_bias, seed,
    stop) applies to each prompt. Images are read as their rows are about to join, so a long list streams
    through in bounded memory; a bad image or prompt raises InputError naming its index."""
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts")
    engine = Engine(model, processor, batch_size=batch_size, kv_bits=kv_bits)
    answers: Dict[int, List[str]] = {}
    index: Dict[int, int] = {}
    items = enumerate(zip(images, prompts))
    tic, tokens = time.perf_counter(), 0
    with engine.running():
        while True:
            # Keep one batch's worth waiting: enough to fill every row that frees up, without reading every image.
            for i, (image, prompt) in itertools.islice(items, max(batch_size - len(engine.waiting), 0)):
                try:
                    index[engine.submit(image, prompt, max_tokens=max_tokens, temperature=temperature,
                                        **settings)] = i
                except InputError as e:
                    raise InputError(f"prompt {i}: {e}") from None
                answers[i] = []
            if not engine.has_work:
                break
            for out in engine.step():
                answers[index[out.uid]].append(out.text)
                tokens += 1
    if verbose:
        elapsed = time.perf_counter() - tic
        print(f"{len(prompts)} prompts, {tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s, "
              f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)
    return ["".join(answers[i]) for i in range(len(prompts))]


def print_stats(r: GenerationResponse, file=None) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Answer a prompt about one or more images with PaliGemma.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--image", action="append", required=True, help="path or URL; repeat for several images")
    p.add_argument("--prompt", default="caption en", help='e.g. "caption en", "answer en what is this?", "detect cat"')
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.1 for long answers that loop")
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the KV cache (long prompts)")
    p.add_argument("--verbose", action="store_true", help="print speed and peak memory")
    p.add_argument("--json", action="store_true", help="print the objects of a detect/segment answer as JSON")
    p.add_argument("--draw", metavar="OUT.png", help="save the (first) image with the answer's boxes and masks")
    p.add_argument("--mask-decoder", metavar="PATH", help="vae-oid.npz or its safetensors copy, for segment "
                   "answers (default: big_vision's, downloaded once)")
    return p


def report_objects(text: str, image, args) -> None:
    """--json / --draw: boxes (and masks) of a detect/segment answer, in pixels of the original image."""
    from .detection import ObjectReader, draw_detections, objects_to_json
    from .formats.mlx import atomic_file
    from .processor import to_rgb

    objects = ObjectReader(args.mask_decoder)(text, image.size)
    if args.json:
        print(json.dumps(objects_to_json(objects)))
    if args.draw:
        with atomic_file(args.draw) as tmp:
            draw_detections(to_rgb(image), objects).save(tmp)
        print(f"wrote {args.draw} ({len(objects)} objects)", file=sys.stderr)


def check_output_image(path: str, inputs: Sequence[str] = ()) -> None:
    """--draw's file: an image extension PIL writes, in a folder that exists, not one of the input images;
    checked before the model loads."""
    from PIL import Image

    out = Path(path)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"--draw {path}: give an image file name, such as out.png or out.jpg")
    try:
        if not out.parent.is_dir():
            raise InputError(f"--draw {path}: folder {out.parent} does not exist")
        if out.is_dir():
            raise InputError(f"--draw {path} is a folder")
        if not os.access(out.parent, os.W_OK):
            raise InputError(f"--draw {path}: folder {out.parent} is not writable")
        if any(Path(i).exists() and out.exists() and out.samefile(i) for i in inputs):
            raise InputError(f"--draw {path} would overwrite the input image")
    except OSError as e:
        raise InputError(f"--draw {path}: {e.strerror or e}") from None


def run(args) -> int:
    from .loading import load

    settings = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    repetition_context_size=args.repetition_context_size, seed=args.seed)
    check_generation_args(**settings)
    if args.draw:
        check_output_image(args.draw, args.image)
    if args.mask_decoder and not Path(args.mask_decoder).is_file():
        raise InputError(f"--mask-decoder {args.mask_decoder}: no such file")
    images = [load_image(source) for source in args.image]
    model, processor = load(args.model, revision=args.revision)
    last, text = None, ""
    for last in stream_generate(model, processor, images, args.prompt, kv_bits=args.kv_bits, **settings):
        text += last.text
        if not args.json:  # with --json, stdout is the JSON alone
            print(last.text, end="", flush=True)
    if not args.json:
        print()
    if args.json or args.draw:
        report_objects(text, images[0], args)
    if args.verbose and last is not None:
        print_stats(last, file=sys.stderr if args.json else None)
    return 0


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
