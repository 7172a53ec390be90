"""evaluate --report DIR: the page in headless Chromium (tests/browser.py) loads with no console error and no failed
request, shows every question with its image and its boxes, worst first, data as text; and a folder that is not an
earlier report is never written into.

Expected counts come from the predictions file (--predictions) read back through detection.parse_detections, the
parser the metrics use, not from the report. One evaluation runs the tiny checkpoint as it is (its answers are
noise); another replaces its answers by chosen ones, whose scores are known by hand."""

import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

import mlx_paligemma as mp
from browser import Browser
from conftest import FIXTURES
from mlx_paligemma import evaluate
from mlx_paligemma.tasks import evaluation as evaluation_module
from mlx_paligemma.tasks import report
from mlx_paligemma.tasks.detection import parse_detections

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(FIXTURES / "paligemma2-tiny")
SCREENSHOT = os.environ.get("MLX_PALIGEMMA_REPORT_SCREENSHOT")  # where to keep the page's picture (docs/images)
SCRIPT = "<script>document.title = 'pwned'</script>"
CAT = "<loc0064><loc0400><loc0860><loc0900>"
CUP = "<loc0100><loc0200><loc0700><loc0800>"
SAUCER = "<loc0300><loc0100><loc0900><loc0950>"
ROWS = [  # two detections (three reference boxes), three captions (one with two references)
    {"image": "chelsea.jpg", "prefix": "detect cat", "suffix": f"{CAT} cat"},
    {"image": "coffee.jpg", "prefix": "detect cup ; saucer", "suffix": f"{CUP} cup ; {SAUCER} saucer"},
    {"image": "chelsea.jpg", "prefix": "caption en", "suffix": [f"a tabby cat {SCRIPT}", "a cat looking up"]},
    {"image": "coffee.jpg", "prefix": "caption en", "suffix": "a cup of coffee on a saucer"},
    {"image": "rocket.jpg", "prefix": "caption en", "suffix": "a rocket on its launch pad"},
]
# Chosen answers: the cat's box exactly (image AP 1); the cup's box and a dog where the saucer is (AP of cup 1,
# saucer 0: 0.5); a caption equal to a reference; two others.
ANSWERS = {("chelsea.jpg", "detect cat"): f"{CAT} cat",
           ("coffee.jpg", "detect cup ; saucer"): f"{CUP} cup ; {SAUCER} dog",
           ("chelsea.jpg", "caption en"): "a cat looking up",
           ("coffee.jpg", "caption en"): "a cup of tea",
           ("rocket.jpg", "caption en"): "a dog on grass"}
SEGMENT = {"prefix": "segment cat", "suffix": CAT + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat"}
ANSWERS[("chelsea.jpg", "segment cat")] = CAT + "".join(f"<seg{100 + i:03d}>" for i in range(16)) + " cat"
LOGPROB = -0.2  # every chosen answer's tokens: each box scores exp(-0.2)


def evaluation(folder: Path, capsys, *options):
    """evaluate with --report and --predictions on ROWS over examples/images: (page, predictions, stdout)."""
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(ROOT / "examples" / "images" / name, folder / name)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "paligemma2-tiny").symlink_to(Path(MODEL).resolve())
    # Run from the folder with its own names, as a user would: the page (and its screenshot) shows them.
    here = os.getcwd()
    os.chdir(folder)
    try:
        rc = evaluate.main(["--model", "paligemma2-tiny", "--data", "test.jsonl", "--max-tokens", "12", "--report",
                            "report", "--predictions", "p.jsonl", *options])
    finally:
        os.chdir(here)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [json.loads(line) for line in (folder / "p.jsonl").open()]  # each question's answer by the one model
    return folder / "report" / "index.html", [{**p, **p["answers"]["base"]} for p in lines], captured.out


def chosen_answers(model, processor, questions, *args, **kwargs):
    """evaluation_module.generate_answers with ANSWERS for answers, their tokens each of log-probability LOGPROB."""
    out = []
    for q in questions:
        text = ANSWERS[(Path(q.image).name, q.prefix)]
        tokens = processor.tokenizer.encode(text)
        out.append(mp.Generation(text=text, tokens=tokens, logprobs=[LOGPROB] * len(tokens),
                                 top_logprobs=[[]] * len(tokens), finish_reason="stop"))
    return out


@pytest.fixture
def browser():
    b = Browser("about:blank")
    for domain in ("Runtime", "Log", "Network", "Page"):
        b.send(f"{domain}.enable")
    yield b
    b.close()


def open_page(browser, index: Path):
    browser.send("Page.navigate", url=index.as_uri())
    browser.wait("document.readyState === 'complete' && [...document.images].every((i) => i.complete)")


def problems(browser) -> list:
    """Console errors, uncaught exceptions, failed loads and errors Chromium logged (a CSP refusal among them)."""
    return [e for e in browser.events
            if (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
            or e["method"] in ("Runtime.exceptionThrown", "Network.loadingFailed")
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]


def objects(predictions: list, kind: str) -> int:
    """How many objects parse_detections finds in the predictions file's answers (kind: prediction, references)."""
    count = 0
    for p in predictions:
        if p["task"] in ("detect", "segment"):
            size = Image.open(ROOT / "examples" / "images" / p["image"]).size
            texts = [p["text"]] if kind == "prediction" else p["references"]
            count += sum(len(parse_detections(t, size)) for t in texts)
    return count


def check_page(browser, index: Path, predictions: list) -> list:
    """What every report shows, checked in the browser; returns the per-question scores in page order."""
    open_page(browser, index)
    assert problems(browser) == []
    assert browser.js("document.scripts.length") == 0
    assert browser.js("document.querySelectorAll('.example .picture img').length") == len(predictions)
    widths = browser.js("[...document.images].map((i) => i.naturalWidth)")
    assert len(widths) == len(predictions) + 4 and min(widths) > 0  # 4 plots: pr, box scores, 2 score histograms
    assert browser.js("[...document.querySelectorAll('.plots img')].map((i) => i.getAttribute('src'))") == [
        "pr-detect.png", "box-scores.png", "scores-caption.png", "scores-detect.png"]
    assert browser.js("document.querySelectorAll('svg rect.box.reference').length") == objects(predictions,
                                                                                                "references")
    assert browser.js("document.querySelectorAll('svg rect.box.prediction').length") == objects(predictions,
                                                                                                 "prediction")
    # The reference with a script in it is on the page as its text, and did not run.
    references = browser.js("[...document.querySelectorAll('pre.reference')].map((p) => p.textContent)")
    assert f"a tabby cat {SCRIPT}" in references
    assert browser.js("document.title") != "pwned"
    scores = browser.js("[...document.querySelectorAll('.example .score')].map((s) => s.textContent)")
    return [float(s.split()[-1]) for s in scores]


def test_report_of_the_tiny_model(tmp_path, capsys, browser):
    index, predictions, out = evaluation(tmp_path, capsys)
    assert f"report: {index}" in out
    scores = check_page(browser, index, predictions)
    assert scores == sorted(scores) and sorted(scores) == pytest.approx(sorted(p["score"] for p in predictions),
                                                                       abs=1e-4)
    if SCREENSHOT:
        browser.send("Emulation.setDeviceMetricsOverride", width=1100, height=1300, deviceScaleFactor=1,
                     mobile=False)
        picture = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")
        picture.quantize(colors=128).save(SCREENSHOT, optimize=True)


def test_report_of_chosen_answers_worst_first(tmp_path, capsys, browser, monkeypatch):
    monkeypatch.setattr(evaluation_module, "generate_answers", chosen_answers)
    index, predictions, out = evaluation(tmp_path, capsys)
    by_question = {(p["image"], p["prefix"]): p for p in predictions}
    assert by_question[("chelsea.jpg", "detect cat")]["score"] == pytest.approx(1.0)
    assert by_question[("coffee.jpg", "detect cup ; saucer")]["score"] == pytest.approx(0.5)
    scores = check_page(browser, index, predictions)
    assert objects(predictions, "prediction") == 3 and objects(predictions, "references") == 3
    assert scores == sorted(scores) and scores == pytest.approx(sorted(p["score"] for p in predictions), abs=1e-4)
    # Worst first: the rocket's "a dog on grass" shares no word with its reference but "a"; the detections follow
    # their hand-known scores.
    order = browser.js("[...document.querySelectorAll('.example pre.prompt')].map((p) => p.textContent)")
    assert order.index("detect cup ; saucer") < order.index("detect cat")
    labels = browser.js("[...document.querySelectorAll('svg text.label.prediction')].map((t) => t.textContent)")
    assert sorted(labels) == sorted(f"{name} {math.exp(LOGPROB):.2f}" for name in ("cat", "cup", "dog"))
    # The per-class table: the cup found (AP 1), the saucer not (0), the cat (1); the dog has no reference.
    rows = browser.js("[...document.querySelectorAll('table')].find((t) => t.textContent.includes('AP@'))"
                      ".innerText")
    assert [line.split("\t") for line in rows.strip().splitlines()[1:]] == [
        ["cat", "1.0000"], ["cup", "1.0000"], ["saucer", "0.0000"]]

    # Again into the same folder (an earlier report), two questions in full and the other three in the table.
    rc = evaluate.main(["--model", MODEL, "--data", str(tmp_path / "test.jsonl"), "--report",
                        str(tmp_path / "report"), "--report-examples", "2"])
    assert rc == 0, capsys.readouterr().err
    open_page(browser, index)
    assert browser.js("document.querySelectorAll('.example').length") == 2
    assert browser.js("document.querySelectorAll('table.rest tr').length") == 1 + 3
    assert SCRIPT in browser.js("document.body.textContent")
    assert not (tmp_path / "report" / "images" / "00002.jpg").exists()  # the earlier report's third image is gone
    assert problems(browser) == []


def test_report_draws_masks_over_the_image(tmp_path, capsys, browser, monkeypatch):
    import mlx.core as mx
    from mlx_paligemma.models.mask_decoder import MaskDecoder
    from mlx_paligemma.formats.mask_decoder import load_mask_decoder, save_mask_decoder

    mx.random.seed(0)
    save_mask_decoder(MaskDecoder(), tmp_path / "decoder.safetensors")  # random weights: some mask
    monkeypatch.setattr(evaluation_module, "generate_answers", chosen_answers)
    monkeypatch.setattr(sys.modules[__name__], "ROWS", [{"image": "chelsea.jpg", **SEGMENT}])
    index, predictions, _ = evaluation(tmp_path, capsys, "--mask-decoder", str(tmp_path / "decoder.safetensors"))
    open_page(browser, index)
    assert browser.js("document.querySelectorAll('svg image.mask.reference').length") == 1
    assert browser.js("document.querySelectorAll('svg image.mask.prediction').length") == 1
    assert browser.js("document.querySelectorAll('svg rect.box').length") == 2
    # The masks' PNGs load: each drawn once more into an Image, off the page.
    widths = browser.js("Promise.all([...document.querySelectorAll('svg image')].map((s) => new Promise((ok) => {"
                        "const i = new Image(); i.onload = () => ok(i.naturalWidth); i.onerror = () => ok(0);"
                        "i.src = s.getAttribute('href'); })))")
    assert len(widths) == 2 and min(widths) > 0
    assert problems(browser) == []
    assert "mask IoU" in browser.js("document.querySelector('.example .score').textContent")
    header = browser.js("[...document.querySelectorAll('th')].map((t) => t.textContent)")
    assert "AP@[.5:.95]" in header and "mask IoU" in header
    # The question's score is the IoU of the two masks, computed here from the decoder's masks.
    decoder = load_mask_decoder(tmp_path / "decoder.safetensors")
    size = Image.open(tmp_path / "chelsea.jpg").size
    (want,), (got,) = (parse_detections(t, size, decoder)
                       for t in (SEGMENT["suffix"], ANSWERS[("chelsea.jpg", "segment cat")]))
    iou = (want.mask & got.mask).sum() / (want.mask | got.mask).sum()
    assert 0 < iou < 1 and predictions[0]["score"] == pytest.approx(iou)


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["someone's folder", "a file", "a report with a file added", "negative count"])
def test_report_folder_that_is_not_ours_is_refused_before_work(tmp_path, capsys, case):
    data = tmp_path / "test.jsonl"
    shutil.copy(ROOT / "examples" / "images" / "chelsea.jpg", tmp_path / "chelsea.jpg")
    data.write_text(json.dumps(ROWS[0]) + "\n")
    target, options = tmp_path / "out", []
    if case == "a file":
        target.write_text("my notes\n")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("my notes\n")
        if case == "a report with a file added":
            (target / report.MARKER).write_text("index.html\n")
            (target / "index.html").write_text("<p>an earlier report</p>\n")
        if case == "negative count":
            options = ["--report-examples", "-1"]
            (target / "notes.txt").unlink()
    before = listing(tmp_path)
    rc = evaluate.main(["--model", "missing-model-never-loaded", "--data", str(data), "--report", str(target),
                        *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert {"someone's folder": f"error: --report {target}: the folder holds files and no earlier report; give a "
                                "new or empty folder",
            "a file": f"error: --report {target}: is a file, not a folder",
            "a report with a file added": f"error: --report {target}: holds 'notes.txt', which no report wrote; give "
                                          "a new or empty folder",
            "negative count": "error: --report-examples must be 0 or more, got -1"}[case] == err[0]
    assert listing(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(["chelsea.jpg", "test.jsonl",
                                                                                   "out"])


def test_without_matplotlib_one_line_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as when it is not installed
    with pytest.raises(mp.InputError) as e:
        report.check_folder(tmp_path / "new")
    assert str(e.value) == 'the report\'s plots need matplotlib: pip install -e ".[report]"'
    assert not (tmp_path / "new").exists()
