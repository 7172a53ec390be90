"""The page at `/` in headless Chromium, driven over the Chrome DevTools protocol: pick an image, run a task, see the
answer stream in and the box (and mask) drawn. Also the objects of a segment answer through the API, with masks.

The tiny random checkpoint's answers are noise, so the server here runs a copy taught two answers (a few dozen
steps of full fine-tuning on the decoder layers: `detect cat` and `segment cat` on chelsea.jpg), and a mask decoder
with random weights. Chromium is required: without it these tests fail (CI installs Debian's `chromium`)."""

import base64
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma.tasks.detection import objects_to_json, parse_detections
from mlx_paligemma.formats.mlx import write_model_folder
from mlx_paligemma.models.mask_decoder import MaskDecoder
from mlx_paligemma.formats.mask_decoder import load_mask_decoder, save_mask_decoder
from mlx_paligemma.models.paligemma import suffix_loss
from browser import Browser
from test_server import Server, message

BASE = FIXTURES / "paligemma2-tiny"
IMAGE = FIXTURES / "images" / "chelsea.jpg"
BOX = "<loc0100><loc0200><loc0800><loc0900>"
SEG = "".join(f"<seg{i:03d}>" for i in (5, 17, 33, 2, 90, 101, 64, 12, 7, 77, 120, 3, 45, 88, 9, 31))
TAUGHT = {"detect cat": BOX + " cat", "segment cat": BOX + SEG + " cat"}
RED = [230, 25, 75]  # the first colour of the page's (and tasks/detection.py's) palette
SCREENSHOT = os.environ.get("MLX_PALIGEMMA_SCREENSHOT")  # where to keep the page's picture (examples/server-page.png)


def teach(out: Path) -> Path:
    """The tiny checkpoint taught TAUGHT, written as a model folder."""
    model, processor = mp.load(str(BASE))
    batch = processor(images=[[str(IMAGE)]] * len(TAUGHT), text=list(TAUGHT), suffix=list(TAUGHT.values()))
    features = model.encode_images(batch["pixel_values"])
    model.freeze()
    for layer in model.language_model.model.layers:
        layer.unfreeze()

    def loss(m):
        logits = m(batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"], image_features=features)
        return suffix_loss(logits, batch["labels"])

    step, optimizer = nn.value_and_grad(model, loss), optim.Adam(learning_rate=1e-2)
    for _ in range(40):
        _, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    for prompt, answer in TAUGHT.items():
        got = mp.generate(model, processor, str(IMAGE), prompt, max_tokens=30).text
        assert got == answer, f"teaching the tiny model failed: {prompt!r} -> {got!r}"
    write_model_folder(out, dict(tree_flatten(model.parameters())), json.loads((BASE / "config.json").read_text()),
                       BASE)
    return out


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taught")
    mx.random.seed(0)
    save_mask_decoder(MaskDecoder(), folder / "masks.safetensors")
    return teach(folder / "model"), folder / "masks.safetensors"


@pytest.fixture(scope="module")
def server(taught):
    model, masks = taught
    s = Server(model, "--mask-decoder", str(masks))
    yield s
    s.stop()


@pytest.fixture
def page(server):
    browser = Browser(server.url + "/", status="$('status').textContent")
    # Chromium starts on about:blank; the page is there once its script has run and asked /health for the model.
    browser.wait("typeof $ === 'function' && $('model').textContent !== ''")
    yield browser
    browser.close()


def run_task(page, task: str, query: str):
    page.js(f"$('task').value = {json.dumps(task)}; $('query').value = {json.dumps(query)};"
            "$('task').dispatchEvent(new Event('input'))")
    page.wait("!$('run').disabled")
    page.js("$('run').click()")
    return page.wait("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")


def canvas_pixel(page, x: int, y: int):
    return page.js(f"[...$('canvas').getContext('2d').getImageData({x}, {y}, 1, 1).data.slice(0, 3)]")


def test_page_streams_the_answer_and_draws_the_box(page):
    page.pick_file("#file", IMAGE)
    page.wait("$('drop').classList.contains('has-image')")
    assert run_task(page, "detect", "cat") == "done"
    assert page.js("$('answer').textContent") == TAUGHT["detect cat"]
    assert page.js("[...$('objects').children].map((li) => li.textContent)") == ["cat[88, 29, 396, 234]"]
    # The box [88.09, 29.3, 396.39, 234.38] is outlined in the label's colour: its left edge, halfway down.
    assert canvas_pixel(page, 89, 130) == RED
    assert canvas_pixel(page, 60, 130) != RED  # and outside it, the image
    assert "done (stop)" in page.js("$('status').textContent")


def test_page_draws_masks_of_a_segment_answer(page, server):
    page.pick_file("#file", IMAGE)
    page.wait("$('drop').classList.contains('has-image')")
    assert run_task(page, "segment", "cat") == "done"
    assert page.js("$('answer').textContent") == TAUGHT["segment cat"]
    assert page.js("$('objects').textContent").endswith("mask")
    assert canvas_pixel(page, 89, 130) == RED
    if SCREENSHOT:
        Path(SCREENSHOT).write_bytes(page.screenshot())


def test_page_takes_dropped_and_pasted_images_and_shows_errors(page):
    for event in ("new DragEvent('drop', {dataTransfer: dt, bubbles: true})",
                  "new ClipboardEvent('paste', {clipboardData: dt, bubbles: true})"):
        page.js("document.body.dataset.state = 'idle'; $('drop').classList.remove('has-image');")
        target = "$('drop')" if "Drag" in event else "document"
        page.js(f"""(async () => {{
            const blob = await (await fetch('data:image/png;base64,{base64.b64encode(
                (FIXTURES / "images" / "odd.png").read_bytes()).decode()}')).blob();
            const dt = new DataTransfer();
            dt.items.add(new File([blob], 'odd.png', {{type: 'image/png'}}));
            {target}.dispatchEvent({event});
        }})()""")
        page.wait("$('drop').classList.contains('has-image')")
    page.js("$('max-tokens').value = '5000'")
    assert run_task(page, "caption", "") == "error"
    assert "max_tokens is 5000, more than this server's limit of 1024" in page.js("$('status').textContent")


def test_segment_objects_through_the_api_carry_masks(server, taught):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model=str(taught[0]), messages=message("segment cat", str(IMAGE)),
                                       max_tokens=30)
    assert r.choices[0].message.content == TAUGHT["segment cat"]
    want = objects_to_json(parse_detections(TAUGHT["segment cat"], Image.open(IMAGE).size,
                                            mask_decoder=load_mask_decoder(taught[1])))
    # Scores as the server reads them from the tokens' log-probabilities (compared with the API's in
    # test_server_decoding); the boxes and masks as the reference decoder gives them.
    assert [{k: v for k, v in o.items() if k != "score"} for o in r.objects] == want and "mask" in want[0]
    assert all(0 < o["score"] <= 1 for o in r.objects)
