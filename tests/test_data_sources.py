"""Data sources beside JSONL: Hugging Face datasets (save_to_disk folders, parquet files) and COCO annotation files
read into the same examples as the equivalent JSONL (read by read_jsonl); training, evaluation and batch runs on them
equal those on the JSONL; boxes written as PaliGemma's tokens by hand; hostile files one line each. No test goes to
the network: datasets are built here with the datasets library and pyarrow, and the hub is set offline."""

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma import batch, evaluate, lora
from mlx_paligemma.processing import answer_format
from mlx_paligemma.tasks import detection, evaluation
from mlx_paligemma.data import sources
from mlx_paligemma.training import trainer
from mlx_paligemma.data.items import read_jsonl
from mlx_paligemma.errors import InputError
from mlx_paligemma.processing.images import load_image

try:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as missing:
    datasets = pa = pq = None
    WITHOUT = f'the data extra is not installed (pip install "mlx-paligemma[data]"): {missing}'
else:
    WITHOUT = ""
# Tests that build saved datasets or parquet files skip without the extra, each counted and named with the reason
# (pytest -rs); the COCO, box-token, JSONL and missing-library tests run either way.
needs_data = pytest.mark.skipif(datasets is None, reason=WITHOUT)

IMAGES = FIXTURES / "images"
MODEL = FIXTURES / "paligemma2-tiny"
# (image, prefix, suffixes): a list of answers is several examples, as in JSONL.
ROWS = [("chelsea.jpg", "caption en", ["a cat"]), ("coffee.jpg", "answer en what is it?", ["coffee", "a latte"]),
        ("odd.png", "caption en", ["an odd picture"]), ("gray.png", "ocr", ["grey"])]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """datasets' cache in the test's folder, and no hub: a test that tried to download would fail."""
    if datasets is None:
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def copy_images(folder: Path, names=("chelsea.jpg", "coffee.jpg", "odd.png", "gray.png")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes((IMAGES / name).read_bytes())
    return folder


def write_jsonl(file: Path, rows=ROWS) -> Path:
    copy_images(file.parent)
    file.write_text("".join(json.dumps({"image": i, "prefix": p, "suffix": s}) + "\n" for i, p, s in rows))
    return file


def image_dataset(rows=ROWS) -> "datasets.Dataset":
    """The rows with their images stored in the dataset (datasets' Image feature, bytes and file name)."""
    features = datasets.Features({"image": datasets.Image(), "prefix": datasets.Value("string"),
                                  "suffix": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": [{"bytes": (IMAGES / i).read_bytes(), "path": i} for i, _, _ in rows],
                                       "prefix": [p for _, p, _ in rows], "suffix": [s for _, _, s in rows]},
                                      features=features)


def pixels(image) -> np.ndarray:
    return np.asarray(load_image(image))


def assert_same_examples(ours, theirs):
    assert [(e.prefix, e.suffix) for e in ours] == [(e.prefix, e.suffix) for e in theirs]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(pixels(a.image), pixels(b.image))


@needs_data
def test_saved_dataset_and_dataset_dict_equal_the_jsonl(tmp_path):
    expected = read_jsonl(write_jsonl(tmp_path / "jsonl" / "train.jsonl"))
    image_dataset().save_to_disk(str(tmp_path / "saved"))
    ours = sources.read_examples(str(tmp_path / "saved"))
    assert_same_examples(ours, expected)
    assert all(not isinstance(e.image, str) for e in ours)  # decoded from the stored bytes, no file involved
    assert [e.source for e in ours] == [e.source for e in expected]  # named by the path stored with the bytes
    datasets.DatasetDict({"train": image_dataset(), "validation": image_dataset(ROWS[:2]),
                          "test": image_dataset(ROWS[3:])}).save_to_disk(str(tmp_path / "dict"))
    sets = sources.read_training_sets(str(tmp_path / "dict"))
    assert {k: len(v) for k, v in sets.items()} == {"train": 5, "valid": 3, "test": 1}
    assert_same_examples(sets["train"], expected)
    assert_same_examples(sources.read_examples(str(tmp_path / "dict"), "validation"), expected[:3])
    assert_same_examples(sources.read_examples(str(tmp_path / "dict")), expected[4:])  # no --split: test


@needs_data
def test_parquet_file_folder_and_glob_with_paths_bytes_and_a_template(tmp_path):
    expected = read_jsonl(write_jsonl(tmp_path / "jsonl" / "test.jsonl"))
    folder = copy_images(tmp_path / "pq")
    # Written by pyarrow, not by datasets: raw bytes in one file, paths relative to the file in another, and
    # questions turned into prefixes by a template.
    table = pa.table({"picture": [(IMAGES / i).read_bytes() for i, _, _ in ROWS],
                      "question": [p.removeprefix("answer en ") for _, p, _ in ROWS],
                      "answers": [s for _, _, s in ROWS]})
    pq.write_table(table, folder / "bytes.parquet")
    pq.write_table(pa.table({"image": [i for i, _, _ in ROWS], "prompt": [p for _, p, _ in ROWS],
                             "suffix": [s for _, _, s in ROWS]}), folder / "paths.parquet")
    by_paths = sources.read_examples(str(folder / "paths.parquet"))  # a "prompt" column is the prefix
    assert_same_examples(by_paths, expected)
    assert [e.image for e in by_paths] == [str(folder / e.source) for e in by_paths]  # paths stay paths
    template = sources.DataOptions(image_column="picture", suffix_column="answers",
                                   prompt_template="answer en {question}")
    by_bytes = sources.read_examples(str(folder / "bytes.parquet"), options=template)
    assert [e.prefix for e in by_bytes][1:3] == ["answer en what is it?"] * 2
    for a, b in zip(by_bytes, expected):
        np.testing.assert_array_equal(pixels(a.image), pixels(b.image))
    (tmp_path / "shards").mkdir()
    for n in range(2):
        pq.write_table(table.slice(2 * n, 2), tmp_path / "shards" / f"part-{n}.parquet")
    assert len(sources.read_examples(str(tmp_path / "shards" / "*.parquet"), options=template)) == 5
    assert len(sources.read_examples(str(tmp_path / "shards"), options=template)) == 5


@needs_data
def test_rows_sharing_a_stored_image_are_one_question_named_by_row(tmp_path):
    data = (IMAGES / "coffee.jpg").read_bytes()
    pq.write_table(pa.table({"image": [data, data, (IMAGES / "odd.png").read_bytes()],
                             "prefix": ["answer en what is it?"] * 3, "suffix": ["coffee", "a latte", "odd"]}),
                   tmp_path / "vqa.parquet")
    items = sources.read_source(str(tmp_path / "vqa.parquet"))
    assert [i.fields["image"] for i in items] == [1, 2, 3]  # no stored path: the row's number, never the bytes
    assert items[0].images[0] is items[1].images[0]  # decoded once
    questions = evaluation.group_questions(sources.read_examples(str(tmp_path / "vqa.parquet")))
    assert [q.references for q in questions] == [["coffee", "a latte"], ["odd"]]


@needs_data
def test_a_stored_image_turns_upright_as_the_same_file_does(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.open(IMAGES / "odd.png").convert("RGB").save(buffer, "JPEG", exif=exif)
    (tmp_path / "turned.jpg").write_bytes(buffer.getvalue())
    pq.write_table(pa.table({"image": [buffer.getvalue()], "prefix": ["ocr"], "suffix": ["x"]}),
                   tmp_path / "one.parquet")
    ours = sources.read_examples(str(tmp_path / "one.parquet"))[0]
    assert ours.image.size == (17, 61)
    np.testing.assert_array_equal(pixels(ours.image), pixels(str(tmp_path / "turned.jpg")))


def test_box_tokens_by_hand():
    # (x0, y0, x1, y1) in pixels of (width, height): bins are big_vision's round(v / side * 1023), half to even, y
    # first; the last two cases are where it differs from floor(v / side * 1024).
    cases = [((10, 20, 30, 40), (1024, 1024), "<loc0020><loc0010><loc0040><loc0030>"),
             ((0, 0, 320, 240), (640, 480), "<loc0000><loc0000><loc0512><loc0512>"),
             ((100, 64, 512, 255.9), (512, 256), "<loc0256><loc0200><loc1023><loc1023>"),
             ((112.75, 75, 451, 150), (451, 300), "<loc0256><loc0256><loc0512><loc1023>"),
             ((0.5, 0.2, 0.99, 1), (1, 1), "<loc0205><loc0512><loc1023><loc1013>"),
             ((0.0009, 0.9, 0.5, 0.95), (1, 1), "<loc0921><loc0001><loc0972><loc0512>")]
    for box, size, tokens in cases:
        assert answer_format.box_tokens(box, size) == tokens


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (451, 300), (600, 400), (4000, 3000), (17, 2000)])
def test_parsing_written_boxes_gives_them_back_within_a_bin(size):
    width, height = size
    rng = np.random.default_rng(width * 7919 + height)
    for _ in range(50):
        x0, x1 = sorted(rng.uniform(0, width, 2))
        y0, y1 = sorted(rng.uniform(0, height, 2))
        if x1 - x0 < 2 * width / 1024 or y1 - y0 < 2 * height / 1024:  # a box within one bin has no area to parse
            continue
        [parsed] = detection.parse_detections(answer_format.box_tokens((x0, y0, x1, y1), size) + " cat", size)
        # Written over 1023 steps (big_vision), read as b / 1024: half a bin of rounding and up to one of scale.
        bins = 1.5 * np.array([width, height, width, height]) / 1024
        assert np.all(np.abs(np.array(parsed.box) - [x0, y0, x1, y1]) <= bins + 1e-9), (parsed.box, (x0, y0, x1, y1))


def coco_file(folder: Path, annotations=None, images=None, categories=None) -> Path:
    copy_images(folder / "val2017", ("chelsea.jpg", "coffee.jpg", "gray.png"))
    coco = {"images": images or [{"id": 1, "file_name": "chelsea.jpg", "width": 451, "height": 300},
                                 {"id": 2, "file_name": "coffee.jpg", "width": 600, "height": 400},
                                 {"id": 3, "file_name": "gray.png", "width": 37, "height": 23}],
            "categories": categories or [{"id": 1, "name": "cat"}, {"id": 2, "name": "cup"},
                                         {"id": 7, "name": "dog"}],
            "annotations": annotations or [
                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [112.75, 75, 338.25, 75], "iscrowd": 0,
                 "segmentation": [[112.75, 75, 451, 75, 451, 150]]},
                {"id": 11, "image_id": 2, "category_id": 2, "bbox": [0, 0, 300, 200], "iscrowd": 0},
                {"id": 12, "image_id": 1, "category_id": 7, "bbox": [0, 0, 451, 300], "iscrowd": 0},
                {"id": 13, "image_id": 2, "category_id": 2, "bbox": [150, 100, 450, 300], "iscrowd": 0},
                {"id": 14, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1}]}
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    file = folder / "annotations" / "instances_val2017.json"
    file.write_text(json.dumps(coco))
    return file


def test_coco_gives_the_detect_examples_written_by_hand(tmp_path, capsys):
    file = coco_file(tmp_path / "coco")
    # Worked out from the definition: cat's box y 75..150 of 300, x 112.75..451 of 451; the dog is the whole image;
    # the cups x 0..300, 150..600 of 600, y 0..200, 100..400 of 400. The crowd region (14) is left out, and gray.png
    # has no objects, so no example.
    cat, dog = "<loc0256><loc0256><loc0512><loc1023> cat", "<loc0000><loc0000><loc1023><loc1023> dog"
    cups = "<loc0000><loc0000><loc0512><loc0512> cup ; <loc0256><loc0256><loc1023><loc1023> cup"
    jsonl = [{"image": "chelsea.jpg", "prefix": "detect cat ; dog", "suffix": f"{cat} ; {dog}"},
             {"image": "coffee.jpg", "prefix": "detect cup", "suffix": cups}]
    (tmp_path / "coco" / "val2017" / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl))
    expected = read_jsonl(tmp_path / "coco" / "val2017" / "same.jsonl")
    ours = sources.read_examples(str(file))
    assert_same_examples(ours, expected)
    assert [e.image for e in ours] == [e.image for e in expected]  # the images beside annotations/, as COCO lays out
    note = capsys.readouterr().err
    assert "2 detect examples from 2 images" in note and "masks not used" in note and len(note.splitlines()) == 1
    one_each = sources.read_examples(str(file), options=sources.DataOptions(classes_per_prompt=1))
    assert [(e.prefix, e.suffix) for e in one_each] == [("detect cat", cat), ("detect dog", dog), ("detect cup", cups)]
    dogs = sources.read_examples(str(file), options=sources.DataOptions(classes=["dog"]))
    assert [(e.prefix, e.suffix) for e in dogs] == [("detect dog", dog)]
    # The suffixes parse back to the annotated boxes within a bin.
    [c, d] = detection.parse_detections(ours[0].suffix, (451, 300))
    assert (c.label, d.label) == ("cat", "dog")
    np.testing.assert_allclose(c.box, (112.75, 75, 451, 150), atol=451 / 1024)


def hostile_coco(tmp_path, **change):
    return sources.read_examples(str(coco_file(tmp_path, **change)))


@pytest.mark.parametrize("change, message", [
    ({"annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [400, 0, 100, 100]}]},
     r"image 1 \(chelsea.jpg\): annotation 5: box \[400, 0, 100, 100\] lies outside the 451x300 image"),
    ({"annotations": [{"id": 5, "image_id": 1, "category_id": 99, "bbox": [0, 0, 10, 10]}]},
     "annotation 5: category 99 is not among the categories"),
    ({"annotations": [{"id": 5, "image_id": 42, "category_id": 1, "bbox": [0, 0, 10, 10]}]},
     "annotation 5 names image 42, which is not among the images"),
    ({"annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, "10", 10]}]},
     "annotation 5: 'bbox' must be four finite numbers"),
    ({"annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1e400, 10]}]},
     "annotation 5: 'bbox' must be four finite numbers"),
    ({"annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10 ** 30, 10]}]},
     "annotation 5: box .* lies outside the 451x300 image"),
    ({"annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 10]}]}, "has no area"),
    ({"images": [{"id": 1, "file_name": "gone.jpg", "width": 10, "height": 10}],
      "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]},
     r"image 1 \(gone.jpg\): image not found: .*val2017/gone.jpg"),
    ({"images": [{"id": 1, "file_name": "chelsea.jpg", "width": -3, "height": 300}]}, "image entry 0 must have"),
    ({"categories": [{"id": 1, "name": "cat ; dog"}]}, "category 1 has the name 'cat ; dog', which cannot be a label"),
])
def test_bad_coco_annotations_are_one_line_naming_them(tmp_path, change, message):
    with pytest.raises(InputError, match=message) as e:
        hostile_coco(tmp_path, **change)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"images": [', "instances.json is not valid JSON"),
    ('{"images": [], "annotations": []}', "not a COCO annotation file: no 'categories'"),
    ('{"images": [' + "1" * 5000 + "]}", "instances.json is not valid JSON"),
    ('{"images": {"id": 1}, "annotations": [], "categories": []}', "not a COCO annotation file: no 'images' list"),
    ("[1, 2]", r"instances.json, line 1: expected an object"),  # no images: JSONL, as batch always read .json
])
def test_malformed_coco_files_are_one_line(tmp_path, text, message):
    (tmp_path / "instances.json").write_text(text)
    with pytest.raises(InputError, match=message) as e:
        sources.read_examples(str(tmp_path / "instances.json"))
    assert "\n" not in str(e.value)


def saved(tmp_path, columns: dict, name="bad") -> str:
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / name))
    return str(tmp_path / name)


CHELSEA = str(IMAGES / "chelsea.jpg")


@needs_data
@pytest.mark.parametrize("columns, options, message", [
    ({"picture": [CHELSEA], "prefix": ["ocr"], "suffix": ["x"]}, {},
     r"has no column 'image' \(its columns: picture, prefix, suffix\): give --image-column"),
    ({"image": [CHELSEA], "question": ["what?"], "answer": ["x"]}, {"suffix_column": "answer"},
     r"has no column 'prefix' \(its columns: image, question, answer\): give --prefix-column, or --prompt-template"),
    ({"image": [CHELSEA], "question": ["what?"], "suffix": ["x"]}, {"prompt_template": "answer en {questoin}"},
     "has no column 'questoin'"),
    ({"image": [CHELSEA], "prefix": ["ocr"], "suffix": ["x"]}, {"suffix_column": "answers"},
     "has no column 'answers'"),
    ({"image": [CHELSEA], "prefix": [3], "suffix": ["x"]}, {}, r"row 1: 'prefix' must be a string, got int"),
    ({"image": [CHELSEA], "prefix": ["ocr"], "suffix": [2 ** 62]}, {},
     "row 1: 'suffix' must be a string or a list of strings, got int"),
    ({"image": [12], "prefix": ["ocr"], "suffix": ["x"]}, {}, r"row 1: 'image' must hold an image .* got int"),
    ({"image": [b"not an image"], "prefix": ["ocr"], "suffix": ["x"]}, {},
     "row 1: cannot read image row 1: not an image format PIL reads"),
    ({"image": ["nowhere.jpg"], "prefix": ["ocr"], "suffix": ["x"]}, {}, "row 1: image not found: .*nowhere.jpg"),
    ({"image": [CHELSEA], "prefix": ["ocr"], "suffix": [None]}, {}, "row 1: 'suffix' is missing"),
    ({"image": [CHELSEA], "question": [1e308], "suffix": ["x"]}, {"prompt_template": "answer en {question!r}"},
     "fields are column names in braces"),
])
def test_bad_dataset_columns_are_one_line(tmp_path, columns, options, message):
    with pytest.raises(InputError, match=message) as e:
        sources.read_examples(saved(tmp_path, columns), options=sources.DataOptions(**options))
    assert "\n" not in str(e.value)


def test_without_the_datasets_library_one_line_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")  # what marks a save_to_disk folder; reading it needs the library
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(InputError, match=r'pip install "mlx-paligemma\[data\]"'):
        sources.read_examples(str(folder))


@needs_data
def test_a_hub_id_not_in_the_cache_is_one_line_offline(tmp_path):
    with pytest.raises(InputError, match="^cannot read someone/not-cached: ") as e:
        sources.read_examples("someone/not-cached", "test")
    assert "\n" not in str(e.value)


def test_what_a_source_is():
    assert sources.kind_of("someone/some-dataset") == "hub"
    assert [sources.kind_of(s) for s in ("nowhere.jsonl", "data/train.jsonl", "./a/b", "a/b/c")] == ["missing"] * 4
    assert sources.kind_of(str(IMAGES)) == "folder"  # batch's folder of images
    with pytest.raises(InputError, match="has no split 'valid' .*its splits: train"):
        sources.choose_split("d", ["train"], "valid")
    with pytest.raises(InputError, match="has the splits train, validation: give --split"):
        sources.choose_split("d", ["train", "validation"], None)


def test_a_jsonl_folder_gives_what_the_trainer_reads_from_it(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl")
    write_jsonl(folder / "valid.jsonl", ROWS[:2])
    ours = sources.read_training_sets(str(folder))
    theirs = {name: read_jsonl(folder / f"{name}.jsonl") for name in ("train", "valid")}
    assert ours.keys() == {"train", "valid"}
    for k in ours:
        assert [(e.image, e.prefix, e.suffix, e.source, e.where) for e in ours[k]] == [
            (e.image, e.prefix, e.suffix, e.source, e.where) for e in theirs[k]]
    (folder / "train.jsonl").unlink()
    with pytest.raises(InputError, match=r"has no split 'train' \(its splits: valid\)"):
        sources.read_training_sets(str(folder))


@needs_data
def test_training_from_parquet_gives_the_losses_of_the_same_jsonl(tmp_path):
    data = write_jsonl(tmp_path / "jsonl" / "train.jsonl")
    image_dataset().to_parquet(str(tmp_path / "train.parquet"))  # datasets' own writer: Image as bytes and path
    losses = []
    for examples in (read_jsonl(data), sources.read_examples(str(tmp_path / "train.parquet"))):
        model, processor = mp.load(str(MODEL), dtype=mx.float32)
        trainer.set_trainable(model, "full")
        args = trainer.TrainingArgs(iters=3, batch_size=2, learning_rate=1e-3, steps_per_report=1)
        history = trainer.train(model, processor, examples, args=args, report=lambda s: None)
        losses.append([h["train_loss"] for h in history if "train_loss" in h])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


@needs_data
def test_lora_trains_on_a_saved_dataset_dict_by_its_splits(tmp_path, capsys):
    datasets.DatasetDict({"train": image_dataset(), "validation": image_dataset(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dict"))
    rc = lora.main(["--model", str(MODEL), "--data", str(tmp_path / "dict"), "--iters", "1", "--batch-size", "2",
                    "--adapter-path", str(tmp_path / "adapters")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "5 train, 1 valid examples" in out.out and "val loss" in out.out
    assert lora.main(["--model", str(MODEL), "--data", str(tmp_path / "dict"), "--valid-split", "dev",
                      "--adapter-path", str(tmp_path / "other")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'dict'} has no split 'dev' (its splits: train, "
                                               "validation)")


@needs_data
def test_evaluate_scores_coco_and_a_dataset_as_their_jsonl(tmp_path):
    file = coco_file(tmp_path / "coco")
    jsonl = tmp_path / "coco" / "val2017" / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"image": e.source, "prefix": e.prefix, "suffix": e.suffix}) + "\n"
                             for e in sources.read_examples(str(file))))  # the suffixes as tested above
    write_jsonl(tmp_path / "plain" / "test.jsonl")
    image_dataset().save_to_disk(str(tmp_path / "saved"))
    results = {}
    for name, data in [("coco", file), ("coco-jsonl", jsonl), ("saved", tmp_path / "saved"),
                       ("saved-jsonl", tmp_path / "plain" / "test.jsonl")]:
        out, preds = tmp_path / f"{name}.json", tmp_path / f"{name}.preds.jsonl"
        assert evaluate.main(["--model", str(MODEL), "--data", str(data), "--max-tokens", "6", "--output", str(out),
                              "--predictions", str(preds)]) == 0
        metrics = json.loads(out.read_text())
        results[name] = (metrics["results"]["base"]["tasks"], metrics["results"]["base"]["score"],
                         [{k: v for k, v in json.loads(line).items() if k != "image"}
                          for line in preds.read_text().splitlines()])
    assert results["coco"] == results["coco-jsonl"] and results["saved"] == results["saved-jsonl"]
    assert set(results["saved"][0]) == {"caption", "vqa", "ocr"} and "detect" in results["coco"][0]


@needs_data
def test_batch_runs_a_dataset_of_stored_images_as_its_jsonl(tmp_path):
    rows = [{**r, "id": i} for i, r in enumerate((
        {"image": i, "prompt": p} for i, p, _ in ROWS), 1)]
    copy_images(tmp_path)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stored = image_dataset()
    broken = datasets.Dataset.from_dict({"image": [{"bytes": b"junk", "path": "junk.jpg"}], "prefix": ["ocr"],
                                         "suffix": [["x"]]}, features=stored.features)
    datasets.concatenate_datasets([stored, broken]).save_to_disk(str(tmp_path / "saved"))
    common = ["--model", str(MODEL), "--max-tokens", "4"]
    assert batch.main(common + ["--input", str(tmp_path / "items.jsonl"), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert batch.main(common + ["--input", str(tmp_path / "saved"), "--output", str(tmp_path / "b.jsonl")]) == 0
    plain = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    ours = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [o["text"] for o in ours[:4]] == [p["text"] for p in plain]
    assert [(o["id"], o["image"], o["prefix"], o["suffix"]) for o in ours[:4]] == [
        (n, i, p, s) for n, (i, p, s) in enumerate(ROWS, 1)]  # an id, the stored path: never the image's bytes
    assert ours[4] == {"id": 5, "image": "junk.jpg", "prefix": "ocr", "suffix": ["x"],
                       "error": "cannot read image junk.jpg: not an image format PIL reads"}
    # A rerun finds every item done.
    assert batch.main(common + ["--input", str(tmp_path / "saved"), "--output", str(tmp_path / "b.jsonl")]) == 0
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 5
