"""Boxes and masks out of PaliGemma's answers to `detect ...` and `segment ...`: as objects, as JSON, as a picture.
The answer format itself is processing/answer_format.py.

An object's `score`, when the answer's tokens come with their log-probabilities, is the mean probability of the
tokens that make its box (the four location tokens) and its label: how sure the model was of where and of what.
The mask codes do not count (a box's confidence should not change with whether it was asked for a mask).
"""

import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import defaults
from ..models.mask_decoder import MaskDecoder, paste_mask, pixel_box
from ..processing.answer_format import _OBJECT, LOC_BINS, MASK_CODES, SEG_CODES
from ..errors import InputError

_SEG = re.compile(r"<seg(\d{3})>")
# Sasha Trubetskoy's "distinct colours", one per label in order of appearance.
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]



@dataclass
class DetectedObject:
    label: str
    box: Tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image
    mask: Optional[np.ndarray] = None  # bool, (height, width) of the original image
    codes: Optional[Tuple[int, ...]] = None  # the 16 mask codes of a `segment` answer, to decode with add_masks
    score: Optional[float] = None  # mean probability of its location and label tokens; None when not known


def token_ends(tokens: Sequence[int], decode: Callable[[List[int]], str]) -> List[int]:
    """Where each token's text ends in decode(tokens): for telling which tokens make which object."""
    return [len(decode(list(tokens[: i + 1]))) for i in range(len(tokens))]


def _mean_probability(spans: Sequence[Tuple[int, int]], ends: Sequence[int], logprobs: Sequence[float]) -> float:
    starts = [0] + list(ends[:-1])
    chosen = [lp for a, b, lp in zip(starts, ends, logprobs) if b > a and any(a < hi and b > lo for lo, hi in spans)]
    return float(np.mean(np.exp(chosen))) if chosen else 0.0


def parse_detections(text: str, image_size: Tuple[int, int], mask_decoder: Optional[MaskDecoder] = None,
                     ends: Optional[Sequence[int]] = None,
                     logprobs: Optional[Sequence[float]] = None) -> List[DetectedObject]:
    """The objects in a detect/segment answer about an image of `image_size` = (width, height).

    Boxes are clamped to the image. Pieces that do not make an object are skipped: a box cut short, a mask with other
    than 16 codes or a code above 127, a box of no area, a missing label. With a mask decoder, masks are decoded;
    without one, each segmented object keeps its codes for add_masks. With the answer's token_ends and the
    tokens' log-probabilities, each object gets its score.
    """
    width, height = image_size
    objects = []
    for m in _OBJECT.finditer(text):
        y0, x0, y1, x1 = (int(v) / LOC_BINS for v in m.group(1, 2, 3, 4))
        box = (min(x0 * width, width), min(y0 * height, height), min(x1 * width, width), min(y1 * height, height))
        codes = tuple(int(c) for c in _SEG.findall(m.group(5)))
        label = m.group(6).strip()
        if ((codes and (len(codes) != MASK_CODES or max(codes) >= SEG_CODES)) or box[2] <= box[0] or box[3] <= box[1]
                or not label):
            continue
        score = None
        if logprobs is not None and ends is not None:
            start = m.start(6) + len(m.group(6)) - len(m.group(6).lstrip())
            score = _mean_probability([(m.start(0), m.end(4) + 1), (start, start + len(label))], ends, logprobs)
        objects.append(DetectedObject(label, box, codes=codes or None, score=score))
    if mask_decoder is not None:
        add_masks(objects, mask_decoder, image_size)
    return objects


def add_masks(objects: Sequence[DetectedObject], mask_decoder: MaskDecoder,
              image_size: Tuple[int, int]) -> Sequence[DetectedObject]:
    """Sets the mask of each object that has codes, decoding all of them in one batch; returns `objects`."""
    todo = [o for o in objects if o.codes is not None]
    if todo:
        masks64 = np.array(mask_decoder(mx.array([o.codes for o in todo], dtype=mx.int32)))
        for o, m64 in zip(todo, masks64):
            o.mask = paste_mask(m64, o.box, image_size)
    return objects


def check_min_score(min_score) -> float:
    """--min-score / min_score: a probability, 0 (the default) keeps every object."""
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 1:
        raise InputError(f"min_score must be a number in [0, 1], got {min_score!r}")
    return float(min_score)


def keep_confident(objects: Sequence[DetectedObject], min_score: float) -> List[DetectedObject]:
    """The objects scoring at least min_score; those without a score (no log-probabilities given) stay."""
    return [o for o in objects if o.score is None or o.score >= min_score]


class ObjectReader:
    """The objects of detect/segment answers, scored and masks included: the one reading every surface (generate,
    batch, the server, evaluation) uses. Given the answer's tokens and their log-probabilities (and `decode`, the
    tokenizer's), each object gets its score, and those below min_score are dropped before any mask is decoded.
    Masks come from `decoder` (a loaded MaskDecoder), or from `path` (or, with fetch=True, big_vision's vae-oid.npz
    fetched once) loaded at the first answer that has mask codes, so detect runs never need it; without any of them
    a segmented object keeps its codes and no mask."""

    def __init__(self, path: Optional[str] = None, decode: Optional[Callable[[List[int]], str]] = None,
                 min_score: float = defaults.MIN_SCORE, decoder: Optional[MaskDecoder] = None, fetch: bool = True):
        self.path, self.decoder, self.decode, self.min_score = path, decoder, decode, check_min_score(min_score)
        self.fetch = fetch

    def __call__(self, text: str, image_size: Tuple[int, int], tokens: Optional[Sequence[int]] = None,
                 logprobs: Optional[Sequence[float]] = None, min_score: Optional[float] = None) -> List[DetectedObject]:
        from ..formats.mask_decoder import fetch_vae_oid, load_mask_decoder

        scored = tokens is not None and logprobs is not None and self.decode is not None
        ends = token_ends(tokens, self.decode) if scored else None
        objects = keep_confident(parse_detections(text, image_size, None, ends, logprobs if scored else None),
                                 self.min_score if min_score is None else min_score)
        if any(o.codes is not None for o in objects):
            if self.decoder is None and (self.path or self.fetch):
                self.decoder = load_mask_decoder(self.path or fetch_vae_oid())
            if self.decoder is not None:
                add_masks(objects, self.decoder, image_size)
        return objects

    def read(self, answer, image_size: Tuple[int, int], min_score: Optional[float] = None) -> List[DetectedObject]:
        """The objects of an answer that has `text`, `tokens` and `logprobs` (a Result, a GenerationResult, one of
        their sequences)."""
        return self(answer.text, image_size, answer.tokens, answer.logprobs, min_score)


def _rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F")  # COCO runs go down the columns
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": [0] + counts if flat[0] else counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """The bool (height, width) mask of an uncompressed COCO RLE as objects_to_json writes it."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1  # runs alternate, background first
    flat = np.repeat(values, rle["counts"])
    return flat.reshape((width, height)).T  # column-major, as _rle ran over it


def objects_to_json(objects: Sequence[DetectedObject]) -> List[dict]:
    """JSON-ready dicts: `label`, `box` [x0, y0, x1, y1] in pixels, `score` when known, `codes` (the 16 mask codes) for segmented objects,
    and `mask` for decoded masks, as COCO's uncompressed RLE: {"size": [height, width], "counts": run lengths over
    the pixels in column-major order, starting with a run of background} (pycocotools reads it with frPyObjects)."""
    out = []
    for o in objects:
        d = {"label": o.label, "box": [round(float(v), 2) for v in o.box]}
        if o.score is not None:
            d["score"] = round(o.score, 6)
        if o.codes is not None:
            d["codes"] = list(o.codes)
        if o.mask is not None:
            d["mask"] = _rle(o.mask)
        out.append(d)
    return out


def _label_patch(text: str, colour, font) -> Image.Image:
    _, _, right, bottom = font.getbbox(text)
    patch = Image.new("RGB", (right + 4, bottom + 4), colour)
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ImageDraw.Draw(patch).text((2, 2), text, fill=(0, 0, 0) if luma > 140 else (255, 255, 255), font=font)
    return patch


def draw_detections(image: Image.Image, objects: Sequence[DetectedObject], mask_alpha: float = 0.45) -> Image.Image:
    """A copy of `image` with masks tinted and boxes outlined and labelled, one colour per label.

    Everything is drawn inside the boxes (the label in the top-left corner, cropped to the box), so pixels outside
    every box keep their values.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    colours = {}
    for o in objects:
        colours.setdefault(o.label, _PALETTE[len(colours) % len(_PALETTE)])
    for o in objects:
        if o.mask is not None:
            pixels[o.mask] = pixels[o.mask] * (1 - mask_alpha) + np.array(colours[o.label]) * mask_alpha
    canvas = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 200))
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 30)))
    for o in objects:
        x0, y0, x1, y1 = pixel_box(o.box)
        if x1 <= x0 or y1 <= y0:
            continue
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colours[o.label], width=line)
        patch = _label_patch(o.label, colours[o.label], font)
        canvas.paste(patch.crop((0, 0, min(patch.width, x1 - x0), min(patch.height, y1 - y0))), (x0, y0))
    return canvas
