"""Evaluation: questions grouped from examples, answered through the engine (or by scoring candidates), and scored
by each task's own metric. The evaluate command and the trainer's validation both run it."""

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from .. import defaults
from ..data.items import Example
from ..data.records import answer_record
from ..errors import InputError
from ..generation.engine import Engine
from ..generation.runs import run_all
from ..generation.scoring import score as score_candidates
from ..generation.settings import check_settings
from . import metrics
from .detection import ObjectReader, objects_to_json


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
                     progress: Optional[Callable[[str], None]] = None, adapter: Optional[str] = None,
                     deterministic: bool = False, **settings) -> list:
    """The answers through the engine (greedy unless `settings` say otherwise; with a seed, question i samples with
    seed + i, as a dataset's item i): its Results, in question order, whose tokens' log-probabilities give detected
    objects their scores; progress reported every few batches."""
    engine = Engine(model, processor, batch_size=batch_size, deterministic=deterministic)
    seed = settings.pop("seed", None)
    submits = ((i, lambda i=i, q=q: engine.submit(q.image, q.prefix, adapter=adapter, **settings,
                                                  seed=None if seed is None else seed + i))
               for i, q in enumerate(questions))
    answers, tic, every = {}, time.perf_counter(), max(8 * batch_size, 64)
    for i, result in run_all(engine, submits):
        if isinstance(result, InputError) or result.error is not None:
            error = result if isinstance(result, InputError) else result.error
            raise InputError(f"{questions[i].source or questions[i].prefix}: {error}", param=error.param)
        answers[i] = result
        if progress is not None and (len(answers) % every == 0 or len(answers) == len(questions)):
            progress(f"{len(answers)}/{len(questions)} answers, {len(answers) / (time.perf_counter() - tic):.2f}/s")
    return [answers[i] for i in range(len(questions))]


def choose_answers(model, processor, questions: Sequence[Question], batch_size: int = defaults.BATCH_SIZE,
                   progress: Optional[Callable[[str], None]] = None,
                   adapter: Optional[str] = None) -> List[List[float]]:
    """Multiple choice: each candidate's summed log-probability (<eos> included) given image and prefix, as
    scoring.score gives it; the likeliest candidate is the answer."""
    answers, tic = [], time.perf_counter()
    for q in questions:
        answers.append(score_candidates(model, processor, [q.image], q.prefix, list(q.candidates),
                                        batch_size=batch_size, adapter=adapter))
        if progress is not None and (len(answers) % 64 == 0 or len(answers) == len(questions)):
            progress(f"{len(answers)}/{len(questions)} choices, {len(answers) / (time.perf_counter() - tic):.2f}/s")
    return answers


def image_size(image) -> Tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as opened:  # reads the header only
        return opened.size


def score_answers(task: str, predictions: Sequence[str], questions: Sequence[Question], mask_decoder=None,
                  token_scores: Optional[Sequence[tuple]] = None, decode=None) -> dict:
    """The task's metrics for these answers. Segmentation without a mask decoder gets its box metrics and a note.
    token_scores: per answer (tokens, logprobs), which rank detected boxes by their score (`decode`, the
    tokenizer's, places the tokens in the text)."""
    return score_questions(task, predictions, questions, mask_decoder, token_scores, decode)[0]


def score_questions(task: str, predictions: Sequence[str], questions: Sequence[Question], mask_decoder=None,
                    token_scores: Optional[Sequence[tuple]] = None, decode=None) -> Tuple[dict, List[float], list]:
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
        read = ObjectReader(None, decode, 0.0, decoder, fetch=False)
        predicted = [read(p, size, *t) for p, size, t in zip(predictions, sizes, token_scores)]
        reference = [[o for r in q.references for o in read(r, size)] for q, size in zip(questions, sizes)]
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
                      batch_size: int = defaults.BATCH_SIZE, mask_decoder=None,
                      progress: Optional[Callable[[str], None]] = None, adapter: Optional[str] = None,
                      deterministic: bool = False, **settings) -> Tuple[dict, List[dict]]:
    """Answer every question and score each task; `adapter`: a loaded adapter's name to answer through (None: the
    base); `settings`: generation settings (generation/settings.py; default greedy). Returns ({"tasks": {task:
    {"questions": n, metric: value, ...}}, "metric": what "score" is, "score": the primary metric, or the mean of the
    tasks' primary metrics}, one record per question: image, prefix, task, references, the answer's record
    (data/records.py: text, finish_reason, token counts), its score, and for detect/segment its objects and the
    references' (reference_objects), for multiple choice each candidate's logprob)."""
    if task not in TASKS + ("auto",):
        raise InputError(f"unknown task {task!r}: choose from auto, {', '.join(TASKS)}")
    check_settings("evaluate_examples()", **settings)  # before any work: a misspelt keyword is one line
    questions = group_questions(examples, task)
    choices = [i for i, q in enumerate(questions) if q.task == "choice"]
    free = [i for i, q in enumerate(questions) if q.task != "choice"]
    generations = dict(zip(free, generate_answers(model, processor, [questions[i] for i in free], batch_size,
                                                  progress, adapter, deterministic, **settings)))
    scored = dict(zip(choices, choose_answers(model, processor, [questions[i] for i in choices], batch_size,
                                              progress, adapter)))
    answers = {i: answer_record(g) for i, g in generations.items()}
    for i in choices:  # the likeliest candidate (the first if equal), scored rather than generated
        text = questions[i].candidates[max(range(len(scored[i])), key=scored[i].__getitem__)]
        answers[i] = {"text": text, "finish_reason": None, "prompt_tokens": None, "generation_tokens": 0}
    token_scores = {i: (g.tokens, g.logprobs) if g.logprobs else (None, None) for i, g in generations.items()}
    records = [{"image": q.source, "prefix": q.prefix, "task": q.task, "references": q.references, **answers[i]}
               for i, q in enumerate(questions)]
    for i in choices:
        records[i]["candidates"] = [{"text": c, "logprob": v} for c, v in zip(questions[i].candidates, scored[i])]
    results, primary = {}, {}
    for name in [t for t in TASKS if any(q.task == t for q in questions)]:
        chosen = [i for i, q in enumerate(questions) if q.task == name]
        values, scores, objects = score_questions(
            name, [records[i]["text"] for i in chosen], [questions[i] for i in chosen], mask_decoder,
            [token_scores[i] for i in chosen] if name in ("detect", "segment") else None, processor.tokenizer.decode)
        results[name] = {"questions": len(chosen), **values}
        for i, value, pair in zip(chosen, scores, objects):
            records[i]["score"] = value
            if pair is not None:
                records[i]["objects"] = objects_with_scores(pair[0])
                records[i]["reference_objects"] = objects_with_scores(pair[1])
        key = PRIMARY[name] if PRIMARY[name] in results[name] else "map"  # segmentation without masks: boxes
        primary[f"{name} {key}"] = results[name][key]
    metric = next(iter(primary)) if len(primary) == 1 else f"mean of {', '.join(primary)}"
    return {"tasks": results, "metric": metric, "score": sum(primary.values()) / len(primary)}, records
