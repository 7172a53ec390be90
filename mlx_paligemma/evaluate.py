"""Score a model on a JSONL set by each task's own metric (mlx_paligemma.metrics), generating through the engine.

    python -m mlx_paligemma.evaluate --model M [--adapter-path A] --data test.jsonl [--task auto]
        [--output metrics.json] [--predictions preds.jsonl] [--batch-size 8] [--max-tokens 100] [--report DIR]

The data is what training reads: {"image": ..., "prefix": ..., "suffix": ...} a line, or any source of
mlx_paligemma.sources (a Hugging Face dataset, parquet files, a COCO annotation file; `--split`). Lines with the same
image and prefix are one question whose references are all their suffixes (a suffix may also be a list), so a caption
set with five lines per image, or a VQA question with its ten human answers, scores as the metrics intend. With
`--task auto` each question's task comes from the first word of its prefix: caption, answer (VQA), ocr, detect,
segment; any other prompt is scored by exact match.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from . import defaults, metrics, report
from .cli import ArgumentParser, command, run_main
from .detection import objects_to_json, parse_detections, token_ends
from .formats.atomic import atomic_file
from .processor import InputError
from .data import Example
from .scoring import score as score_candidates
from .sources import add_data_arguments, data_options, kind_of, read_examples

TASKS = ("caption", "vqa", "ocr", "detect", "segment", "choice", "match")
_BY_FIRST_WORD = {"caption": "caption", "answer": "vqa", "ocr": "ocr", "detect": "detect", "segment": "segment"}
# The metric each task is judged by (the trainer keeps the best weights by it); all are higher-is-better.
PRIMARY = {"caption": "cider", "vqa": "vqa_accuracy", "ocr": "anls", "detect": "map", "segment": "mask_iou",
           "choice": "accuracy", "match": "exact_match"}


def task_of(prefix: str) -> str:
    words = prefix.split(maxsplit=1)
    return _BY_FIRST_WORD.get(words[0] if words else "", "match")


@dataclass
class Question:
    image: object
    prefix: str
    references: List[str]
    task: str
    source: str
    candidates: Tuple[str, ...] = ()  # a multiple-choice question's answers


def group_questions(examples: Sequence[Example], task: str = "auto") -> List[Question]:
    """One question per (image, prefix, candidates), in order of first appearance, with every suffix given for it.
    With `auto`, a question with candidates is multiple choice (`choice`), the others' task is their prefix's."""
    questions: Dict[tuple, Question] = {}
    for e in examples:
        key = (e.image if isinstance(e.image, str) else id(e.image), e.prefix, e.candidates)
        if key not in questions:
            if task == "choice" and not e.candidates:
                raise InputError(f"{e.where or e.prefix}: --task choice needs 'candidates' in every line")
            kind = ("choice" if e.candidates else task_of(e.prefix)) if task == "auto" else task
            source = e.source or (e.image if isinstance(e.image, str) else "")
            questions[key] = Question(e.image, e.prefix, [], kind, source, e.candidates)
        questions[key].references.append(e.suffix)
    return list(questions.values())


def generate_answers(model, processor, questions: Sequence[Question], batch_size: int = defaults.BATCH_SIZE,
                     max_tokens: int = defaults.MAX_TOKENS, progress: Optional[Callable[[str], None]] = None,
                     num_beams: int = defaults.NUM_BEAMS, length_penalty: float = defaults.LENGTH_PENALTY) -> list:
    """Greedy (or beam search) answers through the batch engine, in slices so that a long run can report its
    progress: Generations, whose tokens' log-probabilities give detected objects their scores."""
    from . import batch_generate

    answers, tic, chunk = [], time.perf_counter(), max(8 * batch_size, 64)
    for start in range(0, len(questions), chunk):
        part = questions[start:start + chunk]
        answers += batch_generate(model, processor, images=[q.image for q in part], prompts=[q.prefix for q in part],
                                  max_tokens=max_tokens, temperature=0.0, batch_size=batch_size, logprobs=0,
                                  num_beams=num_beams, length_penalty=length_penalty)
        if progress is not None:
            progress(f"{len(answers)}/{len(questions)} answers, {len(answers) / (time.perf_counter() - tic):.2f}/s")
    return answers


def choose_answers(model, processor, questions: Sequence[Question], batch_size: int = defaults.BATCH_SIZE,
                   progress: Optional[Callable[[str], None]] = None) -> List[List[float]]:
    """Multiple choice: each candidate's summed log-probability (<eos> included) given image and prefix, as
    scoring.score gives it; the likeliest candidate is the answer."""
    answers, tic = [], time.perf_counter()
    for q in questions:
        answers.append(score_candidates(model, processor, [q.image], q.prefix, list(q.candidates),
                                        batch_size=batch_size))
        if progress is not None and (len(answers) % 64 == 0 or len(answers) == len(questions)):
            progress(f"{len(answers)}/{len(questions)} choices, {len(answers) / (time.perf_counter() - tic):.2f}/s")
    return answers


def image_size(image) -> Tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as opened:  # reads the header only
        return opened.size


def score(task: str, predictions: Sequence[str], questions: Sequence[Question], mask_decoder=None,
          token_scores: Optional[Sequence[tuple]] = None) -> dict:
    """The task's metrics for these answers. Segmentation without a mask decoder gets its box metrics and a note.
    token_scores: per answer (token_ends, logprobs), which rank detected boxes by their score."""
    return score_questions(task, predictions, questions, mask_decoder, token_scores)[0]


def score_questions(task: str, predictions: Sequence[str], questions: Sequence[Question], mask_decoder=None,
                    token_scores: Optional[Sequence[tuple]] = None) -> Tuple[dict, List[float], list]:
    """score's metrics, each question's own score by the same metric (CIDEr, VQA accuracy, ANLS, the image's box
    mAP or mask IoU, exact match), and per question (predicted, reference) objects for detect and segment (else
    None)."""
    refs = [q.references for q in questions]
    if task == "caption":
        return ({"cider": metrics.cider(predictions, refs), "bleu4": metrics.bleu(predictions, refs)},
                metrics.cider_scores(predictions, refs), [None] * len(questions))
    if task == "vqa":
        return ({"vqa_accuracy": metrics.vqa_accuracy(predictions, refs),
                 "exact_match": metrics.exact_match(predictions, refs)},
                metrics.vqa_scores(predictions, refs), [None] * len(questions))
    if task == "ocr":
        return ({"anls": metrics.anls(predictions, refs), "cer": metrics.character_error_rate(predictions, refs)},
                metrics.anls_scores(predictions, refs), [None] * len(questions))
    if task == "choice":
        return ({"accuracy": metrics.exact_match(predictions, refs)}, metrics.exact_match_scores(predictions, refs),
                [None] * len(questions))
    if task in ("detect", "segment"):
        decoder = mask_decoder if task == "segment" else None
        sizes = [image_size(q.image) for q in questions]
        token_scores = token_scores or [(None, None)] * len(predictions)
        predicted = [parse_detections(p, size, decoder, *t) for p, size, t in zip(predictions, sizes, token_scores)]
        reference = [[o for r in q.references for o in parse_detections(r, size, decoder)]
                     for q, size in zip(questions, sizes)]
        out = metrics.detection_scores(predicted, reference)
        masks = task == "segment" and decoder is not None
        if task == "segment":
            if decoder is None:
                out["note"] = "mask IoU not computed: no mask decoder (give --mask-decoder PATH to vae-oid.npz)"
            else:
                out.update(metrics.mask_scores(predicted, reference))
        return out, [image_score(p, r, masks) for p, r in zip(predicted, reference)], list(zip(predicted, reference))
    return ({"exact_match": metrics.exact_match(predictions, refs)}, metrics.exact_match_scores(predictions, refs),
            [None] * len(questions))


def image_score(predicted: list, reference: list, masks: bool) -> float:
    """One image's detection score: its mask IoU (masks) or box mAP@[.5:.95]; 1 when there is nothing to find and
    nothing is found."""
    if not predicted and not reference:
        return 1.0
    if masks:
        return metrics.mask_scores([predicted], [reference])["mask_iou"]
    return metrics.detection_scores([predicted], [reference])["map"]


def objects_with_scores(objects: list) -> List[dict]:
    return [{**d, "score": o.score} for o, d in zip(objects, objects_to_json(objects))]


def evaluate_examples(model, processor, examples: Sequence[Example], task: str = "auto",
                      batch_size: int = defaults.BATCH_SIZE, max_tokens: int = defaults.MAX_TOKENS, mask_decoder=None,
                      progress: Optional[Callable[[str], None]] = None, num_beams: int = defaults.NUM_BEAMS,
                      length_penalty: float = defaults.LENGTH_PENALTY) -> Tuple[dict, List[dict]]:
    """Generate for every question and score each task. Returns ({"tasks": {task: {"questions": n, metric:
    value, ...}}, "metric": what "score" is, "score": the primary metric, or the mean of the tasks' primary
    metrics}, one record per question: image, prefix, task, prediction, references)."""
    if task not in TASKS + ("auto",):
        raise InputError(f"unknown task {task!r}: choose from auto, {', '.join(TASKS)}")
    questions = group_questions(examples, task)
    choices = [i for i, q in enumerate(questions) if q.task == "choice"]
    free = [i for i, q in enumerate(questions) if q.task != "choice"]
    generations = dict(zip(free, generate_answers(model, processor, [questions[i] for i in free], batch_size,
                                                  max_tokens, progress, num_beams, length_penalty)))
    scored = dict(zip(choices, choose_answers(model, processor, [questions[i] for i in choices], batch_size,
                                              progress)))
    answers = [generations[i].text if i in generations else
               questions[i].candidates[max(range(len(scored[i])), key=scored[i].__getitem__)]  # the first if equal
               for i in range(len(questions))]
    token_scores = {i: (token_ends(g.tokens, processor.tokenizer.decode), g.logprobs) if g.logprobs else (None, None)
                    for i, g in generations.items()}
    records = [{"image": q.source, "prefix": q.prefix, "task": q.task, "prediction": a, "references": q.references}
               for q, a in zip(questions, answers)]
    for i in choices:
        records[i]["candidates"] = [{"text": c, "logprob": v} for c, v in zip(questions[i].candidates, scored[i])]
    results, primary = {}, {}
    for name in [t for t in TASKS if any(q.task == t for q in questions)]:
        chosen = [i for i, q in enumerate(questions) if q.task == name]
        values, scores, objects = score_questions(
            name, [answers[i] for i in chosen], [questions[i] for i in chosen], mask_decoder,
            [token_scores[i] for i in chosen] if name in ("detect", "segment") else None)
        results[name] = {"questions": len(chosen), **values}
        for i, value, pair in zip(chosen, scores, objects):
            records[i]["score"] = value
            if pair is not None:
                records[i]["objects"] = {"prediction": objects_with_scores(pair[0]),
                                         "references": objects_with_scores(pair[1])}
        key = PRIMARY[name] if PRIMARY[name] in results[name] else "map"  # segmentation without masks: boxes
        primary[f"{name} {key}"] = results[name][key]
    metric = next(iter(primary)) if len(primary) == 1 else f"mean of {', '.join(primary)}"
    return {"tasks": results, "metric": metric, "score": sum(primary.values()) / len(primary)}, records


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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Score PaliGemma on a JSONL set (image, prefix, suffix) by its "
                                            "task's metric.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--adapter-path", help="adapters (or fine-tuned weights) written by mlx_paligemma.lora")
    p.add_argument("--data", required=True, help="a JSONL file (image, prefix, suffix a line), a Hugging Face dataset "
                   "(hub id, save_to_disk folder, parquet files) or a COCO annotation file")
    p.add_argument("--task", default="auto", choices=("auto",) + TASKS,
                   help="auto: choice for lines with candidates, else from each prefix's first word (caption, "
                        "answer, ocr, detect, segment; else match)")
    p.add_argument("--output", help="write the metrics as JSON here")
    p.add_argument("--predictions", help="write one JSON line per question here: prediction and references")
    p.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE, help="prompts decoded together")
    p.add_argument("--max-tokens", type=int, default=defaults.MAX_TOKENS, help="most tokens per answer")
    p.add_argument("--num-beams", type=int, default=defaults.NUM_BEAMS,
                   help="beam search with this many beams (1: greedy); big_vision's transfers use 2 for COCO "
                        "captions and 3 for TextCaps, greedy elsewhere")
    p.add_argument("--length-penalty", type=float, default=defaults.LENGTH_PENALTY,
                   help="beam search: a finished answer scores its log-probability / length ** this")
    p.add_argument("--mask-decoder", metavar="PATH",
                   help="vae-oid.npz or its safetensors copy, for mask IoU (default: the cached copy, if any)")
    p.add_argument("--report", metavar="DIR", help="write an HTML page here: metrics, plots, every question with "
                   "its image and drawn boxes, worst first (a new or empty folder, or an earlier report)")
    p.add_argument("--report-examples", type=int, default=report.SHOWN, metavar="N",
                   help="--report: the worst N questions in full, the others a table row each")
    add_data_arguments(p)
    return p


def check_outputs(args) -> None:
    """--output and --predictions, before any work: files in folders that exist, not the data nor each other (a
    careless --predictions test.jsonl would replace the set it scores)."""
    named = [(flag, getattr(args, flag.strip("-"))) for flag in ("--output", "--predictions")]
    named = [(flag, Path(path)) for flag, path in named if path]
    if len(named) == 2 and named[0][1].absolute() == named[1][1].absolute():
        raise InputError("--output and --predictions name the same file")
    data = Path(args.data)
    for flag, path in named:
        if path.is_dir() or not path.parent.is_dir():
            raise InputError(f"{flag} {path}: give a file in a folder that exists")
        if path.exists() and data.exists() and (path.samefile(data) or data.is_dir() and data in path.parents):
            raise InputError(f"{flag} {path} would overwrite the data being scored")


def write_text(path, text: str) -> None:
    """Whole or not at all: a run stopped while writing leaves the previous file."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text)


def run(args) -> None:
    from .loading import load
    from .mask_decoder import CACHE_DIR, load_mask_decoder

    for name in ("batch_size", "max_tokens", "num_beams"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if kind_of(args.data) == "missing":
        raise InputError(f"--data: no such file {args.data}")
    check_outputs(args)
    if args.report:
        report.check_folder(args.report, args.report_examples)
    examples = read_examples(args.data, args.split, data_options(args))
    decoder = None
    path = args.mask_decoder or (CACHE_DIR / "vae-oid.npz")
    segments = any((task_of(e.prefix) if args.task == "auto" else args.task) == "segment" for e in examples)
    if args.mask_decoder or (segments and Path(path).is_file()):
        if not Path(path).is_file():
            raise InputError(f"--mask-decoder: no such file {path}")
        decoder = load_mask_decoder(path)
    model, processor = load(args.model, adapter_path=args.adapter_path, revision=args.revision)
    tic = time.perf_counter()
    results, records = evaluate_examples(model, processor, examples, args.task, args.batch_size, args.max_tokens,
                                         decoder, progress=lambda s: print(s, file=sys.stderr, flush=True),
                                         num_beams=args.num_beams, length_penalty=args.length_penalty)
    results.update(model=args.model, adapter_path=args.adapter_path, data=args.data,
                   seconds=round(time.perf_counter() - tic, 2))
    print(format_table(results))
    if args.output:
        write_text(args.output, json.dumps(results, indent=2) + "\n")
    if args.predictions:
        write_text(args.predictions, "".join(json.dumps(r) + "\n" for r in records))
    if args.report:
        print(f"report: {report.write_report(args.report, results, records, examples, args.report_examples)}")


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
