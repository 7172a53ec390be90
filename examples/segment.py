"""Segment an object in a photo with PaliGemma, print it as JSON (mask as RLE) and draw it.

    python examples/segment.py --model google/paligemma2-3b-mix-448
    python examples/segment.py --model M --image examples/images/astronaut.jpg --objects person \
        --mask-decoder vae-oid.npz

The model answers `segment cat` with a box and 16 `<segNNN>` codes per object; Google's VQ-VAE decoder
(vae-oid.npz, fetched once from big_vision's bucket into ~/.cache/mlx_paligemma unless --mask-decoder is given)
turns the codes into a 64x64 mask that is pasted into the box.
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
from mlx_paligemma.formats.mask_decoder import fetch_vae_oid, load_mask_decoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or folder of a mix (or segmentation fine-tuned) checkpoint")
    p.add_argument("--image", default=str(Path(__file__).resolve().parent / "images" / "chelsea.jpg"),
                   help="path or URL")
    p.add_argument("--objects", default="cat", help='what to segment; several separated by " ; "')
    # --mask-decoder as on generate, batch and the server (and as the mask decoder's messages name it).
    p.add_argument("--mask-decoder", "--vae", dest="mask_decoder", default=None,
                   help="vae-oid.npz or its safetensors copy; none: big_vision's, downloaded once and cached")
    p.add_argument("--output", "--out", dest="out", default="segmentation.png", help="the drawing")
    args = p.parse_args()

    image = to_rgb(mp.load_image(args.image))
    decoder = load_mask_decoder(args.mask_decoder or fetch_vae_oid())
    model, processor = mp.load(args.model)
    # 4 box tokens + 16 mask codes + a label and separator per object.
    result = mp.generate(model, processor, images=image, prompt=f"segment {args.objects}", max_tokens=128,
                         mask_decoder=decoder)
    print(f"answer: {result.text!r}", file=sys.stderr)
    objects = result.objects
    print(json.dumps(objects_to_json(objects)))
    draw_detections(image, objects).save(args.out)
    print(f"{len(objects)} object(s) drawn on {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
