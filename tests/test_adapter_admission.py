"""The one admission of adapters (formats.adapters.read_adapter) on every way in: load(adapters=...) and
load(adapter_path=...), the commands' --adapter NAME=PATH and --adapter-path, and the server's /v1/adapters. Each
hostile folder, name or path is refused with one line whose `param` names its field, and nothing is loaded."""

import json
import os
import re
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma import batch, evaluate, limits, lora
from mlx_paligemma.generate import build_parser as generate_parser, main as generate_main
from mlx_paligemma.errors import Conflict, InputError
from mlx_paligemma.models.adapters import adapter_names, adapter_set
from mlx_paligemma.server.__main__ import build_parser as server_parser
from test_server import KEY, Server, call, message

MODEL = FIXTURES / "paligemma2-tiny"
IMAGE = str(FIXTURES / "images" / "chelsea.jpg")
SERVED = "tiny"  # --served-model-name
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def dims():
    """module path -> (in, out) of every decoder linear of the tiny model."""
    model, _ = mp.load(str(MODEL))
    return {path: (m.weight.shape[1], m.weight.shape[0]) for path, m in model.named_modules()
            if isinstance(m, nn.Linear) and path.startswith("language_model.model.layers.")}


def factors(dims, rank=2, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    out = {}
    for path, (inp, outp) in dims.items():
        out[f"{path}.lora_a"] = (mx.random.normal((inp, rank)) * 0.1).astype(dtype)
        out[f"{path}.lora_b"] = (mx.random.normal((rank, outp)) * 0.1).astype(dtype)
    return out


def write(folder, weights, rank=2, config=None):
    """An adapter folder as mlx_paligemma.lora writes one: its factors and its config (mlx-lm's layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    config = config or {"fine_tune_type": "lora", "num_layers": -1,
                        "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": KEYS}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def rewrite_header(file, change):
    """The safetensors file with its JSON header changed by `change(header, data) -> data`, the data kept."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = change(header, raw[8 + n:])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def shape_lie(folder):
    """One factor's header shape says twice its rows; its bytes are those of the true shape."""
    def change(header, data):
        entry = header["language_model.model.layers.0.self_attn.q_proj.lora_a"]
        entry["shape"] = [entry["shape"][0] * 2, entry["shape"][1]]
        return data
    rewrite_header(folder / "adapters.safetensors", change)


def float64(folder):
    """Every factor stored as float64 (F64), offsets and bytes whole."""
    weights = mx.load(str(folder / "adapters.safetensors"))

    def change(header, data):
        out, at = b"", 0
        for key in [k for k in header if k != "__metadata__"]:
            values = np.array(weights[key], dtype=np.float64).tobytes()
            header[key].update(dtype="F64", data_offsets=[at, at + len(values)])
            out, at = out + values, at + len(values)
        return out
    rewrite_header(folder / "adapters.safetensors", change)


@pytest.fixture()
def good(dims, tmp_path):
    return write(tmp_path / "good", factors(dims))


def damaged(kind, dims, folder):
    """A folder of the tester's kinds, and the field its refusal names."""
    if kind == "shape lie":
        shape_lie(write(folder, factors(dims)))
        return "weights"
    if kind == "float64":
        float64(write(folder, factors(dims)))
        return "weights"
    if kind == "lora_parameters a list":
        write(folder, factors(dims), config={"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": [2, 2.0]})
        return "config"
    if kind == "NaN factors":
        weights = factors(dims)
        weights["language_model.model.layers.1.mlp.up_proj.lora_b"] = mx.full((2, 128), float("nan"))
        write(folder, weights)
        return "weights"
    if kind == "rank over the limit":
        write(folder, factors(dims, rank=limits.LIMITS.max_adapter_rank + 1), rank=limits.LIMITS.max_adapter_rank + 1)
        return "rank"
    if kind == "nested keys":
        weights = {k.replace(".lora_", ".linear.lora_"): w for k, w in factors(dims).items() if "q_proj" in k}
        write(folder, weights)
        return "weights"
    raise AssertionError(kind)


DAMAGED = ["shape lie", "float64", "lora_parameters a list", "NaN factors", "rank over the limit", "nested keys"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "unexpected" not in err[0], err
    return err[0]


def batch_input(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"image": IMAGE, "prompt": "caption en"}) + "\n")
    return ["--model", str(MODEL), "--input", str(data), "--output", str(tmp_path / "out.jsonl"), "--max-tokens", "2"]


def generate_args():
    return ["--model", str(MODEL), "--image", IMAGE, "--prompt", "caption en", "--max-tokens", "2"]


# Python and the commands.

def test_a_good_folder_loads_beside_the_base_and_alone(good):
    model, processor = mp.load(str(MODEL), adapters={"good": str(good)})
    assert adapter_names(model) == ["good"] and adapter_set(model).info["good"]["rank"] == 2
    beside = mp.generate(model, processor, IMAGE, "caption en", max_tokens=4, adapter="good")
    alone = mp.generate(*mp.load(str(MODEL), adapter_path=str(good)), IMAGE, "caption en", max_tokens=4)
    assert beside.tokens == alone.tokens


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_folder_is_one_line_naming_its_field_on_every_way_in(kind, dims, tmp_path, capsys):
    folder = tmp_path / "bad"
    param = damaged(kind, dims, folder)
    for given in ({"adapters": {"bad": str(folder)}}, {"adapter_path": str(folder)}):
        with pytest.raises(InputError) as e:
            mp.load(str(MODEL), **given)
        assert e.value.param == param and "\n" not in str(e.value), (given, str(e.value), e.value.param)
    assert batch.main(batch_input(tmp_path) + ["--adapter", f"bad={folder}"]) == 1
    one_error_line(capsys)
    assert generate_main(generate_args() + ["--adapter-path", str(folder)]) == 1
    one_error_line(capsys)


@pytest.mark.parametrize("name", ["a/b", "../x", ".hidden", "x" * 65, "", "a b", "caf\u00e9", "a\nb", 7])
def test_a_name_outside_the_safe_characters_is_refused(name, good):
    with pytest.raises(InputError) as e:
        mp.load(str(MODEL), adapters={name: str(good)})
    assert e.value.param == "name" and "\n" not in str(e.value)


def test_a_bad_name_or_path_on_the_command_line_is_one_line(good, tmp_path, capsys):
    long = str(tmp_path / ("x" * 3000))
    for argv in (["--adapter", f"a/b={good}"], ["--adapter", f"a={long}"],
                 ["--adapter", f"a={tmp_path / ('y' * 300)}"]):
        assert batch.main(batch_input(tmp_path) + argv) == 1, argv
        one_error_line(capsys)
    assert generate_main(generate_args() + ["--adapter-path", long]) == 1
    assert "at most 1024 characters" in one_error_line(capsys)


def test_a_path_longer_than_the_limit_is_refused_before_the_file_system(tmp_path):
    for path in ("x" * 3000, str(tmp_path / ("y" * 300))):
        for given in ({"adapters": {"a": path}}, {"adapter_path": path}):
            with pytest.raises(InputError) as e:
                mp.load(str(MODEL), **given)
            assert e.value.param == "path", str(e.value)


def test_an_unknown_adapter_names_its_param(good):
    model, processor = mp.load(str(MODEL), adapters={"good": str(good)})
    with pytest.raises(InputError) as e:
        mp.generate(model, processor, IMAGE, "caption en", max_tokens=2, adapter="nope")
    assert e.value.param == "adapter"
    plain, processor = mp.load(str(MODEL))
    with pytest.raises(InputError) as e:
        mp.generate(plain, processor, IMAGE, "caption en", max_tokens=2, adapter="nope")
    assert e.value.param == "adapter"


def test_the_stacks_are_capped_padding_included(dims, tmp_path):
    small, big = write(tmp_path / "small", factors(dims, rank=2)), write(tmp_path / "big", factors(dims, rank=8), 8)
    per_rank = sum(4 * (i + o) for i, o in dims.values())  # float32 bytes of one rank over every linear
    # big alone: a zero slot and its own, at rank 8; beside small, three slots at rank 8 (small padded to 8).
    alone = 2 * 8 * per_rank + len(dims) * (2 * 4 + 17 * 4)
    beside = 3 * 8 * per_rank + len(dims) * (3 * 4 + 17 * 4)
    before = limits.LIMITS
    limits.configure(max_adapter_bytes=(alone + beside) // 2)
    try:
        model, _ = mp.load(str(MODEL), adapters={"big": str(big)})
        assert adapter_set(model).info["big"]["added_bytes"] == alone
        with pytest.raises(InputError) as e:
            mp.load(str(MODEL), adapters={"small": str(small), "big": str(big)})
        assert isinstance(e.value, Conflict) and e.value.param == "bytes" and f"{beside} bytes" in str(e.value)
        limits.configure(max_adapter_bytes=alone - 1)
        with pytest.raises(InputError) as e:
            mp.load(str(MODEL), adapters={"big": str(big)})
        assert not isinstance(e.value, Conflict) and e.value.param == "bytes"
        limits.configure(max_adapter_bytes=8 * per_rank - 1)  # its own factors: refused before they are read
        with pytest.raises(InputError) as e:
            mp.load(str(MODEL), adapter_path=str(big))
        assert e.value.param == "bytes"
    finally:
        limits.configure(max_adapter_rank=before.max_adapter_rank, max_adapter_bytes=before.max_adapter_bytes)


def test_every_command_that_loads_adapters_shows_the_limits_in_its_help():
    for parser in (generate_parser(), batch.build_parser(), evaluate.build_parser(), lora.build_parser(),
                   server_parser()):
        text = " ".join(parser.format_help().split())
        d = limits.Limits()
        for flag, default in (("--max-adapter-rank", d.max_adapter_rank), ("--max-adapter-bytes", d.max_adapter_bytes)):
            assert re.search(f"{flag} {flag[2:].upper().replace('-', '_')} [^-]+ \\(default: {default}\\)", text), \
                (parser.prog, flag)


def test_the_limits_are_set_from_the_command_line(dims, tmp_path, capsys):
    folder = write(tmp_path / "r4", factors(dims, rank=4), 4)
    before = limits.LIMITS
    try:
        assert batch.main(batch_input(tmp_path) + ["--adapter", f"r4={folder}", "--max-adapter-rank", "3"]) == 1
        line = one_error_line(capsys)
        assert "rank 4, more than the limit of 3" in line
        assert batch.main(batch_input(tmp_path) + ["--adapter", f"r4={folder}", "--max-adapter-rank", "0"]) == 1
        one_error_line(capsys)
    finally:
        limits.configure(max_adapter_rank=before.max_adapter_rank, max_adapter_bytes=before.max_adapter_bytes)


def test_the_served_name_is_not_an_adapter_name(good):
    from mlx_paligemma.server.__main__ import main

    with pytest.raises(InputError) as e:
        main(["--model", str(MODEL), "--served-model-name", SERVED, "--adapter", f"{SERVED}={good}"])
    assert e.value.param == "name" and "\n" not in str(e.value)


# The server: /v1/adapters with --adapter-root.

@pytest.fixture(scope="module")
def root(dims, tmp_path_factory):
    """The adapter root: good folders of ranks 2 and 8, damaged ones, and links out of it (a folder whose two
    files link to a good folder outside, a folder that links outside); the root itself reached through a link."""
    outside = write(tmp_path_factory.mktemp("outside") / "good", factors(dims))
    real = tmp_path_factory.mktemp("root")
    write(real / "r2", factors(dims, rank=2))
    write(real / "r8", factors(dims, rank=8), 8)
    write(real / "r9", factors(dims, rank=9), 9)
    for kind in DAMAGED:
        damaged(kind, dims, real / kind.replace(" ", "-"))
    (real / "linked-files").mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        os.symlink(outside / name, real / "linked-files" / name)
    os.symlink(outside, real / "linked-folder")
    link = tmp_path_factory.mktemp("link") / "root"
    os.symlink(real, link)
    return link


@pytest.fixture(scope="module")
def server(root):
    # Rank 8 at most, and stacks of at most 250,000 bytes: rank 8 alone fits (~198 kB), beside rank 2 it does not.
    s = Server(MODEL, "--served-model-name", SERVED, "--api-key", KEY, "--adapter-root", str(root),
               "--max-adapter-rank", "8", "--max-adapter-bytes", "250000")
    yield s
    s.stop()


def post(server, body):
    return call(server.url + "/v1/adapters", body, {"Authorization": f"Bearer {KEY}",
                                                    "Content-Type": "application/json"})


def delete(server, name):
    return call(f"{server.url}/v1/adapters/{name}", headers={"Authorization": f"Bearer {KEY}"}, method="DELETE")


def loaded(server):
    return [a["name"] for a in call(server.url + "/v1/adapters", headers={"Authorization": f"Bearer {KEY}"})[1]["data"]]


@pytest.mark.parametrize("body, status, param", [
    ({"name": "x", "path": "linked-files"}, 403, "path"),
    ({"name": "x", "path": "linked-folder"}, 403, "path"),
    ({"name": "a/b", "path": "r2"}, 400, "name"),
    ({"name": SERVED, "path": "r2"}, 400, "name"),
    ({"name": ".x", "path": "r2"}, 400, "name"),
    ({"path": "r2"}, 400, "name"),
    ({"name": "x", "path": "y" * 3000}, 400, "path"),
    ({"name": "x", "path": "y" * 300}, 400, "path"),
    ({"name": "x", "path": "r9"}, 400, "rank"),
    *[({"name": "x", "path": kind.replace(" ", "-")}, 400, "rank" if kind == "rank over the limit" else
       "config" if "lora_parameters" in kind else "weights") for kind in DAMAGED],
])
def test_the_server_refuses_with_the_field_named(server, body, status, param):
    got, answer = post(server, body)
    assert got == status and answer["error"]["param"] == param, answer
    assert loaded(server) == [] and server.health()["status"] == "ok"


def test_nested_keys_never_reach_inside_another_adapter(server):
    assert post(server, {"name": "first", "path": "r2"})[0] == 200
    got, answer = post(server, {"name": "second", "path": "nested-keys"})
    assert got == 400 and answer["error"]["param"] == "weights"
    assert delete(server, "first") == (200, {"name": "first", "deleted": True})
    assert loaded(server) == []


def test_the_server_caps_the_stacks_padding_included(server):
    assert post(server, {"name": "small", "path": "r2"})[0] == 200
    got, answer = post(server, {"name": "big", "path": "r8"})  # pads small to rank 8: three slots of rank 8
    assert got == 409 and answer["error"]["param"] == "bytes", answer
    assert delete(server, "small")[0] == 200
    got, answer = post(server, {"name": "big", "path": "r8"})
    assert got == 200 and answer["rank"] == 8, answer
    assert delete(server, "big")[0] == 200


def test_a_root_reached_through_a_link_loads(server, root):
    got, answer = post(server, {"name": "r2.v1_a-b", "path": str(root / "r2")})
    assert got == 200 and answer["name"] == "r2.v1_a-b", answer
    status, body = call(server.url + "/v1/chat/completions", {
        "model": "r2.v1_a-b", "max_tokens": 2, "messages": message("caption en", IMAGE)},
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert status == 200 and body["model"] == "r2.v1_a-b", body
    assert delete(server, "r2.v1_a-b")[0] == 200
