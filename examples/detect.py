"""Detect objects in a photo with PaliGemma, print them as JSON and draw them.

    python examples/detect.py --model google/paligemma2-3b-mix-224
    python examples/detect.py --model M --image examples/images/coffee.jpg --objects "cup ; saucer" --output coffee.png

The model answers `detect cat ; dog` with `<locY0><locX0><locY1><locX1> label` per object, separated by " ; ";
`generate` reads them into `.objects`, boxes in pixels of the photo.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_paligemma as mp  # noqa: E402
from mlx_paligemma.cli import DefaultsHelpFormatter, run_main  # noqa: E402
from mlx_paligemma.processing.images import to_rgb
from mlx_paligemma.tasks.detection import draw_detections, objects_to_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or folder of a mix (or detection fine-tuned) checkpoint")
    p.add_argument("--image", default=str(Path(__file__).resolve().parent / "images" / "chelsea.jpg"),
                   help="path or URL")
    p.add_argument("--objects", default="cat", help='what to find; several separated by " ; "')
    p.add_argument("--output", "--out", dest="out", default="detections.png", help="the drawing")
    args = p.parse_args()

    image = to_rgb(mp.load_image(args.image))
    model, processor = mp.load(args.model)
    result = mp.generate(model, processor, images=image, prompt=f"detect {args.objects}", max_tokens=64)
    print(f"answer: {result.text!r}", file=sys.stderr)
    objects = result.objects  # scored by their tokens' log-probabilities
    print(json.dumps(objects_to_json(objects), indent=2))
    draw_detections(image, objects).save(args.out)
    print(f"{len(objects)} object(s) drawn on {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
