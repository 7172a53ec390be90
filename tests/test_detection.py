"""Detection and segmentation: parsing answers, the mask decoder against a plain numpy reference, JSON and drawing."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_paligemma.tasks.detection import DetectedObject, add_masks, draw_detections, objects_to_json, parse_detections
from mlx_paligemma.formats.mask_decoder import fetch_vae_oid, load_mask_decoder, save_mask_decoder
from mlx_paligemma.models.mask_decoder import paste_mask

# The decoder's part of Google's vae-oid.npz: PyTorch names and layouts (Conv2d OIHW, ConvTranspose2d IOHW).
VAE_SHAPES = {"_vq_vae._embedding": (128, 512), "decoder.0.weight": (128, 512, 1, 1), "decoder.0.bias": (128,)}
for _block in (2, 3):
    for _i, _k in ((0, 3), (2, 3), (4, 1)):
        VAE_SHAPES[f"decoder.{_block}.net.{_i}.weight"] = (128, 128, _k, _k)
        VAE_SHAPES[f"decoder.{_block}.net.{_i}.bias"] = (128,)
for _n, (_in, _out) in zip((4, 6, 8, 10), ((128, 128), (128, 64), (64, 32), (32, 16))):
    VAE_SHAPES[f"decoder.{_n}.weight"] = (_in, _out, 4, 4)
    VAE_SHAPES[f"decoder.{_n}.bias"] = (_out,)
VAE_SHAPES.update({"decoder.12.weight": (1, 16, 1, 1), "decoder.12.bias": (1,)})

SEG16 = "".join(f"<seg{c:03d}>" for c in (5, 17, 127, 0, 64, 3, 99, 120, 8, 8, 42, 77, 1, 2, 110, 31))


# ---------------------------------------------------------------- the numpy reference decoder (PyTorch semantics)

def np_conv(x, w, b, pad):
    """Conv2d, stride 1: x (C, H, W), w (O, I, kh, kw)."""
    _, h, wd = x.shape
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = sum(np.einsum("oc,chw->ohw", w[:, :, i, j], xp[:, i:i + ho, j:j + wo]) for i in range(kh) for j in range(kw))
    return out + b[:, None, None]


def np_conv_transpose(x, w, b, stride=2, pad=1):
    """ConvTranspose2d by its definition: each input pixel scatters-adds its kernel-weighted copy, then crop `pad`."""
    _, h, wd = x.shape
    kh, kw = w.shape[2:]
    full = np.zeros((w.shape[1], (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for i in range(h):
        for j in range(wd):
            full[:, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum("c,cokl->okl", x[:, i, j], w)
    return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad] + b[:, None, None]


def reference_decode(p, codes):
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    x = p["_vq_vae._embedding"][np.asarray(codes)].reshape(4, 4, 512).transpose(2, 0, 1)  # 4x4 grid, row-major
    x = relu(np_conv(x, p["decoder.0.weight"], p["decoder.0.bias"], 0))
    for block in (2, 3):
        n = f"decoder.{block}.net"
        y = relu(np_conv(x, p[f"{n}.0.weight"], p[f"{n}.0.bias"], 1))
        y = relu(np_conv(y, p[f"{n}.2.weight"], p[f"{n}.2.bias"], 1))
        x = x + np_conv(y, p[f"{n}.4.weight"], p[f"{n}.4.bias"], 0)
    for n in (4, 6, 8, 10):
        x = relu(np_conv_transpose(x, p[f"decoder.{n}.weight"], p[f"decoder.{n}.bias"]))
    return np_conv(x, p["decoder.12.weight"], p["decoder.12.bias"], 0)[0]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """Random weights of the real shapes in an npz like Google's (plus an encoder weight the loader must ignore)."""
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in VAE_SHAPES.items():
        # He-style scales keep activations near unit size; a stride-2 transposed 4x4 kernel reaches 2x2 taps per input.
        transposed = name in {f"decoder.{n}.weight" for n in (4, 6, 8, 10)}
        fan_in = shape[0] * 4 if transposed else np.prod(shape[1:])
        params[name] = rng.standard_normal(shape) * (np.sqrt(2 / fan_in) if len(shape) == 4 else 0.1)
    params["_vq_vae._embedding"] = rng.standard_normal((128, 512))
    params = {k: v.astype(np.float32) for k, v in params.items()}
    folder = tmp_path_factory.mktemp("vae")
    np.savez(folder / "vae-oid.npz", **params, **{"encoder.0.weight": np.zeros((16, 1, 3, 3), np.float32)})
    return params, folder


def test_decoder_matches_numpy_reference_from_npz_and_safetensors(vae):
    params, folder = vae
    codes = [[5, 17, 127, 0, 64, 3, 99, 120, 8, 8, 42, 77, 1, 2, 110, 31], list(range(0, 128, 8))]
    expected = np.stack([reference_decode({k: v.astype(np.float64) for k, v in params.items()}, c) for c in codes])
    assert expected.shape == (2, 64, 64) and expected.std() > 0.1  # weights that give a non-trivial output

    from_npz = load_mask_decoder(folder / "vae-oid.npz")
    save_mask_decoder(from_npz, folder / "vae-oid.safetensors")
    mx.save_safetensors(str(folder / "torch-names.safetensors"), {k: mx.array(v) for k, v in params.items()})
    for path in ("vae-oid.npz", "vae-oid.safetensors", "torch-names.safetensors"):
        decoder = load_mask_decoder(folder / path)
        got = np.array(decoder(mx.array(codes, dtype=mx.int32)))
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-4, err_msg=path)
        np.testing.assert_allclose(decoder.decode(codes[0]), got[0], atol=1e-5)  # one code alone vs a batch: rounding


def test_loader_rejects_wrong_shapes(vae, tmp_path):
    params, _ = vae
    bad = dict(params, **{"decoder.6.weight": params["decoder.6.weight"].transpose(1, 0, 2, 3)})  # OIHW, not IOHW
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError):
        load_mask_decoder(tmp_path / "bad.npz")


def test_fetch_uses_the_cached_copy(tmp_path):
    (tmp_path / "vae-oid.npz").write_bytes(b"cached")  # present, so nothing is downloaded
    assert fetch_vae_oid(tmp_path) == tmp_path / "vae-oid.npz"


def big_vision_paste(m64, rows, columns, height, width):
    """big_vision's segmentation evaluator, written out: the 64x64 decoder output (float) resized to the box's
    pixel size with PIL's bilinear filter, thresholded at 0, placed at the box in an empty image-sized mask."""
    (y0, y1), (x0, x1) = rows, columns
    inside = np.asarray(Image.fromarray(np.float32(m64)).resize([x1 - x0, y1 - y0], resample=Image.BILINEAR)) > 0.0
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def test_segmentation_with_decoder(vae):
    params, folder = vae
    decoder = load_mask_decoder(folder / "vae-oid.npz")
    width, height = 300, 200
    other = "".join(f"<seg{c:03d}>" for c in range(0, 128, 8))
    text = (f"<loc0256><loc0512><loc0768><loc1000>{SEG16} cat ; <loc0000><loc0000><loc0100><loc0100> dog ; "
            f"<loc0101><loc0003><loc1023><loc0517>{other} cup")
    cat, dog, cup = parse_detections(text, (width, height), mask_decoder=decoder)
    assert dog.mask is None and dog.codes is None
    reference = {k: v.astype(np.float64) for k, v in params.items()}
    # The boxes' pixel rows and columns straight from the tokens: int(loc / 1024 * size), as big_vision truncates.
    for obj, (y0, x0, y1, x1) in ((cat, (256, 512, 768, 1000)), (cup, (101, 3, 1023, 517))):
        rows = int(y0 / 1024 * height), int(y1 / 1024 * height)
        columns = int(x0 / 1024 * width), int(x1 / 1024 * width)
        assert obj.mask.shape == (height, width) and obj.mask.dtype == bool
        expected = big_vision_paste(reference_decode(reference, obj.codes), rows, columns, height, width)
        inside = expected[rows[0]:rows[1], columns[0]:columns[1]]
        assert inside.any() and not inside.all(), "a mask with both sides in the box"
        np.testing.assert_array_equal(obj.mask, expected, err_msg=obj.label)
    assert (rows, columns) == ((19, 199), (0, 151))  # the cup's box, by hand: 101/1024*200 = 19.7, ...


# ---------------------------------------------------------------- parsing

def test_detection_boxes_on_a_non_square_image():
    [obj] = parse_detections("<loc0256><loc0128><loc0768><loc0896> cat", (640, 480))
    assert obj.label == "cat" and obj.mask is None and obj.codes is None
    # y: 256/1024*480 = 120, 768/1024*480 = 360; x: 128/1024*640 = 80, 896/1024*640 = 560
    assert obj.box == pytest.approx((80, 120, 560, 360))


def test_several_objects_and_repeated_labels():
    text = ("<loc0000><loc0000><loc0512><loc0512> cat ; <loc0512><loc0512><loc1023><loc1023> cat ; "
            "<loc0100><loc0200><loc0300><loc0400> hot dog")
    objs = parse_detections(text, (1000, 500))
    assert [o.label for o in objs] == ["cat", "cat", "hot dog"]
    assert objs[0].box == pytest.approx((0, 0, 500, 250))
    assert objs[1].box == pytest.approx((500, 250, 999.0234375, 499.51171875))
    assert objs[2].box == pytest.approx((195.3125, 48.828125, 390.625, 146.484375))


def test_partial_output_keeps_the_complete_objects():
    good = "<loc0100><loc0200><loc0300><loc0400> cat"
    for tail in (" ; <loc0010><loc00", " ; <loc0010><loc0020><loc0030><loc0040>", " ; <loc0010><loc0020><loc0030>",
                 " ; <loc0010><loc0020><loc0030><loc0040><seg001><seg002><seg0", " ; "):
        assert [o.label for o in parse_detections(good + tail, (100, 100))] == ["cat"], tail


def test_segmentation_without_decoder_keeps_codes():
    [obj] = parse_detections(f"<loc0000><loc0000><loc0512><loc1023>{SEG16} cat", (200, 100))
    assert obj.codes == (5, 17, 127, 0, 64, 3, 99, 120, 8, 8, 42, 77, 1, 2, 110, 31) and obj.mask is None
    assert obj.box == pytest.approx((0, 0, 1023 / 1024 * 200, 50))


def test_malformed_pieces_are_skipped():
    seg15 = "".join(f"<seg{i:03d}>" for i in range(15))
    cases = {
        "": [], "no boxes here": [], "<loc12><loc0001> cat": [], "<eos>": [],
        "<loc0500><loc0500><loc0400><loc0600> inverted": [],  # y_max < y_min
        "<loc0500><loc0500><loc0500><loc0600> flat": [],  # no height
        f"<loc0000><loc0000><loc0500><loc0500>{seg15} short mask": [],
        f"<loc0000><loc0000><loc0500><loc0500>{SEG16.replace('<seg127>', '<seg200>')} bad code": [],
        "<loc0000><loc0000><loc0500><loc0500> ; dog": [],  # no label
        "garbage <loc0001 ; <loc0000><loc0000><loc0500><loc0500> dog ; ;;": ["dog"],
    }
    for text, labels in cases.items():
        assert [o.label for o in parse_detections(text, (64, 48))] == labels, text


def test_boxes_are_clamped_to_the_image():
    [obj] = parse_detections("<loc0100><loc0000><loc2048><loc9999> big", (320, 240))
    assert obj.box == pytest.approx((0, 100 / 1024 * 240, 320, 240))


def test_never_crashes_on_garbage():
    pieces = ["<loc0123>", "<loc1023>", "<loc", "0999>", "<seg005>", "<seg127>", "<seg999>", "<seg", " ; ", ";",
              "cat", " ", "<", ">", "\n", "é🐈", "<eos>", "\x00"]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for o in parse_detections(text, (37, 91)):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 37 and 0 <= y0 < y1 <= 91 and o.label


# ---------------------------------------------------------------- masks, JSON, drawing

def test_paste_mask_fills_the_box():
    m64 = np.where(np.arange(64) < 32, 1.0, -1.0)[None, :].repeat(64, 0).astype(np.float32)  # left half inside
    mask = paste_mask(m64, (10.7, 20.2, 50.9, 60.0), (100, 80))
    assert mask.shape == (80, 100)
    assert mask[20:60, 10:29].all() and not mask[20:60, 31:50].any()
    outside = np.ones_like(mask)
    outside[20:60, 10:50] = False
    assert not mask[outside].any()


def test_json_round_trip():
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:5] = True
    objs = [DetectedObject("cat", (2.0, 1.0, 5.0, 4.0), mask=mask, codes=tuple(range(16))),
            DetectedObject("dog", (0.123, 0.0, 7.987, 5.5))]
    data = json.loads(json.dumps(objects_to_json(objs)))
    assert data[1] == {"label": "dog", "box": [0.12, 0.0, 7.99, 5.5]}
    assert data[0]["codes"] == list(range(16)) and data[0]["mask"]["size"] == [6, 8]
    counts = data[0]["mask"]["counts"]
    flat = np.concatenate([np.full(n, i % 2, bool) for i, n in enumerate(counts)])
    np.testing.assert_array_equal(flat.reshape(8, 6).T, mask)  # column-major runs, background first
    full = objects_to_json([DetectedObject("all", (0, 0, 8, 6), mask=np.ones((6, 8), bool))])[0]["mask"]
    assert full["counts"] == [0, 48]


def test_add_masks_decodes_later(vae):
    _, folder = vae
    objs = parse_detections(f"<loc0000><loc0000><loc0512><loc0512>{SEG16} cat", (64, 64))
    add_masks(objs, load_mask_decoder(folder / "vae-oid.npz"), (64, 64))
    assert objs[0].mask.shape == (64, 64) and not objs[0].mask[32:, :].any()


def test_drawing_changes_pixels_inside_the_box_only():
    image = Image.new("RGB", (160, 100), (90, 120, 150))
    original = np.asarray(image)
    mask = np.zeros((100, 160), bool)
    mask[30:80, 20:100] = True
    drawn = draw_detections(image, [DetectedObject("cat", (20.0, 30.0, 100.0, 80.0), mask=mask)])
    assert drawn.size == image.size and np.array_equal(np.asarray(image), original)  # the input is left alone
    changed = (np.asarray(drawn) != original).any(-1)
    assert changed[30:80, 20:100].all()
    changed[30:80, 20:100] = False
    assert not changed.any()


def test_drawing_boxes_without_masks_and_colours_per_label():
    image = Image.new("RGB", (200, 120), (255, 255, 255))
    objs = [DetectedObject("a long label that does not fit", (10.0, 10.0, 60.0, 40.0)),
            DetectedObject("dog", (100.0, 50.0, 190.0, 110.0)), DetectedObject("dog", (70.0, 60.0, 90.0, 100.0))]
    drawn = np.asarray(draw_detections(image, objs))
    changed = (drawn != 255).any(-1)
    inside = np.zeros_like(changed)
    for x0, y0, x1, y1 in ((10, 10, 60, 40), (100, 50, 190, 110), (70, 60, 90, 100)):
        inside[y0:y1, x0:x1] = True
        assert changed[y1 - 1, x0:x1].all()  # bottom edge of the outline
    assert not changed[~inside].any()
    assert not np.array_equal(drawn[39, 30], drawn[109, 150])  # different labels, different colours
    assert np.array_equal(drawn[109, 150], drawn[99, 80])  # same label, same colour


def test_batch_generate_loads_the_mask_decoder_once_per_call(vae, monkeypatch):
    import mlx_paligemma as mp
    from conftest import FIXTURES
    from mlx_paligemma.formats import mask_decoder as module

    _, folder = vae
    real, loads = module.load_mask_decoder, []
    monkeypatch.setattr(module, "load_mask_decoder", lambda path: loads.append(path) or real(path))
    model, processor = mp.load(str(FIXTURES / "paligemma-tiny"))
    image = str(FIXTURES / "images" / "chelsea.jpg")
    out = mp.batch_generate(model, processor, [image] * 3, ["segment cat", "segment cat ; dog", "caption en"],
                            max_tokens=40, constrain=True, mask_decoder=str(folder / "vae-oid.npz"))
    masked = [o for r in out.results[:2] for o in r.objects if o.mask is not None]
    assert len(masked) >= 2 and loads == [str(folder / "vae-oid.npz")]
