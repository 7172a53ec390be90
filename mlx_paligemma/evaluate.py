"""Score a model on a JSONL set by each task's own metric (mlx_paligemma.tasks.metrics), generating through the engine.

    python -m mlx_paligemma.evaluate --model M [--adapter-path A] --data test.jsonl [--task auto]
        [--output metrics.json] [--predictions preds.jsonl] [--batch-size 8] [--max-tokens 100] [--report DIR]

The data is what training reads: {"image": ..., "prefix": ..., "suffix": ...} a line, or any source of
mlx_paligemma.data.sources (a Hugging Face dataset, parquet files, a COCO annotation file; `--split`). Lines with the same
image and prefix are one question whose references are all their suffixes (a suffix may also be a list), so a caption
set with five lines per image, or a VQA question with its ten human answers, scores as the metrics intend. With
`--task auto` each question's task comes from the first word of its prefix: caption, answer (VQA), ocr, detect,
segment; any other prompt is scored by exact match. With `--adapter NAME=PATH` (repeated) the base and each adapter are
scored on the same set by one model holding them all (each image encoded once), side by side (docs/ADAPTERS.md).
"""

import json
import os
import sys
import time
from pathlib import Path


from .tasks import report
from .cli import ArgumentParser, add_settings, command, run_main, settings_of
from .extras import require
from .formats.atomic import atomic_file, check_file_output
from .data.outputs import differences, place
from .errors import InputError, read_json_object
from .generation.constraints import cli_constraint
from .generation.settings import check_settings
from .generation.scoring import MAX_CANDIDATES, candidate_tokens
from .processing.processor import IMAGE_TOKEN
from .generation.adapters import add_limit_arguments, command_adapters
from .generation.features import feature_cache
from .tasks.evaluation import TASKS, evaluate_examples, task_of
from .data.sources import add_data_arguments, data_options, kind_of, read_examples


def format_table(results: dict) -> str:
    rows = [("task", "questions", "metric", "value")]
    for task, values in results["tasks"].items():
        first = True
        for name, value in values.items():
            if name in ("questions", "note"):
                continue
            if isinstance(value, dict):  # per-class mask IoU
                rows += [("", "", f"{name} {k}", f"{v:.4f}") for k, v in value.items()]
                continue
            rows.append((task if first else "", str(values["questions"]) if first else "", name,
                         f"{value:.4f}" if isinstance(value, float) else str(value)))
            first = False
        if "note" in values:
            rows.append(("", "", "note", values["note"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)


def side_by_side(results: dict) -> str:
    """One row per task metric, one column per model ({name: evaluate_examples' results})."""
    names, rows, values = list(results), [], {}
    for name, result in results.items():
        for task, metrics in result["tasks"].items():
            for metric, value in metrics.items():
                if metric == "note" or isinstance(value, dict):
                    continue
                if (task, metric) not in values:
                    rows.append((task, metric))
                values.setdefault((task, metric), {})[name] = f"{value:.4f}" if isinstance(value, float) else str(value)
    table = [("task", "metric", *names)] + [(t, m, *(values[t, m].get(n, "-") for n in names)) for t, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Score PaliGemma on a JSONL set (image, prefix, suffix) by its "
                                            "task's metric.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--adapter-path", help="adapters (or fine-tuned weights) written by mlx_paligemma.lora")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="score the base and each of these LoRA adapters on the same set, side by side (repeat the "
                        "flag; --output then holds each one's metrics) (default: none)")
    add_limit_arguments(p)
    p.add_argument("--data", required=True, help="a JSONL file (image, prefix, suffix a line), a Hugging Face dataset "
                   "(hub id, save_to_disk folder, parquet files) or a COCO annotation file")
    p.add_argument("--task", default="auto", choices=("auto",) + TASKS,
                   help="auto: choice for lines with candidates, else from each prefix's first word (caption, "
                        "answer, ocr, detect, segment; else match)")
    p.add_argument("--output", help="write the metrics as JSON here")
    p.add_argument("--predictions", help="write one JSON line per question here: prediction and references "
                   "(with --adapter: each model's prediction and score)")
    p.add_argument("--mask-decoder", metavar="PATH",
                   help="vae-oid.npz or its safetensors copy, for mask IoU (default: the cached copy, if any)")
    p.add_argument("--report", metavar="DIR", help="write an HTML page here: metrics, plots, every question with "
                   "its image and drawn boxes, worst first (a new or empty folder, or an earlier report)")
    p.add_argument("--report-examples", type=int, default=report.SHOWN, metavar="N",
                   help="--report: the worst N questions in full, the others a table row each")
    p.add_argument("--overwrite", action="store_true", help="replace an --output that holds an evaluation asked "
                   "otherwise (other settings, model or data)")
    add_settings(p, "evaluate")
    add_data_arguments(p)
    return p


def check_outputs(args) -> None:
    """--output and --predictions, before any work: files in folders that exist, not the data nor each other (a
    careless --predictions test.jsonl would replace the set it scores), new or written by us (formats.atomic)."""
    named = [(flag, getattr(args, flag.strip("-"))) for flag in ("--output", "--predictions")]
    named = [(flag, Path(path)) for flag, path in named if path]
    if len(named) == 2 and named[0][1].absolute() == named[1][1].absolute():
        raise InputError("--output and --predictions name the same file")
    data = Path(args.data)
    folder = Path(os.path.abspath(args.report)) if args.report else None
    for flag, path in named:
        if path.is_dir() or not path.parent.is_dir():
            raise InputError(f"{flag} {path}: give a file in a folder that exists")
        if path.exists() and data.exists() and (path.samefile(data) or data.is_dir() and data in path.parents):
            raise InputError(f"{flag} {path} would overwrite the data being scored")
        if folder is not None and folder in Path(os.path.abspath(path)).parents:
            raise InputError(f"{flag} {path} is inside the --report folder, which the report replaces whole: give "
                             "a file outside it")
        check_file_output(path, flag)


def check_examples(processor, examples) -> None:
    """Before the first answer, every question against the model's length (its prompt and the image's tokens,
    with room for an answer; each candidate after them), naming the file and line."""
    limit, seq = processor.max_length, processor.image_seq_length
    if limit is None:
        return
    seen = set()
    for e in examples:
        if (e.prefix, e.candidates) in seen:
            continue
        seen.add((e.prefix, e.candidates))
        prompt = seq + len(processor.tokenizer.encode(processor.build_prompt(e.prefix, 1).replace(IMAGE_TOKEN, "")))
        if prompt >= limit:
            raise InputError(f"{e.where}: the prompt is {prompt} tokens with the image's {seq}, no room for an answer "
                             f"in the model's {limit}")
        if len(e.candidates) > MAX_CANDIDATES:
            raise InputError(f"{e.where}: {len(e.candidates)} candidates, more than {MAX_CANDIDATES}")
        for number, candidate in enumerate(e.candidates, 1):
            n = prompt + len(candidate_tokens(processor, candidate))
            if n > limit:
                raise InputError(f"{e.where}: candidate {number} makes {n} tokens with the prompt and the image's "
                                 f"{seq}, more than the model's {limit}")


def write_text(path, text: str, flag: str) -> None:
    """Whole or not at all: a run stopped while writing leaves the previous file."""
    with atomic_file(Path(path), flag) as tmp:
        tmp.write_text(text)


def run(args) -> None:
    from .formats.loading import load
    from .formats.mask_decoder import CACHE_DIR, load_mask_decoder

    settings = {**settings_of(args, "evaluate"), **cli_constraint(args)}
    check_settings(**settings)
    if kind_of(args.data) == "missing":
        raise InputError(f"--data: no such file {args.data}")
    check_outputs(args)
    adapters = command_adapters(args)
    if adapters:
        if args.adapter_path is not None or args.report:
            raise InputError("--adapter compares several models: give it without --adapter-path and --report (those "
                             "take one model)")
        if "base" in adapters:
            raise InputError("--adapter base=...: 'base' names the model without adapters; choose another name")
    wanted = asked(args, adapters)
    check_rerun(args, wanted)
    if args.report:
        require("report", "--report")
        report.check_folder(args.report, args.report_examples)
    examples = read_examples(args.data, args.split, data_options(args))
    tasks = {args.task} if args.task != "auto" else {"choice" if e.candidates else task_of(e.prefix) for e in examples}
    if tasks & {"detect", "segment"}:
        require("eval", "detection metrics")  # the metrics need it after every answer: said before the first
    decoder = None
    path = args.mask_decoder or (CACHE_DIR / "vae-oid.npz")
    segments = any((task_of(e.prefix) if args.task == "auto" else args.task) == "segment" for e in examples)
    if args.mask_decoder or (segments and Path(path).is_file()):
        if not Path(path).is_file():
            raise InputError(f"--mask-decoder: no such file {path}")
        decoder = load_mask_decoder(path)
    if adapters:
        model, processor = load(args.model, revision=args.revision, adapters=adapters)
    else:
        model, processor = load(args.model, adapter_path=args.adapter_path, revision=args.revision)
    check_examples(processor, examples)
    tic, results, records = time.perf_counter(), {}, {}
    for name in ["base", *adapters]:  # one model, the adapters beside its base: each image encoded once
        results[name], records[name] = evaluate_examples(
            model, processor, examples, args.task, args.batch_size, decoder,
            progress=lambda s: print(f"{name}: {s}" if adapters else s, file=sys.stderr, flush=True),
            adapter=None if name == "base" else name, deterministic=args.deterministic, **settings)
    if adapters:
        print(f"vision tower: {feature_cache(model).images_encoded} images encoded for {len(results)} models",
              file=sys.stderr)
    print(side_by_side(results) if adapters else format_table(results["base"]))
    if args.output:
        out = {**wanted, "seconds": round(time.perf_counter() - tic, 2), "results": results}
        write_text(args.output, json.dumps(out, indent=2) + "\n", "--output")
    if args.predictions:
        write_text(args.predictions, "".join(json.dumps(line) + "\n" for line in prediction_lines(records)),
                   "--predictions")
    if args.report:
        written = report.write_report(args.report, results["base"], records["base"], examples, args.report_examples)
        print(f"report: {written}")


def prediction_lines(records: dict) -> list:
    """--predictions: a line per question, its answer by each model ({name: records}; "base" alone without
    --adapter): {image, prefix, task, references, reference_objects (detect, segment), answers: {name: the answer's
    record, its score, objects and candidates}}."""
    question = ("image", "prefix", "task", "references", "reference_objects")
    return [{**{k: first[k] for k in question if k in first},
             "answers": {name: {k: v for k, v in r[i].items() if k not in question} for name, r in records.items()}}
            for i, first in enumerate(records["base"])]


def asked(args, adapters: dict) -> dict:
    """What an evaluation is asked that its figures depend on: what --output records, and a rerun onto that file
    must ask again (or give --overwrite)."""
    return {"model": place(args.model), "revision": args.revision, "adapter_path": place(args.adapter_path),
            "adapters": {name: place(folder) for name, folder in adapters.items()}, "data": place(args.data),
            "split": args.split, "task": args.task,
            "settings": {**settings_of(args, "evaluate"), **cli_constraint(args), "deterministic": args.deterministic}}


def check_rerun(args, wanted: dict) -> None:
    """An --output holding an evaluation asked otherwise is refused, naming the difference, unless --overwrite."""
    path = Path(args.output) if args.output else None
    if args.overwrite or path is None or not path.is_file():
        return
    try:
        recorded = read_json_object(path)
    except InputError:
        return  # not an evaluation's: formats.atomic decides whether it may be replaced
    if "settings" not in recorded:
        return  # an earlier release's, which recorded none
    differ = differences(recorded, wanted)
    if differ:
        raise InputError(f"--output {path} holds an evaluation asked otherwise ({', '.join(differ)}): give another "
                         "--output, or --overwrite to replace it")


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
