"""Generation: the whole prefix in one pass, then one token at a time over a KV cache; and the command line.

    python -m mlx_paligemma.generate --model google/paligemma2-3b-mix-224 --image cat.jpg --prompt "caption en"
"""

import inspect
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from . import defaults
from .cli import ArgumentParser, add_decoding_arguments, add_object_arguments, command, run_main
from .beams import BeamSequence
from .constraints import cli_constraint
from .detection import ObjectReader, check_min_score, draw_detections, has_objects, objects_to_json
from .formats.atomic import atomic_file
from .engine import Engine, Output
from .request import Request, check_generation_args
from .model import PaliGemma
from .processor import InputError, PaliGemmaProcessor, load_image, to_rgb
from .sampling import logprob_json
from .scoring import MAX_CANDIDATES, score


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
    logprob: Optional[float] = None  # the token's log-probability (see sampling.py); None for a beam search
    top_logprobs: Optional[List[Tuple[int, float]]] = None  # (id, log-probability) alternatives, with logprobs=k
    sequences: Optional[List[BeamSequence]] = None  # beams, best_of (one response): the best num_return_sequences


@dataclass
class Generation:
    """What generate and batch_generate return when asked for log-probabilities (logprobs=k)."""

    text: str
    tokens: List[int]
    logprobs: List[float]  # of each token (a beam search: the best sequence's, where each was chosen)
    top_logprobs: List[List[Tuple[int, float]]]  # k alternatives a token, most likely first
    finish_reason: Optional[str]
    sequences: Optional[List[BeamSequence]] = None


def generate_step(
    model: PaliGemma,
    input_ids: mx.array,
    pixel_values: Optional[mx.array] = None,
    attention_mask: Optional[mx.array] = None,
    image_features: Optional[mx.array] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    max_tokens: int = defaults.MAX_TOKENS,
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
    max_tokens: int = defaults.MAX_TOKENS,
    temperature: float = defaults.TEMPERATURE,
    top_p: float = defaults.TOP_P,
    top_k: int = defaults.TOP_K,
    kv_bits: Optional[int] = None,
    batch_invariant: bool = False,
    **settings,
) -> Generator[GenerationResponse, None, None]:
    """Text pieces for one prompt about one or more images, as they are generated. Stops at eos.
    More settings (min_p, repetition_penalty, repetition_context_size, logit_bias, seed, stop, and the structured
    output keywords response_format, json_schema, regex, choices, constrain) as for batch_generate. Each response
    carries its token's log-probability, and with `logprobs=k` the k most likely alternatives. A beam search
    (`num_beams`, `length_penalty`, `early_stopping`, `num_return_sequences`, as transformers') and big_vision's
    best-of-n (`best_of=n` with a temperature: the likeliest of n samples) yield one response when they end, with
    their best sequences. mlx-vlm's order, `(model, processor, prompt, image=...)`, is read as
    such."""
    images, prompt = neighbour_order(images, prompt, settings)
    check_keywords(stream_generate, settings)
    if settings.get("logprobs") is None:
        settings.pop("logprobs", None)
    engine = Engine(model, processor, batch_size=1, kv_bits=kv_bits, batch_invariant=batch_invariant)
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
                    logprob=out.logprob, top_logprobs=out.top_logprobs, sequences=out.sequences,
                )


def generate(model, processor, images=None, prompt: str = "", max_tokens: int = defaults.MAX_TOKENS,
             temperature: float = defaults.TEMPERATURE, top_p: float = defaults.TOP_P, top_k: int = defaults.TOP_K,
             kv_bits: Optional[int] = None, verbose: bool = False, batch_invariant: bool = False,
             **settings) -> Union[str, List[str], Generation]:
    """The answer to one prompt about one or more images, as a string; with num_return_sequences > 1 (beam
    search) the best answers, best first; with `logprobs=k` (0 for the tokens' own only) a Generation holding
    the tokens and their log-probabilities. mlx-vlm's order, `generate(model, processor, "caption en",
    image=img)`, is read as such."""
    images, prompt = neighbour_order(images, prompt, settings)
    check_keywords(generate, settings)
    responses = []
    for r in stream_generate(model, processor, images, prompt, max_tokens, temperature, top_p, top_k, kv_bits,
                             batch_invariant, **settings):
        responses.append(r)
        if verbose:
            print(r.text, end="", flush=True)
    if verbose and responses:
        print()
        print_stats(responses[-1])
    return answer(responses, settings.get("logprobs"), settings.get("num_return_sequences", 1))


def answer(responses: Sequence, logprobs: Optional[int], num_return_sequences: int):
    """One request's responses (GenerationResponse or the engine's Output) as generate returns them."""
    text = "".join(r.text for r in responses)
    last = responses[-1] if responses else None
    if logprobs is not None:
        beam = last is not None and last.sequences is not None
        tokens, values = chosen(responses) if responses else ([], [])
        return Generation(text, list(tokens), list(values),
                          [] if beam or not logprobs else [r.top_logprobs for r in responses],
                          last.finish_reason if last else None, last.sequences if beam else None)
    if num_return_sequences > 1:
        return [s.text for s in last.sequences]
    return text


def batch_generate(model, processor, images: Sequence, prompts: Sequence[str],
                   max_tokens: int = defaults.MAX_TOKENS, temperature: float = defaults.TEMPERATURE,
                   batch_size: int = defaults.BATCH_SIZE, kv_bits: Optional[int] = None,
                   verbose: bool = False, batch_invariant: bool = False, **settings) -> list:
    """Answers to many prompts, in input order. `images[i]` is what generate takes for prompts[i] (an image, a
    path or URL, or a list of them). Up to `batch_size` rows share each decode step; finished rows make room for
    waiting prompts at once. Every other keyword (top_p, top_k, min_p, repetition_penalty, logit_bias, seed,
    stop, logprobs, num_beams, ...) applies to each prompt, and each answer is what generate returns for those
    settings. Structured output, at most one of: response_format (OpenAI's json_schema / json_object),
    json_schema (a dict or its JSON text), regex (the whole answer matches), choices (a list of strings), or
    constrain=True (detect/segment answers: well-formed boxes, labels among the prompt's classes).
    batch_invariant=True: each answer (tokens, log-probabilities) bitwise what it is alone, at the cost of decoding
    requests side by side rather than together. Images are read as their rows are about to join, so a long list
    streams through in bounded memory; a bad image or prompt raises InputError naming its index."""
    check_keywords(batch_generate, settings)
    logprobs = settings.pop("logprobs", None)
    if logprobs is not None:
        settings["logprobs"] = logprobs
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts")
    engine = Engine(model, processor, batch_size=batch_size, kv_bits=kv_bits, batch_invariant=batch_invariant)
    answers: Dict[int, List[Output]] = {}
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
                answers[index[out.uid]].append(out)
                tokens += 1
    if verbose:
        elapsed = time.perf_counter() - tic
        print(f"{len(prompts)} prompts, {tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s, "
              f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)
    return [answer(answers[i], logprobs, settings.get("num_return_sequences", 1)) for i in range(len(prompts))]


# What **settings may hold: the engine's per-request settings (Request's fields, less those given as ids/arrays or
# built by Engine.submit), and submit's constraint keywords.
CONSTRAINTS = ["response_format", "json_schema", "regex", "choices", "constrain"]
SETTINGS = sorted({f.name for f in fields(Request)} - {"prompt_ids", "pixel_values", "image_features", "stop_at_eos",
                                                       "sampler", "forced", "constraint"} | set(CONSTRAINTS))


def check_keywords(function, settings: dict) -> None:
    """A misspelt keyword (`temp=`) is one InputError line naming the known ones, not a TypeError."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        named = [p for p in inspect.signature(function).parameters if p not in ("model", "processor", "settings")]
        known = ", ".join(dict.fromkeys(named + SETTINGS))
        raise InputError(f"{function.__name__}() got unknown keyword {', '.join(unknown)}; known keywords: {known}")


def neighbour_order(images, prompt, settings: dict):
    """mlx-vlm's `(model, processor, prompt, image=...)`: the prompt third and the images by keyword `image`.
    Unambiguous, so read as meant; both `images` and `image` given is one line naming the right form."""
    if "image" not in settings:
        return images, prompt
    image = settings.pop("image")
    if images is None:
        return image, prompt
    if isinstance(images, str) and prompt == "":
        return image, images
    raise InputError("give the images once: generate(model, processor, images=..., prompt=...) or mlx-vlm's "
                     "generate(model, processor, prompt, image=...)")


def print_stats(r: GenerationResponse, file=None) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Answer a prompt about one or more images with PaliGemma.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--adapter-path", default=None, help="adapters (or fine-tuned weights) written by "
                   "mlx_paligemma.lora, applied to --model")
    p.add_argument("--image", action="extend", nargs="+", required=True,
                   help="path or URL; several for a multi-image prompt (--image a.jpg b.jpg)")
    # Required: PaliGemma answers the task its prompt names, so a silent default would answer a question not asked.
    p.add_argument("--prompt", required=True, help='the task: "caption en", "describe en", "ocr", '
                   '"answer en QUESTION", "detect cat ; dog", "segment cat"')
    p.add_argument("--max-tokens", type=int, default=defaults.MAX_TOKENS, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=defaults.TEMPERATURE, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=defaults.TOP_P, help="nucleus sampling; 1 is off")
    p.add_argument("--top-k", type=int, default=defaults.TOP_K, help="sample among the k likeliest; 0 is off")
    p.add_argument("--min-p", type=float, default=defaults.MIN_P, help="drop tokens below min_p x the likeliest; "
                   "0 is off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.1 for long answers that loop "
                   "(default: off)")
    p.add_argument("--repetition-context-size", type=int, default=defaults.REPETITION_CONTEXT_SIZE,
                   help="tokens the repetition penalty looks back on")
    p.add_argument("--seed", type=int, default=None, help="random seed of sampling (default: a fresh one)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the KV cache, for long "
                   "prompts (default: off)")
    add_decoding_arguments(p, logprobs_help="print each token's log-probability and its K likeliest "
                           "alternatives (with --json: in the object)")
    p.add_argument("--verbose", action="store_true", help="print speed and peak memory")
    p.add_argument("--json", action="store_true", help='print one JSON object: {"answer": ...}, with "objects" '
                   "(boxes, masks) for detect/segment prompts")
    p.add_argument("--draw", metavar="OUT.png", help="save the (first) image with the answer's boxes and masks")
    add_object_arguments(p)
    p.add_argument("--candidates", nargs="+", metavar="TEXT", default=None, help="score these answers instead of "
                   "generating: each one's summed log-probability given image and prompt, likeliest first (default: off)")
    p.add_argument("--exclude-eos", action="store_true", help="with --candidates: leave <eos> out of the scores "
                   "(score a candidate as the start of an answer)")
    return p


def chosen(responses: Sequence[GenerationResponse]) -> Tuple[List[int], List[float]]:
    """The answer's tokens and their log-probabilities (from generate's responses or the engine's outputs): a beam
    search's (best_of's) best sequence, else the stream's."""
    last = responses[-1]
    if last.sequences is not None:
        return last.sequences[0].tokens, last.sequences[0].logprobs
    return [r.token for r in responses], [r.logprob for r in responses]


def logprob_rows(responses: Sequence[GenerationResponse], processor) -> List[dict]:
    """--logprobs: each token's id, piece, log-probability and alternatives (none for beams and best_of)."""
    tops = [r.top_logprobs for r in responses] if responses[-1].sequences is None else None
    tokens, values = chosen(responses)
    return [logprob_json(processor.tokenizer.decode, t, v, tops[i] if tops else [])
            for i, (t, v) in enumerate(zip(tokens, values))]


def print_logprobs(rows: Sequence[dict]) -> None:
    for row in rows:
        alternatives = "  ".join(f"{a['text']!r} {a['logprob']:.4f}" for a in row["top_logprobs"])
        print(f"{row['token']:>7} {row['text']!r:<16} {row['logprob']:.4f}  {alternatives}", file=sys.stderr)


def answer_objects(text: str, image, responses: Sequence[GenerationResponse], processor, args) -> list:
    """Boxes (and masks) of a detect/segment answer, in pixels of the original image, each scored by its tokens'
    log-probabilities, those under --min-score left out."""
    reader = ObjectReader(args.mask_decoder, processor.tokenizer.decode, args.min_score)
    return reader(text, image.size, *chosen(responses))


def draw(image, objects: list, path: str) -> None:
    with atomic_file(path) as tmp:
        draw_detections(to_rgb(image), objects).save(tmp)
    print(f"wrote {path} ({len(objects)} objects)", file=sys.stderr)


def report_scores(model, processor, images, args) -> int:
    """--candidates: each candidate's log-probability (scoring.score), likeliest first; with --json one object,
    the likeliest as the answer and the candidates in the order given."""
    scores = score(model, processor, images, args.prompt, args.candidates, include_eos=not args.exclude_eos)
    best = max(range(len(scores)), key=lambda i: scores[i])  # the first of equal scores
    if args.json:
        print(json.dumps({"answer": args.candidates[best],
                          "candidates": [{"text": c, "logprob": s} for c, s in zip(args.candidates, scores)]}))
        return 0
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        print(f"{scores[i]:.4f}  {args.candidates[i]}")
    return 0


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
                    repetition_context_size=args.repetition_context_size, seed=args.seed, num_beams=args.num_beams,
                    length_penalty=args.length_penalty, best_of=args.best_of)
    check_generation_args(**settings, logprobs=args.logprobs or 0)
    check_min_score(args.min_score)
    settings.update(cli_constraint(args))
    if args.candidates is not None and (args.draw or args.logprobs is not None):
        raise InputError("--candidates scores the given answers: it takes no --draw or --logprobs")
    if args.candidates is not None and len(args.candidates) > MAX_CANDIDATES:
        raise InputError(f"--candidates: at most {MAX_CANDIDATES}, got {len(args.candidates)}")
    if args.draw:
        check_output_image(args.draw, args.image)
    if args.mask_decoder and not Path(args.mask_decoder).is_file():
        raise InputError(f"--mask-decoder {args.mask_decoder}: no such file")
    if args.adapter_path and not Path(args.adapter_path).is_dir():
        raise InputError(f"--adapter-path {args.adapter_path}: no such folder")
    images = [load_image(source) for source in args.image]
    model, processor = load(args.model, revision=args.revision, adapter_path=args.adapter_path)
    if args.candidates is not None:
        return report_scores(model, processor, images, args)
    last, text, tokens = None, "", []
    for last in stream_generate(model, processor, images, args.prompt, kv_bits=args.kv_bits,
                                batch_invariant=args.deterministic, logprobs=args.logprobs, **settings):
        text += last.text
        tokens.append(last)
        if not args.json:  # with --json, stdout is the JSON alone
            print(last.text, end="", flush=True)
    if not args.json:
        print()
    rows = logprob_rows(tokens, processor) if args.logprobs is not None and tokens else None
    if rows is not None and not args.json:
        print_logprobs(rows)
    objects = answer_objects(text, images[0], tokens, processor, args) if has_objects(args.prompt) and tokens else []
    if args.json:  # one object: the answer, with its objects (detect/segment) and log-probabilities when asked
        out = {"answer": text}
        if has_objects(args.prompt):
            out["objects"] = objects_to_json(objects)
        if rows is not None:
            out["logprobs"] = rows
        print(json.dumps(out))
    if args.draw:
        draw(images[0], objects, args.draw)
    if args.verbose and last is not None:
        print_stats(last, file=sys.stderr if args.json else None)
    return 0


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
