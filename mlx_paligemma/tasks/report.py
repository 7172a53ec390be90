"""An evaluation as a static HTML page: `python -m mlx_paligemma.evaluate ... --report DIR`.

DIR gets index.html, the images it shows (thumbnails of at most 512 pixels as JPEG, masks as PNG) and the plots
(matplotlib, the `report` extra). Nothing comes from the internet and the page runs no script: a content security
policy forbids both, and every text from the data (prompts, answers, references, file names) is escaped.

The page: the metric table and each detection task's per-class values; the plots (precision-recall per class at
IoU 0.5, the predicted boxes' scores, each task's per-question scores); then the questions worst first by their own
score (see evaluate.score_questions), the worst `shown` in full (the image with the reference boxes and masks drawn
dashed green and the predicted ones solid red, as SVG over the image, the prediction beside the references), the
others a line each in a table.

A folder is only written over when it holds nothing but a report written here earlier, at every depth (the marker
file lists every file and folder it wrote: formats.ownership), and never through a link; the new report is built
beside it and moved into place (formats.atomic.replaced_folder), so a failed, stopped or terminated run leaves the
old one and no temporary folder.
"""

import html
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from .detection import DetectedObject, rle_to_mask
from .metrics import precision_recall
from ..errors import InputError
from ..formats.atomic import check_folder_output, replaced_folder

MARKER = ".mlx-paligemma-report"
SHOWN = 100  # questions shown in full; the rest are a table row each
THUMBNAIL = 512
REFERENCE, PREDICTION = (26, 150, 65), (230, 25, 75)
SCORE_NAMES = {"caption": "CIDEr", "vqa": "VQA accuracy", "ocr": "ANLS", "detect": "box mAP", "segment": "box mAP",
               "choice": "accuracy", "match": "exact match"}
PER_CLASS = {"per_class_ap": "AP@[.5:.95]", "per_class": "mask IoU"}
# {ref} and {pred}: REFERENCE and PREDICTION, filled in by _Page.html.
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.tables { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
.plots img { width: 24%; margin-right: 0.5%; border: 1px solid #eee; }
.example { display: flex; gap: 1.2em; border-top: 1px solid #ddd; padding: 0.8em 0; }
.picture { position: relative; flex: 0 0 auto; width: 384px; line-height: 0; }
.picture img { width: 100%; display: block; }
.picture svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; overflow: visible; }
.box { fill: none; stroke-width: 2; vector-effect: non-scaling-stroke; }
.box.reference { stroke: rgb{ref}; stroke-dasharray: 6 3; }
.box.prediction { stroke: rgb{pred}; }
.label { paint-order: stroke; stroke: white; stroke-width: 3; vector-effect: non-scaling-stroke; }
.label.reference { fill: rgb{ref}; }
.label.prediction { fill: rgb{pred}; }
.text { flex: 1 1 auto; min-width: 0; }
.text pre { white-space: pre-wrap; word-break: break-word; margin: 0.2em 0 0.6em; background: #f6f6f6; padding: 4px; }
.score { font-weight: bold; }
.legend .reference { color: rgb{ref}; } .legend .prediction { color: rgb{pred}; }
"""


def _new_figure():
    """A matplotlib Figure on the Agg canvas: no pyplot, so no global backend or GUI is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError('the report\'s plots need matplotlib: pip install -e ".[report]"') from None
    figure = Figure(figsize=(4.4, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def check_folder(folder, shown: int = SHOWN) -> Path:
    """`folder` as a Path if a report may be written there (new, empty, or an earlier report; not a link), else
    InputError; and matplotlib present. Called before an evaluation so that it does not run for nothing."""
    if shown < 0:
        raise InputError(f"--report-examples must be 0 or more, got {shown}")
    _new_figure()
    check_folder_output(Path(folder), MARKER, f"--report {folder}", "report")
    return Path(folder)


def write_report(folder, results: dict, records: Sequence[dict], examples: Sequence, shown: int = SHOWN) -> Path:
    """Write the page of evaluate_examples' (results, records) into `folder`; `examples` are what was evaluated
    (their images are what the page shows). Returns the path of index.html."""
    path = check_folder(folder, shown)
    with replaced_folder(path, MARKER, f"--report {folder}", "report") as build:
        images = {e.source or e.image: e.image for e in examples if isinstance(e.source or e.image, str)}
        page = _Page(build, results, records, images)
        (build / "index.html").write_text(page.html(shown), encoding="utf-8")
    return Path(os.path.abspath(path)) / "index.html"


def _text(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else _text(value)


# Where an evaluation record (tasks/evaluation.py) keeps the answer's objects and the references'.
OBJECTS = {"prediction": "objects", "references": "reference_objects"}


def _objects(record: dict, kind: str) -> List[DetectedObject]:
    return [DetectedObject(o["label"], tuple(o["box"]), score=o.get("score"))
            for o in record.get(OBJECTS[kind], [])]


class _Page:
    def __init__(self, folder: Path, results: dict, records: Sequence[dict], images: Dict[str, object]):
        self.folder, self.results, self.records, self.images = folder, results, list(records), images
        self.thumbnails: Dict[str, tuple] = {}  # source -> (file, original width, height, its size)
        self.masks = 0

    def html(self, shown: int) -> str:
        order = sorted(range(len(self.records)), key=lambda i: (self.records[i]["score"], i))
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                 "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self'; "
                 "style-src 'unsafe-inline'\">",
                 f"<title>{_text('Evaluation of ' + str(self.results.get('model', 'a model')))}</title>",
                 f"<style>{STYLE.replace('{ref}', str(REFERENCE)).replace('{pred}', str(PREDICTION))}</style>",
                 "</head><body>", self.summary(), self.plots(),
                 f"<h2>Questions, worst first ({len(self.records)})</h2>",
                 '<p class="legend">Boxes and masks: <span class="reference">reference dashed green</span>, '
                 '<span class="prediction">prediction solid red</span> (with its score).</p>']
        parts += [self.example(rank, self.records[i]) for rank, i in enumerate(order[:shown], 1)]
        if len(order) > shown:
            parts.append(self.rest(order, shown))
        return "\n".join(parts + ["</body></html>"]) + "\n"

    def summary(self) -> str:
        r = self.results
        out = [f"<h1>{_text(r.get('model', 'Evaluation'))}</h1><p>"]
        for key in ("adapter_path", "data", "seconds"):
            if r.get(key) is not None:
                out.append(f"{_text(key)}: {_text(r[key])}<br>")
        out.append(f"score ({_text(r['metric'])}): <b>{_number(r['score'])}</b></p>")
        out.append("<div class=tables><table><tr><th>task</th><th>questions</th><th>metric</th><th>value</th></tr>")
        per_class = []
        for task, values in r["tasks"].items():
            first = True
            for name, value in values.items():
                if name in ("questions", "note"):
                    continue
                if isinstance(value, dict):
                    per_class.append((task, name, value))
                    continue
                lead = f"<td>{_text(task)}</td><td class=n>{values['questions']}</td>" if first else "<td></td>" * 2
                out.append(f"<tr>{lead}<td>{_text(name)}</td><td class=n>{_number(value)}</td></tr>")
                first = False
            if "note" in values:
                out.append(f"<tr><td></td><td></td><td>note</td><td>{_text(values['note'])}</td></tr>")
        out.append("</table>")
        for task in dict.fromkeys(t for t, _, _ in per_class):
            columns = [(name, value) for t, name, value in per_class if t == task]
            labels = list(dict.fromkeys(label for _, value in columns for label in value))
            out.append(f"<table><tr><th>{_text(task)}: class</th>"
                       + "".join(f"<th>{_text(PER_CLASS.get(name, name))}</th>" for name, _ in columns) + "</tr>")
            for label in labels:
                out.append(f"<tr><td>{_text(label)}</td>" + "".join(
                    f"<td class=n>{_number(value[label]) if label in value else ''}</td>" for _, value in columns)
                    + "</tr>")
            out.append("</table>")
        return "\n".join(out + ["</div>"])

    def plots(self) -> str:
        shown = []

        def save(name: str, draw) -> None:
            import matplotlib

            # Labels come from the data: drawn as text, never read as math (`$\undefinedmacro{$` raised) or TeX.
            with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
                figure = _new_figure()
                draw(figure.add_subplot())
                figure.savefig(self.folder / name, format="png")
            shown.append(name)

        tasks = list(self.results["tasks"])
        for task in [t for t in tasks if t in ("detect", "segment")]:
            chosen = [r for r in self.records if r["task"] == task]
            curves = precision_recall([_objects(r, "prediction") for r in chosen],
                                      [_objects(r, "references") for r in chosen])

            def draw_curves(ax, curves=curves, task=task):
                for label, (recall, precision) in curves.items():
                    ax.plot(recall, precision, label=label)
                if curves:
                    ax.legend(fontsize="small")
                else:
                    ax.text(0.5, 0.5, "no predicted or no reference boxes", ha="center", transform=ax.transAxes)
                ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="recall", ylabel="precision",
                       title=f"{task}: precision-recall at IoU 0.5")

            save(f"pr-{task}.png", draw_curves)
        if any(t in ("detect", "segment") for t in tasks):
            # A box without a score (a beam search's) is ranked as 1 by the metric: so it is counted here.
            scores = [1.0 if o.score is None else o.score for r in self.records for o in _objects(r, "prediction")]

            def draw_box_scores(ax):
                ax.hist(scores, bins=20, range=(0, 1), color=[c / 255 for c in PREDICTION])
                ax.set(xlabel="score (mean probability of the box's tokens)", ylabel="boxes",
                       title=f"predicted boxes' scores ({len(scores)})")

            save("box-scores.png", draw_box_scores)
        for task in tasks:
            values = [r["score"] for r in self.records if r["task"] == task]

            def draw_scores(ax, values=values, task=task):
                ax.hist(values, bins=20, range=(0, max(1.0, *values)), color="#4363d8")
                ax.set(xlabel=self.score_name(task), ylabel="questions", title=f"{task}: per-question score")

            save(f"scores-{task}.png", draw_scores)
        return "<h2>Plots</h2><div class=plots>" + "".join(
            f'<img src="{n}" alt="{n[:-4]}">' for n in shown) + "</div>"

    def score_name(self, task: str) -> str:
        if task == "segment" and "mask_iou" in self.results["tasks"].get("segment", {}):
            return "mask IoU"
        return SCORE_NAMES[task]

    def thumbnail(self, source: str) -> Optional[tuple]:
        if source not in self.thumbnails:
            image = self.images.get(source)
            if image is None:
                self.thumbnails[source] = None
            else:
                if isinstance(image, Image.Image):
                    size, small = image.size, image.convert("RGB")
                else:
                    with Image.open(image) as opened:
                        size, small = opened.size, opened.convert("RGB")
                small.thumbnail((THUMBNAIL, THUMBNAIL))
                (self.folder / "images").mkdir(exist_ok=True)
                name = f"images/{len(self.thumbnails):05d}.jpg"
                small.save(self.folder / name, format="JPEG", quality=85)
                self.thumbnails[source] = (name, *size, small.size)
        return self.thumbnails[source]

    def mask(self, rle: dict, colour: tuple, size: tuple) -> str:
        mask = Image.fromarray(rle_to_mask(rle)).resize(size, Image.Resampling.NEAREST)
        pixels = np.zeros((size[1], size[0], 4), np.uint8)
        pixels[np.asarray(mask)] = (*colour, 110)
        (self.folder / "masks").mkdir(exist_ok=True)
        name = f"masks/{self.masks:05d}.png"
        self.masks += 1
        Image.fromarray(pixels, "RGBA").save(self.folder / name)
        return name

    def drawing(self, record: dict, width: int, height: int, small: tuple) -> str:
        font = max(width, height) / 28
        out = [f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
               'xmlns="http://www.w3.org/2000/svg">']
        for kind, colour in (("references", REFERENCE), ("prediction", PREDICTION)):
            css = "reference" if kind == "references" else "prediction"
            for o in record.get(OBJECTS[kind], []):
                if "mask" in o:
                    out.append(f'<image class="mask {css}" href="{self.mask(o["mask"], colour, small)}" x="0" y="0" '
                               f'width="{width}" height="{height}" preserveAspectRatio="none"/>')
                x0, y0, x1, y1 = o["box"]
                out.append(f'<rect class="box {css}" x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}"/>')
                text = o["label"] + ("" if o.get("score") is None else f" {o['score']:.2f}")
                # Reference labels at the box's bottom, predictions' at its top: both stay readable on one box.
                y = y1 - font * 0.3 if kind == "references" else y0 + font
                out.append(f'<text class="label {css}" x="{x0 + font * 0.2}" y="{y}" font-size="{font:.1f}">'
                           f"{_text(text)}</text>")
        return "".join(out) + "</svg>"

    def example(self, rank: int, record: dict) -> str:
        picture = self.thumbnail(record["image"])
        if picture is None:
            figure = "<div class=picture>(image not available)</div>"
        else:
            name, width, height, small = picture
            figure = (f'<div class=picture><img src="{name}" alt="{_text(record["image"])}">'
                      f"{self.drawing(record, width, height, small)}</div>")
        rows = []
        for kind in ("prediction", "references"):
            for o in record.get(OBJECTS[kind], []):
                score = "" if o.get("score") is None else f"{o['score']:.3f}"
                rows.append(f"<tr><td>{'reference' if kind == 'references' else 'prediction'}</td>"
                            f"<td>{_text(o['label'])}</td><td class=n>{score}</td>"
                            f"<td>{_text(', '.join(f'{v:.0f}' for v in o['box']))}</td></tr>")
        objects = ("<table><tr><th></th><th>label</th><th>score</th><th>box x0, y0, x1, y1</th></tr>"
                   + "".join(rows) + "</table>") if rows else ""
        references = "".join(f"<pre class=reference>{_text(r)}</pre>" for r in record["references"])
        return (f'<div class=example id="q{rank}">{figure}<div class=text>'
                f"<div>#{rank} <b>{_text(record['task'])}</b> {_text(record['image'])} "
                f"<span class=score>{_text(self.score_name(record['task']))} {_number(record['score'])}</span></div>"
                f"<div>prompt</div><pre class=prompt>{_text(record['prefix'])}</pre>"
                f"<div>prediction</div><pre class=prediction>{_text(record['text'])}</pre>"
                f"<div>references ({len(record['references'])})</div>{references}{objects}</div></div>")

    def rest(self, order: Sequence[int], shown: int) -> str:
        out = [f"<h2>The other {len(order) - shown} questions</h2><table class=rest><tr><th>#</th><th>task</th>"
               "<th>score</th><th>image</th><th>prompt</th><th>prediction</th><th>first reference</th></tr>"]
        for rank, i in enumerate(order[shown:], shown + 1):
            r = self.records[i]
            out.append(f"<tr><td class=n>{rank}</td><td>{_text(r['task'])}</td><td class=n>{_number(r['score'])}"
                       f"</td><td>{_text(r['image'])}</td><td>{_text(r['prefix'])}</td>"
                       f"<td>{_text(r['text'])}</td><td>{_text(r['references'][0])}</td></tr>")
        return "\n".join(out + ["</table>"])
