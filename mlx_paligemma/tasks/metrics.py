"""The task metrics PaliGemma's papers report, each defined once; predictions and references are answers as text.

| task | metrics | computed by |
| --- | --- | --- |
| captions | CIDEr (CIDEr-D), BLEU-4 | here, as the COCO caption toolkit (pycocoevalcap) defines them |
| VQA | VQAv2 accuracy with its answer normalisation, exact match | here, as the VQA evaluation code defines them |
| OCR, documents | ANLS, character error rate | here (Levenshtein distance) |
| detection | mAP@0.5, mAP@[.5:.95], mean IoU of matched boxes | pycocotools (COCOeval, bbox); the IoUs here |
| segmentation | mask IoU, mean and per class | here, on masks from the mask decoder |

Every question has a list of references (one or more). CIDEr and BLEU are corpus metrics (CIDEr's document
frequencies come from the references of the whole set); the others are means over questions. pycocoevalcap is not a
dependency because it is a 104 MB wheel (it bundles the Java tools for its tokenizer, METEOR and SPICE), last
released in 2020; its CIDEr and BLEU scorers are pure Python and the tests check these against them.
"""

import contextlib
import io
import math
import re
from collections import Counter
from typing import Dict, List, Sequence

import numpy as np

from .detection import DetectedObject
from ..extras import require

# The tokens pycocoevalcap's PTBTokenizer drops after tokenizing. Brackets it keeps: the Java tokenizer writes them
# -LRB-, -RSB-, ... and lower-cases them with -lowerCase, so its list (upper case) never matches them.
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Stanford's PTBTokenizer (Java) on caption text: clitics split off (and cannot, gonna, wanna, gotta in two);
# punctuation split off except inside words and numbers (well-known, 3.5, 1,000, 10:30, black/white), after
# acronyms and a few abbreviations (u.s., e.g., mr., etc.); runs of ? and ! one token.
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b|\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|'\d0s\b|(?:[a-z]\.){2,}|(?:mr|mrs|ms|dr|jr|sr|st|vs|etc|inc|ltd)\.|"
                    r"[#@]?\w+(?:[-.,'/@]\w+|(?<=\d):\d+)*|\.\.\.|--|[?!]+|\S")


def caption_tokens(text: str) -> List[str]:
    """Lower-cased PTB tokens without punctuation: what pycocoevalcap's tokenizer gives its scorers."""
    text = _CLITIC.sub(lambda m: " ".join(g for g in m.groups() if g), text.lower())
    return [_BRACKETS.get(t, t) for t in _TOKEN.findall(text) if t not in _DROPPED]


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n as pycocoevalcap's Bleu: clipped n-gram counts summed over the set, the brevity penalty from the
    reference length closest to each prediction's."""
    guess, correct, test_len, ref_len = np.zeros(n), np.zeros(n), 0, 0
    for prediction, refs in zip(predictions, references):
        words, refs = caption_tokens(prediction), [caption_tokens(r) for r in refs]
        most = Counter()
        for r in refs:
            most |= _ngrams(r, n)  # the largest count of each n-gram in any one reference
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, most[gram])
        guess += [max(0, len(words) - k) for k in range(n)]
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's guards against log(0) and division by zero
    score = float(np.prod((correct + tiny) / (guess + small)) ** (1 / n))
    ratio = (test_len + tiny) / (ref_len + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as pycocoevalcap's Cider (Vedantam et al. 2015): n-gram tf-idf cosine similarity for n = 1..4,
    the prediction's counts clipped to the reference's, a Gaussian penalty on the length difference, averaged over
    the references, times 10. Document frequencies are counted over the references of this set."""
    return float(np.mean(cider_scores(predictions, references, n, sigma)))


def cider_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
                 sigma: float = 6.0) -> List[float]:
    """Each prediction's CIDEr-D (their mean is `cider`), document frequencies from the references of the set."""
    tests = [_ngrams(caption_tokens(p), n) for p in predictions]
    refs = [[_ngrams(caption_tokens(r), n) for r in rs] for rs in references]
    df = Counter(gram for rs in refs for gram in set().union(*rs))
    log_docs = math.log(len(refs))

    def vector(counts):
        vec = {g: c * (log_docs - math.log(max(1.0, df[g]))) for g, c in counts.items()}
        norm = np.zeros(n)
        for g, w in vec.items():
            norm[len(g) - 1] += w * w
        # pycocoevalcap's "length" counts bigrams (words - 1); kept so that scores agree with it.
        return vec, np.sqrt(norm), sum(c for g, c in counts.items() if len(g) == 2)

    scores = []
    for test, rs in zip(tests, refs):
        vec, norm, length = vector(test)
        total = np.zeros(n)
        for r in rs:
            vec_r, norm_r, length_r = vector(r)
            sim = np.zeros(n)
            for g, w in vec.items():
                sim[len(g) - 1] += min(w, vec_r.get(g, 0.0)) * vec_r.get(g, 0.0)
            nonzero = (norm != 0) & (norm_r != 0)
            sim[nonzero] /= (norm * norm_r)[nonzero]
            total += sim * math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
        scores.append(float(10.0 * total.mean() / len(rs)))
    return scores


# The VQA evaluation code's answer normalisation (VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the original's pattern, look-behind typo included
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The VQA evaluation's processPunctuation then processDigitArticle: punctuation removed (or made a space),
    lower case, number words as digits, articles dropped, contractions spelled with their apostrophe."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over questions of min(#references equal to the prediction / 3, 1), after normalize_vqa_answer: VQAv2's
    accuracy over the human answers given (with one reference it is exact match after normalisation). The official
    script averages it over the 10 leave-one-out subsets of its 10 answers instead, which differs slightly."""
    return float(np.mean(vqa_scores(predictions, references)))


def vqa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> List[float]:
    """Each question's VQA accuracy (their mean is `vqa_accuracy`)."""
    scores = []
    for prediction, refs in zip(predictions, references):
        answer = normalize_vqa_answer(prediction)
        scores.append(min(sum(normalize_vqa_answer(r) == answer for r in refs) / 3, 1.0) if len(refs) > 1
                      else float(normalize_vqa_answer(refs[0]) == answer))
    return scores


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references, surrounding whitespace ignored."""
    return float(np.mean(exact_match_scores(predictions, references)))


def exact_match_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> List[float]:
    """1.0 for each prediction equal to one of its references (surrounding whitespace ignored), else 0.0."""
    return [float(p.strip() in {r.strip() for r in refs}) for p, refs in zip(predictions, references)]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity (ST-VQA, DocVQA): per question the best over its references of
    1 - distance / longer length, on lower-cased, whitespace-collapsed text, counted 0 when the normalised distance
    is `threshold` or more."""
    return float(np.mean(anls_scores(predictions, references, threshold)))


def anls_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = 0.5) -> List[float]:
    """Each question's ANLS (their mean is `anls`)."""
    def norm(s):
        return " ".join(s.lower().split())

    scores = []
    for prediction, refs in zip(predictions, references):
        p, best = norm(prediction), 0.0
        for r in map(norm, refs):
            distance = levenshtein(p, r) / max(len(p), len(r)) if p or r else 0.0
            best = max(best, 1.0 - distance if distance < threshold else 0.0)
        scores.append(best)
    return scores


def character_error_rate(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Character edits to the closest reference, summed over the set, divided by the characters of those references."""
    edits = chars = 0
    for prediction, refs in zip(predictions, references):
        distance, length = min((levenshtein(prediction, r), len(r)) for r in refs)
        edits, chars = edits + distance, chars + length
    return edits / max(chars, 1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def matched_ious(predicted: Sequence[DetectedObject], reference: Sequence[DetectedObject]) -> List[float]:
    """IoUs of the pairs that greedy matching takes: same label, largest IoU first, each box in one pair at most."""
    pairs = sorted(((box_iou(p.box, r.box), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)
                    if p.label == r.label), reverse=True)
    used_p, used_r, ious = set(), set(), []
    for iou, i, j in pairs:
        if iou > 0 and i not in used_p and j not in used_r:
            used_p.add(i), used_r.add(j), ious.append(iou)
    return ious


def _coco_evaluation(predictions: Sequence[Sequence[DetectedObject]],
                     references: Sequence[Sequence[DetectedObject]]):
    """pycocotools' COCOeval (bbox) of these boxes, accumulated, and the labels in its category order; None when
    there is no reference box or no prediction."""
    require("eval", "detection metrics")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted({o.label for objects in (*predictions, *references) for o in objects})
    category = {label: i + 1 for i, label in enumerate(labels)}

    def coco_box(o):
        x0, y0, x1, y1 = o.box
        return [x0, y0, x1 - x0, y1 - y0]

    ground_truth = [{"id": k + 1, "image_id": i + 1, "category_id": category[o.label], "bbox": coco_box(o),
                     "area": (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]), "iscrowd": 0}
                    for k, (i, o) in enumerate((i, o) for i, objects in enumerate(references) for o in objects)]
    detections = [{"image_id": i + 1, "category_id": category[o.label], "bbox": coco_box(o),
                   "score": 1.0 if o.score is None else o.score}
                  for i, objects in enumerate(predictions) for o in objects]
    if not (ground_truth and detections):
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        coco = COCO()
        coco.dataset = {"images": [{"id": i + 1} for i in range(len(references))], "annotations": ground_truth,
                        "categories": [{"id": c, "name": label} for label, c in category.items()]}
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation, labels


def detection_scores(predictions: Sequence[Sequence[DetectedObject]],
                     references: Sequence[Sequence[DetectedObject]]) -> Dict[str, object]:
    """COCO box mAP by pycocotools (boxes ranked by their `score`, the mean probability of their tokens; a box
    without one scores 1) over the labels that have reference boxes, and the mean IoU of matched boxes.
    {"map_50": mAP@0.5, "map": mAP@[.5:.95], "mean_iou": ..., "matched": pairs, "reference_boxes": ...,
    "per_class_ap": {label: AP@[.5:.95]} for the labels with reference boxes}."""
    ious = [iou for p, r in zip(predictions, references) for iou in matched_ious(p, r)]
    out = {"map_50": 0.0, "map": 0.0, "mean_iou": float(np.mean(ious)) if ious else 0.0, "matched": len(ious),
           "reference_boxes": sum(len(r) for r in references),
           "per_class_ap": {label: 0.0 for label in sorted({o.label for r in references for o in r})}}
    evaluated = _coco_evaluation(predictions, references)
    if evaluated is not None:
        evaluation, labels = evaluated
        out["map"], out["map_50"] = (max(float(v), 0.0) for v in evaluation.stats[:2])
        # precision: [IoU threshold, recall, category, area range (0: all), max detections (-1: 100)]; -1 where a
        # class has no reference box or a recall is never reached.
        precision = evaluation.eval["precision"][:, :, :, 0, -1]
        for k, label in enumerate(labels):
            if label in out["per_class_ap"]:
                values = precision[:, :, k]
                out["per_class_ap"][label] = float(values[values > -1].mean()) if (values > -1).any() else 0.0
    return out


def precision_recall(predictions: Sequence[Sequence[DetectedObject]], references: Sequence[Sequence[DetectedObject]],
                     ) -> Dict[str, tuple]:
    """COCO's interpolated precision at IoU 0.5 at recalls 0, 0.01, ..., 1, per label with reference boxes:
    {label: (recalls, precisions)}, a precision 0 where that recall is never reached."""
    evaluated = _coco_evaluation(predictions, references)
    if evaluated is None:
        return {}
    evaluation, labels = evaluated
    recalls = np.asarray(evaluation.params.recThrs)
    wanted = {o.label for r in references for o in r}
    return {label: (recalls, np.maximum(evaluation.eval["precision"][0, :, k, 0, -1], 0.0))
            for k, label in enumerate(labels) if label in wanted}


def mask_scores(predictions: Sequence[Sequence[DetectedObject]],
                references: Sequence[Sequence[DetectedObject]]) -> Dict[str, object]:
    """Mask IoU per class, the intersections over the unions of the set (per image, the union of the class's masks),
    for the classes with reference masks; "mask_iou" is their mean. Objects need their masks decoded."""
    inter, union = Counter(), Counter()
    for predicted, reference in zip(predictions, references):
        reference = [o for o in reference if o.mask is not None]
        for label in {o.label for o in reference}:
            ref = np.any([o.mask for o in reference if o.label == label], axis=0)
            pred = [o.mask for o in predicted if o.label == label and o.mask is not None]
            pred = np.any(pred, axis=0) if pred else np.zeros_like(ref)
            inter[label] += int((pred & ref).sum())
            union[label] += int((pred | ref).sum())
    per_class = {label: inter[label] / union[label] if union[label] else 0.0 for label in sorted(union)}
    return {"mask_iou": float(np.mean(list(per_class.values()))) if per_class else 0.0, "per_class": per_class}
