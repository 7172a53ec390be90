"""Generation: the whole prefix in one pass, then one token at a time over a KV cache; and the command line.

    python -m mlx_paligemma.generate --model google/paligemma2-3b-mix-224 --image cat.jpg --prompt "caption en"
"""

import json
import sys
from pathlib import Path
from typing import List, Sequence


from . import defaults
from .cli import (ArgumentParser, add_decoding_arguments, add_object_arguments, add_sampling_arguments, command,
                  plural, run_main)
from .extras import require
from .generation.adapters import add_limit_arguments, command_adapters
from .generation.constraints import cli_constraint
from .tasks.detection import check_min_score, draw_detections, objects_to_json
from .processing.answer_format import has_objects
from .formats.atomic import atomic_file, check_file_output
from .generation.settings import check_settings
from .errors import InputError
from .processing.images import load_image, to_rgb
from .generation.sampling import logprob_json
from .api import GenerationResult, generate, print_stats
from .generation.scoring import MAX_CANDIDATES, score



def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Answer a prompt about one or more images with PaliGemma.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--adapter-path", default=None, help="adapters (or fine-tuned weights) written by "
                   "mlx_paligemma.lora, applied to --model")
    add_limit_arguments(p)
    p.add_argument("--image", action="extend", nargs="+", required=True,
                   help="path or URL; several for a multi-image prompt (--image a.jpg b.jpg)")
    # Required: PaliGemma answers the task its prompt names, so a silent default would answer a question not asked.
    p.add_argument("--prompt", required=True, help='the task: "caption en", "describe en", "ocr", '
                   '"answer en QUESTION", "detect cat ; dog", "segment cat"')
    p.add_argument("--max-tokens", type=int, default=defaults.MAX_TOKENS, help="most tokens to generate")
    add_sampling_arguments(p, seed_help="random seed of sampling (default: a fresh one)")
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



def logprob_rows(answer: GenerationResult, processor) -> List[dict]:
    """--logprobs: each token's id, piece, log-probability and alternatives (none for beams and best_of)."""
    tops = answer.top_logprobs or [[]] * len(answer.tokens)
    return [logprob_json(processor.tokenizer.decode, t, v, top)
            for t, v, top in zip(answer.tokens, answer.logprobs, tops)]


def print_logprobs(rows: Sequence[dict]) -> None:
    for row in rows:
        alternatives = "  ".join(f"{a['text']!r} {a['logprob']:.4f}" for a in row["top_logprobs"])
        print(f"{row['token']:>7} {row['text']!r:<16} {row['logprob']:.4f}  {alternatives}", file=sys.stderr)


def draw(image, objects: list, path: str) -> None:
    with atomic_file(path, "--draw") as tmp:
        draw_detections(to_rgb(image), objects).save(tmp)
    print(f"wrote {path} ({plural(len(objects), 'object')})", file=sys.stderr)


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
    """--draw's file: an image extension PIL writes, in a folder that exists, not one of the input images, and
    new or a drawing of ours (formats.atomic); checked before the model loads."""
    from PIL import Image

    out = Path(path)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"--draw {path}: give an image file name, such as out.png or out.jpg")
    try:
        if not out.parent.is_dir():
            raise InputError(f"--draw {path}: folder {out.parent} does not exist")
        if out.is_dir():
            raise InputError(f"--draw {path} is a folder")
        if any(Path(i).exists() and out.exists() and out.samefile(i) for i in inputs):
            raise InputError(f"--draw {path} would overwrite the input image")
    except OSError as e:
        raise InputError(f"--draw {path}: {e.strerror or e}") from None
    check_file_output(out, "--draw")


def run(args) -> int:
    from .formats.loading import load

    settings = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    repetition_context_size=args.repetition_context_size, seed=args.seed, num_beams=args.num_beams,
                    length_penalty=args.length_penalty, best_of=args.best_of)
    constraint = cli_constraint(args)
    check_settings(**settings, **constraint, logprobs=args.logprobs)
    check_min_score(args.min_score)
    settings.update(constraint)
    if constraint:
        require("structured", "structured output")
    if args.candidates is not None:
        ignored = [flag for flag, given in (
            ("--draw", args.draw), ("--logprobs", args.logprobs is not None), ("--num-beams", args.num_beams != 1),
            ("--best-of", args.best_of != 1), ("--regex", args.regex is not None),
            ("--json-schema", args.json_schema is not None), ("--choices", args.choices is not None),
            ("--constrain", args.constrain)) if given]
        if ignored:
            raise InputError(f"--candidates scores the given answers as they are: it takes no {ignored[0]}")
    if args.candidates is not None and len(args.candidates) > MAX_CANDIDATES:
        raise InputError(f"--candidates: at most {MAX_CANDIDATES}, got {len(args.candidates)}")
    if args.draw:
        check_output_image(args.draw, args.image)
    if args.mask_decoder and not Path(args.mask_decoder).is_file():
        raise InputError(f"--mask-decoder {args.mask_decoder}: no such file")
    command_adapters(args)
    images = [load_image(source) for source in args.image]
    model, processor = load(args.model, revision=args.revision, adapter_path=args.adapter_path)
    if args.candidates is not None:
        return report_scores(model, processor, images, args)
    printed = (lambda piece: print(piece, end="", flush=True)) if not args.json else None  # --json: the JSON alone
    answer = generate(model, processor, images, args.prompt, kv_bits=args.kv_bits, batch_invariant=args.deterministic,
                      logprobs=args.logprobs, mask_decoder=args.mask_decoder or True, min_score=args.min_score,
                      on_text=printed, **settings)
    if not args.json:
        print()
    rows = logprob_rows(answer, processor) if args.logprobs is not None and answer.tokens else None
    if rows is not None and not args.json:
        print_logprobs(rows)
    objects = answer.objects or []
    if args.json:  # one object: the answer, how it ended, its objects (detect/segment) and log-probabilities
        out = {"answer": answer.text, "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
               "generation_tokens": answer.generation_tokens}
        if has_objects(args.prompt):
            out["objects"] = objects_to_json(objects)
        if rows is not None:
            out["logprobs"] = rows
        print(json.dumps(out))
    if args.draw:
        draw(images[0], objects, args.draw)
    if args.verbose:
        print_stats(answer, file=sys.stderr if args.json else None)
    return 0


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
