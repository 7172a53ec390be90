"""Generation: the whole prefix in one pass, then one token at a time over a KV cache; and the command line.

    python -m mlx_paligemma.generate --model google/paligemma2-3b-mix-224 --image cat.jpg --prompt "caption en"
"""

import json
import sys
from pathlib import Path
from typing import Sequence

from .cli import ArgumentParser, add_object_arguments, add_settings, changed, command, plural, run_main, settings_of
from .extras import require
from .generation.adapters import add_limit_arguments, command_adapters
from .generation.constraints import cli_constraint
from .tasks.detection import check_min_score, draw_detections, objects_to_json
from .processing.answer_format import has_objects
from .formats.atomic import atomic_file, check_file_output
from .data.records import answer_record
from .generation.settings import check_kv_bits, check_settings
from .errors import InputError
from .processing.images import load_image, to_rgb
from .api import batch_generate, generate, print_stats
from .generation.scoring import MAX_CANDIDATES, score



def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Answer a prompt about one or more images with PaliGemma.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--adapter-path", default=None, help="adapters (or fine-tuned weights) written by "
                   "mlx_paligemma.lora, applied to --model")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="LoRA adapters loaded beside --model under NAME (repeatable): the base and each of them answer "
                        "the prompt, side by side, a line each (default: none)")
    add_limit_arguments(p)
    p.add_argument("--image", action="extend", nargs="+", required=True,
                   help="path or URL; several for a multi-image prompt (--image a.jpg b.jpg)")
    # Required: PaliGemma answers the task its prompt names, so a silent default would answer a question not asked.
    p.add_argument("--prompt", required=True, help='the task: "caption en", "describe en", "ocr", '
                   '"answer en QUESTION", "detect cat ; dog", "segment cat"')
    p.add_argument("--verbose", action="store_true", help="print speed and peak memory")
    p.add_argument("--json", action="store_true", help='print one JSON object: {"text": ..., "finish_reason": ..., '
                   '"prompt_tokens": ..., "generation_tokens": ...}, with "objects" (boxes, masks) for detect/segment '
                   'prompts and "logprobs" with --logprobs')
    p.add_argument("--draw", metavar="OUT.png", help="save the (first) image with the answer's boxes and masks")
    add_object_arguments(p)
    p.add_argument("--candidates", nargs="+", metavar="TEXT", default=None, help="score these answers instead of "
                   "generating: each one's summed log-probability given image and prompt, likeliest first (default: off)")
    add_settings(p, "generate")
    return p



def print_logprobs(rows: Sequence[dict]) -> None:
    """--logprobs without --json: each token's id, text and log-probability, and its alternatives, on stderr."""
    for row in rows:
        alternatives = "  ".join(f"{a['token']!r} {a['logprob']:.4f}" for a in row["top_logprobs"])
        print(f"{row['id']:>7} {row['token']!r:<16} {row['logprob']:.4f}  {alternatives}", file=sys.stderr)


def draw(image, objects: list, path: str) -> None:
    with atomic_file(path, "--draw") as tmp:
        draw_detections(to_rgb(image), objects).save(tmp)
    print(f"wrote {path} ({plural(len(objects), 'object')})", file=sys.stderr)


def report_scores(model, processor, images, args) -> int:
    """--candidates: each candidate's log-probability (scoring.score), likeliest first; with --json one object,
    the likeliest as the answer and the candidates in the order given."""
    scores = score(model, processor, images, args.prompt, args.candidates, include_eos=args.include_eos,
                   kv_bits=args.kv_bits)
    best = max(range(len(scores)), key=lambda i: scores[i])  # the first of equal scores
    if args.json:
        print(json.dumps({"text": args.candidates[best],
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


SCORING = ("--kv-bits", "--include-eos")  # the settings of --candidates; it takes no other


def check_args(args) -> dict:
    """Every setting, checked before the model loads: generate's keywords."""
    settings = settings_of(args, "generate")
    constraint = cli_constraint(args)
    check_settings(**settings, **constraint)
    check_min_score(args.min_score)
    check_kv_bits(args.kv_bits)
    if constraint:
        require("structured", "structured output")
    ignored = [f for f in changed(args, "generate") + ["--draw"] * bool(args.draw) if f not in SCORING]
    if args.candidates is not None and ignored:
        raise InputError(f"--candidates scores the given answers as they are: it takes no {ignored[0]}")
    if args.candidates is None and not args.include_eos:
        raise InputError("--no-include-eos is how --candidates are scored: give the candidates")
    if args.candidates is not None and len(args.candidates) > MAX_CANDIDATES:
        raise InputError(f"--candidates: at most {MAX_CANDIDATES}, got {len(args.candidates)}")
    return {**settings, **constraint}


def check_adapters(args) -> dict:
    """--adapter NAME=PATH, as batch's: {name: folder}, checked before the model loads."""
    adapters = command_adapters(args)
    if not adapters:
        return adapters
    if args.adapter_path is not None:
        raise InputError("give --adapter-path (one adapter, applied) or --adapter NAME=PATH (the base and each "
                         "adapter, side by side), not both")
    for flag, given in (("--candidates", args.candidates is not None), ("--draw", args.draw)):
        if given:
            raise InputError(f"--adapter answers with the base and each adapter: it takes no {flag} (one answer's)")
    if "base" in adapters:
        raise InputError("--adapter base=...: 'base' names the model without adapters; choose another name")
    return adapters


def side_by_side(model, processor, images, args, adapters: dict, settings: dict) -> int:
    """--adapter: the base's answer and each adapter's, rows of one batch; `NAME: answer` a line, or with --json a
    record a line with its `adapter` (null: the base)."""
    names = [None, *adapters]
    answers = batch_generate(model, processor, [images] * len(names), [args.prompt] * len(names), adapter=names,
                             kv_bits=args.kv_bits, deterministic=args.deterministic, verbose=args.verbose,
                             mask_decoder=args.mask_decoder or True, min_score=args.min_score, **settings)
    for name, answer in zip(names, answers.results):
        if not args.json:
            print(f"{name or 'base'}: {answer.text}")
            continue
        record = {"adapter": name, **answer_record(answer, processor.tokenizer, args.logprobs is not None)}
        if has_objects(args.prompt):
            record["objects"] = objects_to_json(answer.objects or [])
        print(json.dumps(record))
    return 0


def run(args) -> int:
    from .formats.loading import load

    settings = check_args(args)
    if args.draw:
        check_output_image(args.draw, args.image)
    if args.mask_decoder and not Path(args.mask_decoder).is_file():
        raise InputError(f"--mask-decoder {args.mask_decoder}: no such file")
    adapters = check_adapters(args)
    images = [load_image(source) for source in args.image]
    model, processor = load(args.model, revision=args.revision, adapter_path=args.adapter_path,
                            adapters=adapters or None)
    if args.candidates is not None:
        return report_scores(model, processor, images, args)
    if adapters:
        return side_by_side(model, processor, images, args, adapters, settings)
    printed = (lambda piece: print(piece, end="", flush=True)) if not args.json else None  # --json: the JSON alone
    answer = generate(model, processor, images, args.prompt, kv_bits=args.kv_bits, deterministic=args.deterministic,
                      mask_decoder=args.mask_decoder or True, min_score=args.min_score, on_text=printed, **settings)
    if not args.json:
        print()
    record = answer_record(answer, processor.tokenizer, args.logprobs is not None)
    if args.logprobs is not None and not args.json:
        print_logprobs(record["logprobs"])
    objects = answer.objects or []
    if args.json:  # one object: the answer's record (data/records.py), with its objects for detect/segment
        if has_objects(args.prompt):
            record["objects"] = objects_to_json(objects)
        print(json.dumps(record))
    if args.draw:
        draw(images[0], objects, args.draw)
    if args.verbose:
        print_stats(answer, file=sys.stderr if args.json else None)
    return 0


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
