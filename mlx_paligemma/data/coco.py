"""COCO detection / instance-segmentation annotations (instances_*.json) as `detect` items, in PaliGemma's format.

Each image with objects of the chosen classes gives one item per group of its classes: prefix `detect cat ; dog`
(the classes present in the image, in the file's category order, `classes_per_prompt` at a time; 0: all in one),
suffix `<locY0><locX0><locY1><locX1> cat ; ...` (answer_format.box_tokens), the objects of the prompt's classes in the
prompt's order, then in annotation order. Prompts name only classes that are in the image, so no answer is empty:
an image without objects of the chosen classes gives no item. Crowd regions (iscrowd 1) are left out, as COCO's own
evaluation ignores them. Masks are not used: a `segment` answer's <seg> codes come from the VQ-VAE's encoder, which
mlx_paligemma does not have (only the decoder and codebook of vae-oid.npz), so segmentation files give detection
items (said on stderr).

A bad annotation (unknown category or image, a box that is not four finite numbers or lies outside its image by
more than a pixel) is an error for its image's item, named by annotation id, and so is an image whose file is not
the size its entry declares (read from the file's header); a file that is not COCO JSON, a bad
image entry or category is one line for the whole file. Boxes within a pixel of the border are clamped to it.
"""

import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .items import Item, image_source
from ..processing.answer_format import SEPARATOR, box_tokens
from ..errors import InputError, cause, read_json_object
from ..limits import MAX_ANNOTATION_BYTES
from ..processing.images import image_size

BORDER = 1.0  # pixels a box may stick out of its image (COCO's float boxes round past the edge) before it is an error


def default_image_folder(file: Path) -> Path:
    """COCO's layout: annotations/instances_val2017.json beside val2017/; else the file's own folder."""
    if file.parent.name == "annotations" and file.stem.startswith("instances_"):
        beside = file.parent.parent / file.stem[len("instances_"):]
        if beside.is_dir():
            return beside
    return file.parent


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load(file: Path) -> dict:
    try:
        coco = read_json_object(file, MAX_ANNOTATION_BYTES)
    except InputError:
        raise
    except Exception as e:  # ValueError for an integer of more than 4300 digits, MemoryError, ...
        raise InputError(f"{file} is not valid JSON: {cause(e)}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise InputError(f"{file} is not a COCO annotation file: no {key!r} list")
    return coco


def _categories(file: Path, coco: dict, classes: Optional[Sequence[str]]) -> Dict[int, str]:
    """{category id: name} of the chosen classes (all by default), in the file's order."""
    names = {}
    for n, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or not is_whole(c.get("id")) or not isinstance(c.get("name"), str):
            raise InputError(f"{file}: category {n} must have a whole-number 'id' and a 'name'")
        name = c["name"].strip()
        if not name or ";" in name or "<" in name:  # they would end the label in an answer (detection's grammar)
            raise InputError(f"{file}: category {c['id']} has the name {c['name']!r}, which cannot be a label")
        names[c["id"]] = name
    if classes:
        unknown = [c for c in classes if c not in names.values()]
        if unknown:
            raise InputError(f"--classes: {', '.join(map(repr, unknown))} not among the {len(names)} categories of "
                             f"{file} ({', '.join(list(names.values())[:8])}{', ...' if len(names) > 8 else ''})")
        names = {k: v for k, v in names.items() if v in classes}
    return names


def _images(file: Path, coco: dict) -> Dict[int, dict]:
    images = {}
    for n, image in enumerate(coco["images"]):
        ok = isinstance(image, dict) and is_whole(image.get("id")) and isinstance(image.get("file_name"), str)
        if not ok or not all(is_whole(image.get(k)) and image[k] > 0 for k in ("width", "height")):
            raise InputError(f"{file}: image entry {n} must have a whole-number 'id', a 'file_name' and positive "
                             "whole 'width' and 'height'")
        images[image["id"]] = image
    return images


def _box(annotation: dict, image: dict):
    """(x0, y0, x1, y1) of a COCO [x, y, width, height] box, clamped to the image, or InputError saying why not."""
    box = annotation.get("bbox")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise InputError(f"'bbox' must be four finite numbers [x, y, width, height], got {str(box)[:80]}")
    x, y, w, h = box
    width, height = image["width"], image["height"]
    if w <= 0 or h <= 0:
        raise InputError(f"box {box} has no area")
    if x < -BORDER or y < -BORDER or x + w > width + BORDER or y + h > height + BORDER:
        raise InputError(f"box {box} lies outside the {width}x{height} image")
    return max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)


def check_size(path: str, image: dict) -> None:
    """The entry's width and height are the file's (read from its header): boxes are scaled by them, so a wrong
    size would give every box of the image wrong <loc> bins without a word. A file that cannot be read is left to
    the reader of the image, which names it."""
    try:
        size = image_size(path)
    except InputError:
        return
    if size != (image["width"], image["height"]):
        raise InputError(f"image {image['file_name']} is {size[0]}x{size[1]} pixels, but its entry declares "
                         f"{image['width']}x{image['height']}: its boxes would be scaled wrong")


def coco_items(file, image_folder=None, classes: Optional[Sequence[str]] = None,
               classes_per_prompt: int = 0) -> List[Item]:
    """Detect items of a COCO annotation file, images in `image_folder` (default: default_image_folder)."""
    file = Path(file)
    if classes_per_prompt < 0:
        raise InputError(f"--classes-per-prompt must be 0 (all) or more, got {classes_per_prompt}")
    coco = _load(file)
    folder = Path(image_folder) if image_folder is not None else default_image_folder(file)
    names, images = _categories(file, coco, classes), _images(file, coco)
    known = {c["id"] for c in coco["categories"]}
    objects: Dict[int, Dict[int, List[str]]] = {}  # image id -> category id -> the objects' tokens
    errors: Dict[int, str] = {}  # image id -> its first bad annotation
    masks = False
    for n, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict):
            raise InputError(f"{file}: annotation {n} is not an object")
        what = f"annotation {a.get('id', n)}"
        image = images.get(a.get("image_id")) if is_whole(a.get("image_id")) else None
        if image is None:
            raise InputError(f"{file}: {what} names image {str(a.get('image_id'))[:40]}, which is not among the images")
        if not is_whole(a.get("category_id")) or a["category_id"] not in known:
            errors.setdefault(image["id"], f"{what}: category {str(a.get('category_id'))[:40]} is not among the "
                                           "categories")
            continue
        if a.get("iscrowd") or a["category_id"] not in names:
            continue
        masks = masks or bool(a.get("segmentation"))
        try:
            box = _box(a, image)
        except InputError as e:
            errors.setdefault(image["id"], f"{what}: {e}")
            continue
        tokens = box_tokens(box, (image["width"], image["height"]))
        label = names[a["category_id"]]
        objects.setdefault(image["id"], {}).setdefault(a["category_id"], []).append(f"{tokens} {label}")
    items = []
    for image in images.values():
        present = [c for c in names if c in objects.get(image["id"], {})]
        if not present and image["id"] not in errors:
            continue
        step = classes_per_prompt or max(len(present), 1)
        for start in range(0, max(len(present), 1), step):
            group = present[start:start + step]
            prompt = "detect " + SEPARATOR.join(names[c] for c in group)
            suffix = SEPARATOR.join(o for c in group for o in objects[image["id"]][c])
            fields = {"id": len(items) + 1, "image": image["file_name"], "image_id": image["id"], "prompt": prompt,
                      "suffix": suffix}
            item = Item(len(items) + 1, fields, prompt=prompt, suffixes=[suffix],
                        where=f"{file}, image {image['id']} ({image['file_name']})")
            try:
                item.images = [image_source(image["file_name"], folder)]
                check_size(item.images[0], image)
            except InputError as e:
                item.error = str(e)
            item.error = errors.get(image["id"], item.error)
            items.append(item)
    note = f"{file}: {len(items)} detect examples from {len({i.fields['image_id'] for i in items})} images"
    if masks:
        note += ("; masks not used (segment answers' <seg> codes need the VQ-VAE encoder, which mlx_paligemma does "
                 "not have): boxes only")
    print(note, file=sys.stderr)
    return items
