"""PaliGemma's detect/segment answer format, the one place it is stated: the prompts whose answers are objects, and
the tokens of an object. The grammar of structured output, the parser of answers and the COCO writer take it from
here.

An answer lists objects separated by " ; ", each `<locA><locB><locC><locD>` (y_min, x_min, y_max, x_max as bins
0..1023 of the image's height and width), for `segment` followed by 16 `<segNNN>` mask codes, then the label.
"""

import re
from typing import Tuple

from .processor import IMAGE_TOKEN


# The answer format, the one place it is stated (constraints' grammar and coco's writer take it from here).
LOC_BINS = 1024  # <loc0000>..<loc1023>: a coordinate's bin


SEG_CODES = 128  # <seg000>..<seg127>: the mask decoder's codebook


MASK_CODES = 16  # <seg> codes of one mask


SEPARATOR = " ; "  # between objects, and between the classes of a detect prompt


# Seg tokens are matched in any number so that a mask cut short is seen (and the object dropped), not taken for a label.
_OBJECT = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>\s*((?:<seg\d{3}>\s*)*)([^;<]*)")


def box_tokens(box: Tuple[float, float, float, float], image_size: Tuple[int, int]) -> str:
    """`<locY0><locX0><locY1><locX1>` for `box` = (x0, y0, x1, y1) in pixels of an image of `image_size` = (width,
    height), as big_vision writes PaliGemma's training targets (pp/proj/paligemma: round(v / side * 1023), clipped
    to 0..1023; round half to even, as tf.round). parse_detections reads a bin back as b / 1024 of the side (the
    published demos' rule), so a written box parses back within 1.5 bins."""
    width, height = image_size

    def bin_of(value: float, side: int) -> int:
        return min(max(round(value / side * (LOC_BINS - 1)), 0), LOC_BINS - 1)

    x0, y0, x1, y1 = box
    return "".join(f"<loc{bin_of(v, side):04d}>" for v, side in ((y0, height), (x0, width), (y1, height), (x1, width)))


def has_objects(prompt: str) -> bool:
    """The one rule for which answers are boxes and masks: those to a detect or segment prompt (after any
    <image> markers); other answers are text only."""
    return prompt.split(IMAGE_TOKEN)[-1].lstrip().startswith(("detect ", "segment "))
