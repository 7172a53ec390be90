"""The Python API of generation: generate, stream_generate, batch_generate and generate_step, each a thin loop
over the engine."""

import inspect
import itertools
import sys
import time
from dataclasses import dataclass, fields
from typing import Callable, Dict, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .. import defaults
from ..errors import InputError
from ..models.paligemma import PaliGemma
from ..processing.processor import PaliGemmaProcessor
from .adapters import per_prompt
from .beams import BeamSequence
from .engine import Engine, Output
from .request import Request


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
    streams through in bounded memory; a bad image or prompt raises InputError naming its index. `adapter`: a
    loaded adapter's name for every prompt, or a list of one per prompt (None: the base); rows of different
    adapters share each step."""
    check_keywords(batch_generate, settings)
    adapters = per_prompt(settings.pop("adapter", None), len(prompts))
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
                                        adapter=adapters[i], **settings)] = i
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


def chosen(responses: Sequence[GenerationResponse]) -> Tuple[List[int], List[float]]:
    """The answer's tokens and their log-probabilities (from generate's responses or the engine's outputs): a beam
    search's (best_of's) best sequence, else the stream's."""
    last = responses[-1]
    if last.sequences is not None:
        return last.sequences[0].tokens, last.sequences[0].logprobs
    return [r.token for r in responses], [r.logprob for r in responses]
