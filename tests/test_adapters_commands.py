"""The batch command with adapters: `--adapter NAME=PATH` repeated and an item's "adapter" field, each item's answer
what its adapter loaded alone gives; bad adapters are one line, a bad item's adapter an error line of its own."""

import json

import pytest

from mlx_paligemma import batch
from test_adapters import PROMPTS, TEACH, texts_alone, train_adapters


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_adapters("paligemma-tiny", False, tmp_path_factory.mktemp("commands"))


@pytest.fixture(scope="module")
def alone(trained):
    return texts_alone(trained)


def test_batch_runs_each_item_through_its_adapter(trained, alone, tmp_path, capsys):
    chosen = [None, "cats", "dogs", "dogs", "cats", None, "receipts", 7]
    lines = []
    for i, adapter in enumerate(chosen):
        item = {"image": PROMPTS[i % 2][0], "prompt": PROMPTS[i % 2][1]}
        if adapter is not None:
            item["adapter"] = adapter
        lines.append(json.dumps(item))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    adapters = [f"--adapter={a}={f}" for a, f in trained["folders"].items()]
    rc = batch.main(["--model", trained["base"], "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "out.jsonl"), "--max-tokens", "8", *adapters])
    assert rc == 0, capsys.readouterr().err
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for i, (adapter, line) in enumerate(zip(chosen[:6], out)):
        assert line["text"] == alone[adapter][i % 2], (i, adapter)
    assert out[6]["error"] == "unknown adapter 'receipts': loaded adapters: cats, dogs"
    assert out[7]["error"] == "adapter must be an adapter's name or None (the base), got int"


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "cats"], "--adapter cats: give NAME=PATH"),
    (["--adapter", "a=x", "--adapter", "a=y"], "--adapter a=y: the name 'a' is given twice"),
    (["--adapter", "a=/no/such/folder"], "--adapter a=/no/such/folder: no such folder"),
])
def test_bad_adapter_options_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": PROMPTS[0][0], "prompt": "caption en"}) + "\n")
    rc = batch.main(["--model", "unused", "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "out.jsonl"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and lines == [f"error: {message}"]


def test_evaluate_puts_the_base_and_each_adapter_side_by_side(trained, tmp_path, capsys):
    from mlx_paligemma import evaluate

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"image": str(image), "prefix": prompt, "suffix": suffix}) + "\n"
                            for image, prompt, suffix in
                            [(PROMPTS[i][0], PROMPTS[i][1], TEACH["cats"][i][2]) for i in range(2)]))
    adapters = [f"--adapter={a}={f}" for a, f in trained["folders"].items()]
    common = ["--model", trained["base"], "--data", str(data), "--max-tokens", "8"]
    assert evaluate.main(common + adapters + ["--output", str(tmp_path / "all.json"), "--predictions",
                                              str(tmp_path / "all.jsonl")]) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    # One model for all three: each image went through the vision tower once (2 images, 3 models).
    assert "vision tower: 2 images encoded for 3 models" in captured.err
    assert table[0].split() == ["task", "metric", "base", "cats", "dogs"]
    both = json.loads((tmp_path / "all.json").read_text())["results"]
    assert evaluate.main(common + ["--adapter-path", trained["folders"]["cats"], "--output",
                                   str(tmp_path / "cats.json")]) == 0
    assert both["cats"]["tasks"] == json.loads((tmp_path / "cats.json").read_text())["results"]["base"]["tasks"]
    # cats was taught these very answers; the base was not
    assert both["cats"]["score"] > both["base"]["score"]
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [line["answers"]["cats"]["text"] for line in lines] == ["a cat", "a cup of coffee"]
    assert [set(line["answers"]) for line in lines] == [{"base", "cats", "dogs"}] * 2
    assert all("score" in answer for line in lines for answer in line["answers"].values())
    capsys.readouterr()
    assert evaluate.main(common + adapters + ["--report", str(tmp_path / "r")]) == 1
    assert "take one model" in capsys.readouterr().err
