"""The server with adapters (`--adapter NAME=PATH`), as users run it, through the official openai client on
127.0.0.1: `model` chooses the base or an adapter, requests of different adapters answered together each equal the
adapter loaded alone, /v1/models lists them, an unknown model is a 404, and /v1/adapters loads and unloads at run
time behind the API key, from folders inside --adapter-root only."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from test_adapters import PROMPTS, texts_alone, train_adapters
from test_server import KEY, Server, call, message

BASE = "tiny"  # --served-model-name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_adapters("paligemma2-tiny", False, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def alone(trained):
    return texts_alone(trained)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(trained["folders"]["dogs"], root / "dogs-v2")
    s = Server(trained["base"], "--served-model-name", BASE, "--api-key", KEY, "--batch-size", "8",
               "--adapter-root", str(root), *[f"--adapter={a}={f}" for a, f in trained["folders"].items()])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, model, prompt_index):
    image, prompt = PROMPTS[prompt_index]
    r = client.chat.completions.create(model=model, messages=message(prompt, image), max_tokens=8, temperature=0)
    return r.model, r.choices[0].message.content


def test_model_chooses_the_adapter_and_rows_of_all_of_them_run_together(client, alone):
    asked = [(model, i) for model in (BASE, "cats", "dogs") for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(len(asked)) as pool:
        answers = list(pool.map(lambda a: ask(client, *a), asked))
    for (model, i), (named, text) in zip(asked, answers):
        assert named == model and text == alone[None if model == BASE else model][i], (model, i)
    assert alone["cats"][0] != alone[None][0]  # the adapters change the answers


def test_models_lists_the_base_and_each_adapter(client):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {BASE, "cats", "dogs"}
    assert listed["cats"].parent == BASE and listed["cats"].memory_bytes > listed["dogs"].memory_bytes > 0


def test_an_unknown_model_is_a_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "receipts", 0)
    assert "'receipts' is not served here" in e.value.body["message"] and e.value.body["param"] == "model"
    assert server.health()["status"] == "ok"


def test_adapters_load_and_unload_at_run_time(client, server, alone, tmp_path):
    key = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/adapters"
    assert call(url, {"name": "x", "path": "dogs-v2"}, {"Content-Type": "application/json"})[0] == 401
    status, body = call(url, {"name": "dogs2", "path": "dogs-v2"}, key)
    assert status == 200 and body["memory_bytes"] > 0 and body["rank"] == 4, body
    assert ask(client, "dogs2", 1) == ("dogs2", alone["dogs"][1])
    listed = call(url, headers=key)[1]["data"]
    assert [a["name"] for a in listed] == ["cats", "dogs", "dogs2"]
    for body, status, words in [({"name": "dogs3", "path": str(tmp_path)}, 403, "outside the adapter root"),
                                ({"name": "dogs3", "path": "../"}, 403, "outside the adapter root"),
                                ({"name": "cats", "path": "dogs-v2"}, 409, "loaded already"),
                                ({"name": "dogs3", "path": "missing"}, 400, "missing: no such folder"),
                                ({"name": "x" * 5000, "path": "dogs-v2"}, 413, "at most 4096 bytes"),
                                ({"name": "dogs3", "path": 3}, 400, "path must be the name of its folder")]:
        got, answer = call(url, body, key)
        assert got == status and words in answer["error"]["message"], answer
    assert call(url + "/dogs2", headers=key, method="DELETE") == (200, {"name": "dogs2", "deleted": True})
    status, answer = call(url + "/dogs2", headers=key, method="DELETE")
    assert status == 404 and "unknown adapter 'dogs2'" in answer["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        ask(client, "dogs2", 0)
    assert ask(client, "dogs", 0) == ("dogs", alone["dogs"][0])  # the others go on


def test_an_adapter_in_use_is_not_unloaded(client, server, alone):
    key = {"Authorization": f"Bearer {KEY}"}
    image, prompt = PROMPTS[0]
    # A long answer (eos forbidden), streamed: the adapter is in use until it ends or the client leaves.
    stream = client.chat.completions.create(model="cats", messages=message(prompt, image), max_tokens=1000,
                                            temperature=0, logit_bias={"1": -100}, stream=True)
    try:
        next(iter(stream))
        status, answer = call(server.url + "/v1/adapters/cats", headers=key, method="DELETE")
        assert status == 409 and "in use" in answer["error"]["message"]
    finally:
        stream.close()
    server.wait_idle()
    assert ask(client, "cats", 0) == ("cats", alone["cats"][0])


def test_the_page_offers_the_adapters(server, alone):
    from browser import Browser

    page = Browser(server.url + "/", status="$('status').textContent")
    try:
        page.wait("typeof $ === 'function' && $('model').textContent !== ''")
        assert page.js("$('model-field').hidden")  # /v1/models needs the key: nothing to choose from yet
        page.js(f"$('api-key').value = {KEY!r}; $('api-key').dispatchEvent(new Event('change'))")
        page.wait("!$('model-field').hidden")
        assert page.js("[...$('model-choice').options].map((o) => o.value)") == [BASE, "cats", "dogs"]
        page.pick_file("#file", PROMPTS[0][0])
        page.wait("$('drop').classList.contains('has-image')")
        page.js("$('model-choice').value = 'cats'; $('max-tokens').value = '8'; $('task').value = 'caption';"
                "$('task').dispatchEvent(new Event('input'))")
        page.wait("!$('run').disabled")
        page.js("$('run').click()")
        assert page.wait("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                         timeout=60) == "done", page.js("$('status').textContent")
        assert page.js("$('answer').textContent") == alone["cats"][0]
    finally:
        page.close()


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "cats"], "--adapter cats: give NAME=PATH"),
    (["--adapter", "a=x", "--adapter-path", "x"], "give --adapter-path (one adapter, applied to --model) or --adapter"),
    (["--adapter", "a=/no/such/folder"], "--adapter a=/no/such/folder: no such folder"),
])
def test_bad_adapter_options_are_one_line(trained, argv, message):
    from mlx_paligemma.errors import InputError
    from mlx_paligemma.server.__main__ import main

    with pytest.raises(InputError) as e:
        main(["--model", trained["base"], *argv])
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
