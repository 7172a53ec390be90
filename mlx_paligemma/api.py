"""The Python API of generation in mlx-vlm's shapes: `generate` returns a GenerationResult (`.text`, tokens,
log-probabilities, finish reason, token counts, speeds, peak memory, every answer in `sequences`, and `objects` for
detect/segment prompts), `stream_generate` yields GenerationResults whose `.text` is the new piece,
`batch_generate` returns a BatchResponse (`.texts`, each prompt's result, stats). Each is a thin loop over the
engine, reading the one Result a request ends with. It sits above tasks/ because it fills `objects` with
tasks.detection's ObjectReader, the reading every surface uses.

For one release, today's forms keep working: `str(result)` is the text, `Generation` and `GenerationResponse` name
GenerationResult, a BatchResponse indexes and iterates as the list of results, and `generate_step` (now
`generate_tokens`: it never was mlx-lm's generate_step) warns and runs.
"""

import inspect
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Generator, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from . import defaults
from .errors import InputError
from .generation.adapters import per_prompt
from .generation.engine import Engine, Output, Result
from .generation.request import Request
from .generation.runs import run_all, run_steps
from .generation.settings import Settings, check_kv_bits, check_settings, renamed
from .models.paligemma import PaliGemma
from .processing.answer_format import has_objects
from .processing.images import load_image
from .processing.processor import PaliGemmaProcessor
from .tasks.detection import ObjectReader


# The Python API's answers are the engine's Results (generation/results.py): generate's, with its objects and speed,
# and each piece of stream_generate's.
GenerationResult = Result
Generation = GenerationResponse = GenerationResult  # the names of the previous release


@dataclass
class BatchStats:
    prompts: int
    prompt_tokens: int
    generation_tokens: int
    elapsed: float  # seconds
    generation_tps: float
    peak_memory: float  # GB


@dataclass
class BatchResponse:
    """batch_generate's answers in input order: `texts`, `results` (GenerationResults), `stats`."""

    texts: List[str]
    results: List[GenerationResult]
    stats: BatchStats

    def __getitem__(self, i):
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[GenerationResult]:
        return iter(self.results)


def _images(images) -> list:
    """The images of one prompt, read now (PIL images, paths, URLs): the first one's size places its objects."""
    if images is None:
        return []
    return [load_image(i) for i in (images if isinstance(images, (list, tuple)) else [images])]


def _reader(processor, mask_decoder, min_score: float) -> ObjectReader:
    """The objects' reader of a call's detect/segment answers: masks from `mask_decoder` (a path, a loaded decoder,
    or True for big_vision's vae-oid.npz fetched once), loaded at the first answer with mask codes and kept for the
    call's others; else segmented objects keep their codes."""
    path = mask_decoder if isinstance(mask_decoder, (str, os.PathLike)) else None
    loaded = None if path or isinstance(mask_decoder, bool) else mask_decoder
    return ObjectReader(path, processor.tokenizer.decode, min_score, loaded, fetch=mask_decoder is True)


def _piece(out: Output, **timing) -> GenerationResult:
    result = out.result
    if out.whole:  # a beam search or best_of: its answer in one piece
        return answer_of(result, **timing)
    return Result(text=out.text, tokens=[out.token], logprobs=[out.logprob] if out.logprob is not None else [],
                  top_logprobs=[out.top_logprobs] if out.top_logprobs else [], finish_reason=out.finish_reason,
                  prompt_tokens=out.prompt_tokens, generation_tokens=out.generation_tokens, index=out.index,
                  uid=out.uid, sequences=result.sequences if result is not None and len(result.sequences) > 1 else None,
                  **timing)


def answer_of(result: Result, **timing) -> Result:
    """A request's Result as the API answers it: its sequences only where it has several, with its speed."""
    return replace(result, sequences=result.sequences if len(result.sequences) > 1 else None, **timing)


def _stream(model, processor, images, prompt, kv_bits, deterministic, settings: Settings
            ) -> Generator[Tuple[GenerationResult, Output], None, None]:
    engine = Engine(model, processor, batch_size=1, kv_bits=kv_bits, deterministic=deterministic)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    for outputs in run_steps(engine, [(0, lambda: engine.submit(images, prompt, settings))]):
        for _, out in outputs:
            if isinstance(out, InputError):
                raise out
            if out.result is not None and out.result.error is not None:
                raise out.result.error
            if out.generation_tokens == 1 and out.index == 0:
                prompt_tps = out.prompt_tokens / (time.perf_counter() - tic)
                tic = time.perf_counter()
            elapsed, n = time.perf_counter() - tic, out.generation_tokens - 1
            yield _piece(out, prompt_tps=prompt_tps, generation_tps=n / elapsed if n and elapsed > 0 else 0.0,
                         peak_memory=mx.get_peak_memory() / 1e9), out


def stream_generate(model: PaliGemma, processor: PaliGemmaProcessor, images=None, prompt: str = "",
                    max_tokens: int = defaults.MAX_TOKENS, temperature: float = defaults.TEMPERATURE,
                    top_p: float = defaults.TOP_P, top_k: int = defaults.TOP_K, kv_bits: Optional[int] = None,
                    deterministic: bool = False, **settings) -> Generator[GenerationResult, None, None]:
    """Text pieces for one prompt about one or more images, as they are generated (GenerationResult, `.text` the
    new piece). Stops at eos. More settings (min_p, repetition_penalty, repetition_context_size, logit_bias, seed,
    stop, n, and the structured output keywords response_format, json_schema, regex, choices, constrain) as for
    batch_generate. With `logprobs=0` each piece carries its token's log-probability, with `logprobs=k` also the k
    most likely alternatives. A beam search (`num_beams`, `length_penalty`, `early_stopping`,
    `num_return_sequences`, as transformers') and big_vision's best-of-n (`best_of=n` with a temperature: the
    likeliest of n samples) yield one piece when they end, with their best sequences. mlx-vlm's order, `(model,
    processor, prompt, image=...)`, is read as such."""
    images, prompt = neighbour_order(images, prompt, settings)
    deterministic = renamed(settings, "batch_invariant", "deterministic", deterministic)
    settings = checked(stream_generate, dict(settings, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                             top_k=top_k), kv_bits)
    for piece, _ in _stream(model, processor, images, prompt, kv_bits, deterministic, settings):
        yield piece


def generate(model, processor, images=None, prompt: str = "", max_tokens: int = defaults.MAX_TOKENS,
             temperature: float = defaults.TEMPERATURE, top_p: float = defaults.TOP_P, top_k: int = defaults.TOP_K,
             kv_bits: Optional[int] = None, verbose: bool = False, deterministic: bool = False,
             mask_decoder=None, min_score: float = defaults.MIN_SCORE,
             on_text: Optional[Callable[[str], None]] = None, **settings) -> GenerationResult:
    """The answer to one prompt about one or more images: a GenerationResult (`.text`; `str(result)` is the text).
    Beams, best_of and n give every answer in `.sequences` (`.texts`). A detect/segment prompt's boxes are in
    `.objects` (scored by their tokens' log-probabilities, those under min_score left out; masks decoded with
    `mask_decoder`, a path, a loaded decoder or True for big_vision's, fetched once; else each segmented object
    keeps its 16 codes). `on_text` sees each new piece of text as it is made (verbose prints them). A request whose
    own constraint or sampler fails while decoding raises its InputError. mlx-vlm's order, `generate(model,
    processor, "caption en", image=img)`, is read as such."""
    images, prompt = neighbour_order(images, prompt, settings)
    deterministic = renamed(settings, "batch_invariant", "deterministic", deterministic)
    settings = checked(generate, dict(settings, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k), kv_bits)
    loaded = _images(images)
    reader = _reader(processor, mask_decoder, min_score) if has_objects(prompt) else None
    last = final = None
    for last, out in _stream(model, processor, loaded if images is not None else None, prompt, kv_bits,
                             deterministic, settings):
        final = out.result or final
        if on_text is not None:
            on_text(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    r = final
    answer = answer_of(r, prompt_tps=last.prompt_tps, generation_tps=last.generation_tps,
                       peak_memory=last.peak_memory)
    if reader is not None and loaded:
        answer.objects = reader.read(r, loaded[0].size)
    if verbose:
        print()
        print_stats(answer)
    return answer


def batch_generate(model, processor, images: Sequence, prompts: Sequence[str],
                   max_tokens: int = defaults.MAX_TOKENS, temperature: float = defaults.TEMPERATURE,
                   batch_size: int = defaults.BATCH_SIZE, kv_bits: Optional[int] = None,
                   verbose: bool = False, deterministic: bool = False, mask_decoder=None,
                   min_score: float = defaults.MIN_SCORE, **settings) -> BatchResponse:
    """Answers to many prompts, in input order: a BatchResponse (`.texts`, `.results`, `.stats`). `images[i]` is
    what generate takes for prompts[i] (an image, a path or URL, or a list of them). Up to `batch_size` rows share
    each decode step; finished rows make room for waiting prompts at once. Every other keyword (top_p, top_k,
    min_p, repetition_penalty, logit_bias, seed, stop, logprobs, num_beams, n, ...) applies to each prompt, and each
    result is what generate returns for those settings. Structured output, at most one of: response_format
    (OpenAI's json_schema / json_object), json_schema (a dict or its JSON text), regex (the whole answer matches),
    choices (a list of strings), or constrain=True (detect/segment answers: well-formed boxes, labels among the
    prompt's classes). deterministic=True: each answer (tokens, log-probabilities) bitwise what it is alone, at
    the cost of decoding requests side by side rather than together. Images are read as their rows are about to
    join, so a long list streams through in bounded memory; a bad image or prompt raises InputError naming its
    index, and a prompt whose own constraint or sampler fails while decoding raises it, the others done. `adapter`:
    a loaded adapter's name for every prompt, or a list of one per prompt (None: the base); rows of different
    adapters share each step."""
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts")
    adapters = per_prompt(settings.pop("adapter", None), len(prompts))
    deterministic = renamed(settings, "batch_invariant", "deterministic", deterministic)
    settings = checked(batch_generate, dict(settings, max_tokens=max_tokens, temperature=temperature), kv_bits)
    engine = Engine(model, processor, batch_size=batch_size, kv_bits=kv_bits, deterministic=deterministic)
    sizes = {}

    def submit(i: int) -> int:
        try:
            loaded = _images(images[i])
            sizes[i] = loaded[0].size if loaded else None
            return engine.submit(loaded if images[i] is not None else None, prompts[i],
                                 replace(settings, adapter=adapters[i]))
        except InputError as e:
            raise InputError(f"prompt {i}: {e}", param=e.param) from None

    mx.reset_peak_memory()
    tic, results, failed = time.perf_counter(), {}, None
    for i, r in run_all(engine, ((i, partial(submit, i)) for i in range(len(prompts))), window=batch_size):
        if isinstance(r, InputError):
            raise r
        if r.error is not None:
            failed = failed or InputError(f"prompt {i}: {r.error}", param=r.error.param)
        results[i] = r
    if failed is not None:
        raise failed
    elapsed = time.perf_counter() - tic
    out = []
    reader = _reader(processor, mask_decoder, min_score)  # one for the call: a mask decoder is loaded once
    for i in range(len(prompts)):
        r = results[i]
        answer = answer_of(r)
        if has_objects(prompts[i]) and sizes.get(i):
            answer.objects = reader.read(r, sizes[i])
        out.append(answer)
    made = sum(r.generation_tokens for r in out)
    stats = BatchStats(len(prompts), sum(r.prompt_tokens for r in out), made, elapsed,
                       made / elapsed if elapsed > 0 else 0.0, mx.get_peak_memory() / 1e9)
    if verbose:
        print(f"{stats.prompts} prompts, {made} tokens in {elapsed:.2f} s: {stats.generation_tps:.1f} tokens/s, "
              f"peak memory {stats.peak_memory:.3f} GB", file=sys.stderr)
    return BatchResponse([r.text for r in out], out, stats)


def generate_tokens(
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
    settings = check_settings("generate_tokens()", max_tokens=max_tokens)
    engine = Engine(model, batch_size=ids.shape[0], kv_bits=kv_bits)
    n_image_tokens = (ids == model.config.image_token_index).sum(axis=1)
    first, requests = 0, []
    for row, keep, n in zip(ids, real, n_image_tokens):
        n_images = int(n) // model.config.image_seq_length
        features = image_features[first : first + n_images] if n_images else None
        first += n_images
        request = Request(row[keep].tolist(), image_features=features, settings=settings, sampler=sampler,
                          stop_at_eos=False)
        requests.append((len(requests), partial(engine.add, request)))
    for outputs in run_steps(engine, requests, window=len(requests)):
        if outputs:  # a step may do prefill work only
            yield mx.array([out.token for _, out in sorted(outputs, key=lambda pair: pair[0])])


def generate_step(*args, **kwargs) -> Generator[mx.array, None, None]:
    """The previous release's name of generate_tokens (mlx-lm's generate_step is another thing: one prompt,
    (token, log-probabilities) pairs); it goes in the next release."""
    warnings.warn("mlx_paligemma.generate_step is now generate_tokens", DeprecationWarning, stacklevel=2)
    return generate_tokens(*args, **kwargs)


def checked(function, settings: dict, kv_bits: Optional[int] = None) -> Settings:
    """The one check of the settings (a misspelt or foreign keyword, `temp=` or `max_new_tokens=`, is one line
    saying what to write, not a TypeError), and of kv_bits."""
    check_kv_bits(kv_bits)
    if settings.get("logprobs") is None:
        settings.pop("logprobs", None)
    known = [p for p in inspect.signature(function).parameters if p not in ("model", "processor", "settings")]
    return check_settings(f"{function.__name__}()", known, **settings)


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


def print_stats(r: GenerationResult, file=None) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)
