"""Generation: the whole prefix in one pass, then one token at a time over a KV cache; and the command line.

    python -m mlx_paligemma.generate --model google/paligemma2-3b-mix-224 --image cat.jpg --prompt "caption en"
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Generator, List, Optional

import mlx.core as mx

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
    finish_reason: Optional[str] = None  # "stop" (eos) or "length" on the last response


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Callable[[mx.array], mx.array]:
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    return mlx_lm_sampler(temp=temperature, top_p=top_p if 0 < top_p < 1 else 0.0, top_k=top_k)


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
    """Yields (B,) token arrays. The prefix goes through the decoder whole, so its bidirectional attention is exact;
    each next step is scheduled with mx.async_eval before the current token is handed out.
    kv_bits (4 or 8) keeps the KV cache quantized, for long prompts."""
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    cache = model.make_cache(kv_bits)
    batch = input_ids.shape[0]
    # A mask is only needed for padded rows; without padding the fused attention runs unmasked.
    key_valid = attention_mask if attention_mask is not None and not bool(mx.all(attention_mask)) else None

    def sample(logits: mx.array) -> mx.array:
        logits = logits[:, -1, :]
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    def step(tokens: mx.array) -> mx.array:
        nonlocal key_valid
        if key_valid is not None:
            key_valid = mx.concatenate([key_valid, mx.ones((batch, 1), key_valid.dtype)], axis=1)
        return sample(model(tokens[:, None], attention_mask=key_valid, cache=cache))

    logits = model(input_ids, pixel_values, key_valid, cache=cache, image_features=image_features, logits_to_keep=1)
    tokens = sample(logits)
    mx.async_eval(tokens)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_tokens = step(tokens)
            mx.async_eval(next_tokens)
        yield tokens
        if n + 1 < max_tokens:
            tokens = next_tokens


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
) -> Generator[GenerationResponse, None, None]:
    """Text pieces for one prompt about one or more images, as they are generated. Stops at eos."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    inputs = processor(images=[images], text=prompt)
    prompt_tokens = inputs["input_ids"].shape[1]
    sampler = make_sampler(temperature, top_p, top_k)
    eos = processor.tokenizer.eos_id
    mx.reset_peak_memory()
    tic = time.perf_counter()
    tokens: List[int] = []
    text = ""
    prompt_tps = 0.0
    for n, token in enumerate(generate_step(model, inputs["input_ids"], inputs["pixel_values"],
                                            sampler=sampler, max_tokens=max_tokens, kv_bits=kv_bits)):
        token = token.item()
        if n == 0:
            prompt_time = time.perf_counter() - tic
            prompt_tps = prompt_tokens / prompt_time
            tic = time.perf_counter()
        finish = "stop" if token == eos else ("length" if n + 1 == max_tokens else None)
        piece = ""
        if token != eos:
            tokens.append(token)
        decoded = processor.decode(tokens)
        # Hold back a trailing partial UTF-8 character until its remaining bytes arrive (or the answer ends).
        if finish or not decoded.endswith("\ufffd"):
            piece, text = decoded[len(text):], decoded
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=piece, token=token, prompt_tokens=prompt_tokens, prompt_tps=prompt_tps,
            generation_tokens=n + 1, generation_tps=n / elapsed if n and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
        )
        if finish:
            break


def generate(model, processor, images=None, prompt: str = "", max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, kv_bits: Optional[int] = None, verbose: bool = False) -> str:
    """The answer to one prompt about one or more images, as a string."""
    text, last = "", None
    for last in stream_generate(model, processor, images, prompt, max_tokens, temperature, top_p, top_k, kv_bits):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_stats(last)
    return text


def print_stats(r: GenerationResponse, file=None) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer a prompt about one or more images with PaliGemma.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--image", action="append", required=True, help="path or URL; repeat for several images")
    p.add_argument("--prompt", default="caption en", help='e.g. "caption en", "answer en what is this?", "detect cat"')
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
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
    from .detection import add_masks, draw_detections, objects_to_json, parse_detections
    from .mask_decoder import fetch_vae_oid, load_mask_decoder

    objects = parse_detections(text, image.size)
    if any(o.codes is not None for o in objects):
        try:
            add_masks(objects, load_mask_decoder(args.mask_decoder or fetch_vae_oid()), image.size)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load the mask decoder: {str(e).splitlines()[0]}") from None
    if args.json:
        print(json.dumps(objects_to_json(objects)))
    if args.draw:
        draw_detections(image.convert("RGB"), objects).save(args.draw)
        print(f"wrote {args.draw} ({len(objects)} objects)", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import load

    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        images = [load_image(source) for source in args.image]
        model, processor = load(args.model)
        last, text = None, ""
        for last in stream_generate(model, processor, images, args.prompt, args.max_tokens,
                                    args.temperature, args.top_p, args.top_k, args.kv_bits):
            text += last.text
            if not args.json:  # with --json, stdout is the JSON alone
                print(last.text, end="", flush=True)
        if not args.json:
            print()
        if args.json or args.draw:
            report_objects(text, images[0], args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.verbose and last is not None:
        print_stats(last, file=sys.stderr if args.json else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
