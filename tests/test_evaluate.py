"""evaluate: tasks from prefixes, questions from lines, and the metrics of a tiny model taught (here) to answer."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma import evaluate
from mlx_paligemma.tasks import evaluation
from mlx_paligemma.training import trainer
from mlx_paligemma.data.items import Example, read_jsonl
from mlx_paligemma.errors import InputError

IMAGES = FIXTURES / "images"
BOXES = {"chelsea.jpg": ("<loc0064><loc0400><loc0860><loc0900>", "cat"),
         "coffee.jpg": ("<loc0100><loc0200><loc0700><loc0800>", "cup")}
CAPTIONS = {"chelsea.jpg": "a tabby cat looking up", "coffee.jpg": "a cup of coffee on a saucer",
            "odd.png": "a small picture of odd size"}


def rows(captions=CAPTIONS, shift=0):
    out = [{"image": image, "prefix": f"detect {label}",
            "suffix": box.replace("<loc0400>", f"<loc{400 + shift:04d}>").replace("<loc0200>", f"<loc{200 + shift:04d}>")
            + f" {label}"} for image, (box, label) in BOXES.items()]
    return out + [{"image": image, "prefix": "caption en", "suffix": caption} for image, caption in captions.items()]


def write(file, lines):
    file.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return file


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """The tiny PaliGemma 2 after full fine-tuning on two detection answers and three captions."""
    folder = tmp_path_factory.mktemp("taught")
    for image in {**BOXES, **CAPTIONS}:
        (folder / image).write_bytes((IMAGES / image).read_bytes())
    data = write(folder / "train.jsonl", rows())
    model, processor = mp.load(str(FIXTURES / "paligemma2-tiny"), dtype=mx.float32)
    config = trainer.set_trainable(model, "full")
    args = trainer.TrainingArgs(iters=40, batch_size=5, learning_rate=3e-3, steps_per_report=40,
                                adapter_path=str(folder / "adapters"))
    trainer.train(model, processor, read_jsonl(data), args=args, adapter_config=config, report=lambda s: None)
    return folder, model, processor


def test_task_from_the_prefix_and_questions_from_lines():
    assert [evaluation.task_of(p) for p in ("caption en", "answer en what?", "ocr", "detect cat ; dog", "segment cat",
                                          "describe en", "")] == [
        "caption", "vqa", "ocr", "detect", "segment", "match", "match"]
    examples = [trainer.Example("a.jpg", "caption en", "one"), trainer.Example("b.jpg", "caption en", "two"),
                trainer.Example("a.jpg", "caption en", "three"), trainer.Example("a.jpg", "answer en what?", "x")]
    questions = evaluation.group_questions(examples)
    assert [(q.image, q.prefix, q.references, q.task) for q in questions] == [
        ("a.jpg", "caption en", ["one", "three"], "caption"), ("b.jpg", "caption en", ["two"], "caption"),
        ("a.jpg", "answer en what?", ["x"], "vqa")]
    assert [q.task for q in evaluation.group_questions(examples, "ocr")] == ["ocr"] * 3


def test_a_list_of_suffixes_is_several_references(tmp_path):
    (tmp_path / "c.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    data = write(tmp_path / "d.jsonl", [{"image": "c.jpg", "prefix": "answer en how many?", "suffix": ["2", "two"]}])
    examples = read_jsonl(data)
    assert [e.suffix for e in examples] == ["2", "two"]
    assert evaluation.group_questions(examples)[0].references == ["2", "two"]


def test_scores_without_a_model():
    questions = [evaluation.Question(str(IMAGES / "chelsea.jpg"), "segment cat", [BOXES["chelsea.jpg"][0] + " cat"],
                                   "segment", "")]
    out = evaluation.score_answers("segment", [BOXES["chelsea.jpg"][0] + " cat"], questions)
    assert out["map"] == pytest.approx(1.0) and "no mask decoder" in out["note"]
    assert evaluation.score_answers("ocr", ["abc"], [evaluation.Question("", "ocr", ["abd"], "ocr", "")]) == {
        "anls": pytest.approx(2 / 3), "cer": pytest.approx(1 / 3)}


def test_segmentation_masks_through_the_mask_decoder(tmp_path):
    from mlx_paligemma.models.mask_decoder import MaskDecoder
    from mlx_paligemma.formats.mask_decoder import load_mask_decoder, save_mask_decoder

    mx.random.seed(0)
    save_mask_decoder(MaskDecoder(), tmp_path / "decoder.safetensors")  # random weights: some mask
    decoder = load_mask_decoder(tmp_path / "decoder.safetensors")
    answer = BOXES["chelsea.jpg"][0] + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat"
    other = BOXES["chelsea.jpg"][0] + "".join(f"<seg{100 + i:03d}>" for i in range(16)) + " cat"
    question = evaluation.Question(str(IMAGES / "chelsea.jpg"), "segment cat", [answer], "segment", "")
    same = evaluation.score_answers("segment", [answer], [question], decoder)
    assert same["mask_iou"] == pytest.approx(1.0) and same["per_class"] == {"cat": pytest.approx(1.0)}
    assert evaluation.score_answers("segment", [other], [question], decoder)["mask_iou"] < 1.0


def test_detection_map_is_1_on_what_it_was_taught_and_lower_on_a_shifted_box(taught, tmp_path, capsys):
    folder, _, _ = taught
    model = str(FIXTURES / "paligemma2-tiny")
    rc = evaluate.main(["--model", model, "--adapter-path", str(folder / "adapters"), "--data",
                        str(folder / "train.jsonl"), "--output", str(tmp_path / "m.json"), "--predictions",
                        str(tmp_path / "p.jsonl"), "--batch-size", "3", "--max-tokens", "16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    written = json.loads((tmp_path / "m.json").read_text())
    assert list(written["results"]) == ["base"]  # one model: the shape of several, as --adapter writes
    results = written["results"]["base"]
    assert results["tasks"]["detect"]["map"] == pytest.approx(1.0)
    assert results["tasks"]["detect"]["map_50"] == pytest.approx(1.0)
    assert results["tasks"]["detect"]["mean_iou"] == pytest.approx(1.0)
    assert results["tasks"]["caption"]["questions"] == 3 and results["metric"] == "mean of caption cider, detect map"
    assert written["settings"]["max_tokens"] == 16 and written["adapter_path"] == str(folder / "adapters")
    assert "detect" in captured.out and "cider" in captured.out and "answers" in captured.err
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(list(line["answers"]) == ["base"] for line in lines)
    predictions = [{**{k: v for k, v in line.items() if k != "answers"}, **line["answers"]["base"]} for line in lines]
    objects, references, score = (predictions[0].pop(k) for k in ("objects", "reference_objects", "score"))
    answer = "<loc0064><loc0400><loc0860><loc0900> cat"
    assert score == pytest.approx(1.0) and predictions[0] == {
        "image": "chelsea.jpg", "prefix": "detect cat", "task": "detect", "references": [answer], "text": answer,
        "finish_reason": "stop", "prompt_tokens": predictions[0]["prompt_tokens"], "generation_tokens": 6}
    # chelsea.jpg is 451 x 300: the box's bins (y 64, x 400, y 860, x 900) / 1024 of it.
    box = [round(v, 2) for v in (400 / 1024 * 451, 64 / 1024 * 300, 900 / 1024 * 451, 860 / 1024 * 300)]
    assert references == [{"label": "cat", "box": box, "score": None}]
    assert [(o["label"], o["box"]) for o in objects] == [("cat", box)]
    assert 0 < objects[0]["score"] <= 1
    assert [p["task"] for p in predictions[1:] if "objects" in p] == ["detect"]  # the other detection
    assert all(0 <= p["score"] for p in predictions[1:])

    write(folder / "shifted.jsonl", rows(shift=60))
    rc = evaluate.main(["--model", model, "--adapter-path", str(folder / "adapters"), "--data",
                        str(folder / "shifted.jsonl"), "--task", "detect", "--output", str(tmp_path / "s.json")])
    assert rc == 0
    shifted = json.loads((tmp_path / "s.json").read_text())["results"]["base"]["tasks"]["detect"]
    assert shifted["questions"] == 5 and 0 < shifted["mean_iou"] < 1 and shifted["map"] < 0.9


def test_captions_score_higher_on_their_own_references_than_on_shuffled_ones(taught):
    folder, model, processor = taught
    own, _ = evaluation.evaluate_examples(model, processor, read_jsonl(folder / "train.jsonl"), task="caption")
    names = list(CAPTIONS)
    shuffled = {image: CAPTIONS[names[(i + 1) % len(names)]] for i, image in enumerate(names)}
    write(folder / "shuffled.jsonl", rows(shuffled)[len(BOXES):])
    other, _ = evaluation.evaluate_examples(model, processor, read_jsonl(folder / "shuffled.jsonl"))
    own, other = own["tasks"]["caption"], other["tasks"]["caption"]
    assert own["cider"] > other["cider"] + 1 and own["bleu4"] > other["bleu4"]


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "error: argument --batch-size: must be a whole number >= 1, got '0' (see --help)"),
    (["--max-tokens", "0"], "error: max_tokens must be an integer >= 1, got 0"),
    (["--temperature", "0.5", "--num-beams", "2"], "error: num_beams > 1 decodes deterministically: leave temperature "
                                                   "at 0"),
    (["--data", "missing.jsonl"], "error: --data: no such file missing.jsonl"),
    (["--mask-decoder", "missing.npz"], "error: --mask-decoder: no such file missing.npz"),
])
def test_bad_arguments_end_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "c.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    data = write(tmp_path / "d.jsonl", [{"image": "c.jpg", "prefix": "caption en", "suffix": "a cat"}])
    args = ["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data)] + argv
    assert evaluate.main(args) == 1
    assert capsys.readouterr().err.strip().splitlines() == [message]


def test_unknown_task_is_refused(loaded):
    model, processor = loaded
    with pytest.raises(InputError, match="unknown task 'captions'"):
        evaluation.evaluate_examples(model, processor, [trainer.Example(str(IMAGES / "chelsea.jpg"), "caption en", "a")],
                                   task="captions")


def test_object_score_is_mean_probability_of_box_and_label_tokens():
    """Each object's score: the mean probability of its four location tokens and its label's tokens; the
    separator and the other object's tokens do not count."""
    import numpy as np

    from mlx_paligemma.tasks.detection import parse_detections, token_ends

    _, processor = mp.load(str(FIXTURES / "paligemma-tiny"))
    text = "<loc0064><loc0400><loc0860><loc0900> cat ; <loc0100><loc0200><loc0700><loc0800> cup"
    tokens = processor.tokenizer.encode(text)
    logprobs = [-0.1 * (i + 1) for i in range(len(tokens))]
    ends = token_ends(tokens, processor.tokenizer.decode)
    cat, cup = parse_detections(text, (100, 100), ends=ends, logprobs=logprobs)
    pieces = [processor.tokenizer.decode([t]) for t in tokens]
    first = pieces.index(" ;") if " ;" in pieces else next(i for i, p in enumerate(pieces) if ";" in p)
    cat_tokens = [i for i in range(first) if pieces[i].strip()]  # 4 locations and the label
    cup_tokens = [i for i in range(first + 1, len(tokens)) if pieces[i].strip()]
    assert len(cat_tokens) >= 5 and len(cup_tokens) >= 5
    assert cat.score == pytest.approx(np.mean(np.exp([logprobs[i] for i in cat_tokens])))
    assert cup.score == pytest.approx(np.mean(np.exp([logprobs[i] for i in cup_tokens])))
    assert parse_detections(text, (100, 100))[0].score is None


def test_map_ranks_boxes_by_score():
    """COCO AP with one reference box and two guesses: the right one ranked first gives AP 1, second 0.5."""
    from mlx_paligemma.tasks.detection import DetectedObject
    from mlx_paligemma.tasks.metrics import detection_scores

    truth = [[DetectedObject("cat", (10.0, 10.0, 50.0, 50.0))]]
    right, wrong = (10.0, 10.0, 50.0, 50.0), (60.0, 60.0, 90.0, 90.0)
    first = detection_scores([[DetectedObject("cat", wrong, score=0.2), DetectedObject("cat", right, score=0.9)]],
                             truth)
    second = detection_scores([[DetectedObject("cat", wrong, score=0.9), DetectedObject("cat", right, score=0.2)]],
                              truth)
    assert first["map_50"] == pytest.approx(1.0)
    assert second["map_50"] == pytest.approx(0.5, abs=0.02)


def test_evaluate_help_shows_beam_defaults(capsys):
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--num-beams" in out and "--length-penalty" in out and "(default: 1)" in out


def test_multiple_choice_picks_the_likeliest_candidate(tmp_path):
    """Lines with candidates are multiple choice: the answer is the candidate mp.score rates highest (its values
    checked against transformers in test_score), the metric the fraction answered right."""
    model, processor = mp.load(str(FIXTURES / "paligemma2-tiny"))
    image = str(IMAGES / "chelsea.jpg")
    rows = [("answer en is there a cat?", ["yes", "no"]), ("answer en what colour is it?", ["red", "green", "a blue"]),
            ("answer en how many?", ["1", "2"])]
    scores = [mp.score(model, processor, [image], p, c) for p, c in rows]
    likeliest = [c[int(np.argmax(s))] for (_, c), s in zip(rows, scores)]
    # References: right for the first two questions, wrong for the third.
    truth = [likeliest[0], likeliest[1], next(c for c in rows[2][1] if c != likeliest[2])]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"image": image, "prefix": p, "suffix": t, "candidates": c}) + "\n"
                            for (p, c), t in zip(rows, truth)))
    results, records = evaluation.evaluate_examples(model, processor, read_jsonl(data))
    assert results["tasks"]["choice"]["accuracy"] == pytest.approx(2 / 3)
    assert [r["text"] for r in records] == likeliest and [r["task"] for r in records] == ["choice"] * 3
    for r, s in zip(records, scores):
        np.testing.assert_allclose([c["logprob"] for c in r["candidates"]], s, rtol=0, atol=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": image, "prefix": "answer en ?", "suffix": "a", "candidates": ["a"]}) + "\n")
    with pytest.raises(InputError, match="line 1: 'candidates' must be a list of at least two different strings"):
        read_jsonl(bad)
    with pytest.raises(InputError, match="--task choice needs 'candidates'"):
        evaluation.evaluate_examples(model, processor, [Example(image, "caption en", "a")], task="choice")


def test_outputs_never_replace_the_data(tmp_path, capsys):
    """--predictions or --output naming the data file (or each other, or a folder) is one line before any work, and
    the data is unchanged."""
    (tmp_path / "c.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    data = write(tmp_path / "d.jsonl", [{"image": "c.jpg", "prefix": "caption en", "suffix": "a cat"}])
    before = data.read_bytes()
    base = ["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data)]
    cases = [(["--predictions", str(data)], f"error: --predictions {data} would overwrite the data being scored"),
             (["--output", str(data)], f"error: --output {data} would overwrite the data being scored"),
             (["--output", str(tmp_path / "m.json"), "--predictions", str(tmp_path / "m.json")],
              "error: --output and --predictions name the same file"),
             (["--output", str(tmp_path)], f"error: --output {tmp_path}: give a file in a folder that exists")]
    for argv, message in cases:
        assert evaluate.main(base + argv) == 1
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert data.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.jpg", "d.jsonl"]


def test_an_output_of_an_evaluation_asked_otherwise_is_refused_unless_overwrite(tmp_path, capsys, monkeypatch):
    """--output records what the evaluation was asked; a rerun onto it asking otherwise is one line naming the
    difference before any work (the file untouched), and --overwrite replaces it."""
    from mlx_paligemma.formats import loading

    (tmp_path / "c.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    data = write(tmp_path / "d.jsonl", [{"image": "c.jpg", "prefix": "caption en", "suffix": "a cat"}])
    out = tmp_path / "m.json"
    base = ["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data), "--output", str(out)]
    assert evaluate.main(base + ["--max-tokens", "4"]) == 0
    before = out.read_bytes()
    assert json.loads(before)["settings"]["max_tokens"] == 4
    capsys.readouterr()
    real = loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model loaded")))
    assert evaluate.main(base + ["--max-tokens", "5", "--seed", "3"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --output {out} holds an evaluation asked otherwise (max_tokens 4 -> 5, seed null -> 3): give "
        "another --output, or --overwrite to replace it"]
    assert out.read_bytes() == before
    monkeypatch.setattr(loading, "load", real)
    assert evaluate.main(base + ["--max-tokens", "5", "--overwrite"]) == 0
    assert json.loads(out.read_text())["settings"]["max_tokens"] == 5
