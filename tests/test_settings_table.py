"""The settings table (generation/settings.py) drives every surface: each setting is a flag of each command it names,
with its default shown by --help; a field of the server's requests, JSON null meaning "not given"; a keyword of the
Python functions; the one options table of docs/PYTHON.md. Every other name for a setting (OpenAI's, transformers',
mlx-lm's, a typo) is answered with the name meant, on every surface: a Python keyword, a flag, and on the server a
400 for a near miss, while unknown fields that resemble nothing are ignored as OpenAI-compatible servers do."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma.errors import InputError
from mlx_paligemma.generation.settings import (BY_NAME, COMMANDS, NEIGHBOURS, NAMES, SETTINGS, Settings,
                                               check_settings, unknown_keyword)
from mlx_paligemma.server.chat import FIELDS, ApiError, Limits, settings as server_settings

ROOT = Path(__file__).parent.parent
PARSERS = {"generate": "generate", "batch": "batch", "evaluate": "evaluate", "server": "server.__main__"}
REQUIRED = {"generate": ["--model", "m", "--image", "i", "--prompt", "p"],
            "batch": ["--model", "m", "--data", "d", "--output", "o"],
            "evaluate": ["--model", "m", "--data", "d"], "server": ["--model", "m"]}


def parser(command):
    return importlib.import_module(f"mlx_paligemma.{PARSERS[command]}").build_parser()


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_of(command) -> str:
    return " ".join(parser(command).format_help().split())


@pytest.mark.parametrize("command", list(PARSERS))
def test_each_setting_is_a_flag_of_its_commands_with_its_default(command):
    p = parser(command)
    parsed = vars(p.parse_args(REQUIRED[command]))
    actions = {a.dest: a for a in p._actions}
    text = help_of(command)
    for s in SETTINGS:
        if command not in s.commands:
            assert s.name not in actions or s.name == "adapter", (command, s.name)  # --adapter NAME=PATH loads them
            continue
        action = actions[s.name]
        assert s.flag in action.option_strings and parsed[s.name] in (s.default, None if s.default == () else
                                                                      s.default), (command, s.name)
        # --help shows it with the table's help and default.
        assert action.help == f"{s.help} (default: {s.shown_default})" and s.flag in text, (command, s.name)


def test_the_commands_flags_are_the_tables():
    """Every flag that holds a setting's name is that setting's: no command keeps a hand-made copy."""
    for command in PARSERS:
        for action in parser(command)._actions:
            if action.dest in BY_NAME and action.dest != "adapter":  # --adapter NAME=PATH: those loaded
                assert command in BY_NAME[action.dest].commands, (command, action.dest)


def test_settings_are_the_tables_request_settings():
    fields = inspect.signature(Settings).parameters
    assert list(fields) == list(NAMES) == [s.name for s in SETTINGS if s.request]
    assert all(fields[s.name].default == s.default for s in SETTINGS if s.request)
    assert Settings() == check_settings()


def test_each_setting_is_a_python_keyword():
    """A request setting goes through generate's, stream_generate's and batch_generate's keywords to the one check;
    a setting of a whole run is a parameter of each function the table names."""
    for s in SETTINGS:
        if s.request:
            assert check_settings(**{s.name: s.default}) == Settings(), s.name
            assert set(s.python) >= {"generate", "stream_generate", "batch_generate"}
        for name in s.python:
            function = getattr(mp, name)
            parameters = inspect.signature(function).parameters
            assert s.name in parameters or (s.request and "settings" in parameters), (name, s.name)


def test_each_field_setting_is_read_by_the_server_and_null_means_not_given():
    """Each field the server takes changes what it asks the engine for; null for each field gives the settings of
    a request without it, OpenAI's names included: {"max_completion_tokens": null, "max_tokens": 3} gives 3."""
    given = {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
             "repetition_context_size": 9, "seed": 3, "stop": ["."], "logit_bias": {"7": 1.0}, "max_tokens": 7,
             "length_penalty": 0.5, "early_stopping": True, "regex": "[a-z]+"}
    plain = server_settings({}, Limits())
    for name in FIELDS:
        if name in ("n", "min_score", "logprobs", "num_beams", "best_of", "response_format", "choices", "constrain"):
            continue  # read by check_request (n, min_score, logprobs) or in the tests of their combinations below
        got = server_settings({name: given[name]}, Limits())
        assert got != plain and got[name] == (given[name] if name != "logit_bias" else {7: 1.0}), name
        assert server_settings({name: None}, Limits()) == plain, name
    assert server_settings({"num_beams": 2}, Limits())["num_beams"] == 2
    assert server_settings({"best_of": 2, "temperature": 1.0}, Limits(), n=2)["best_of"] == 2
    assert server_settings({"choices": ["a", "b"]}, Limits())["choices"] == ["a", "b"]
    assert server_settings({"constrain": True}, Limits())["constrain"] is True
    assert server_settings({"max_completion_tokens": None, "max_tokens": 3}, Limits())["max_tokens"] == 3
    assert server_settings({"max_completion_tokens": 4, "max_tokens": None}, Limits())["max_tokens"] == 4
    assert plain["max_tokens"] == BY_NAME["max_tokens"].default  # the one default, as on every surface
    assert set(FIELDS) == {s.name for s in SETTINGS if s.field}


def test_every_other_name_is_answered_with_the_name_meant():
    """Python: `generate(max_new_tokens=3)` says max_tokens; a command: `--max-new-tokens` says --max-tokens;
    the server: a 400 naming the field to send."""
    from mlx_paligemma.cli import NEIGHBOURS as FLAGS

    for other, meant in NEIGHBOURS.items():
        assert str(unknown_keyword(other, "generate()")).endswith(f"did you mean {meant}?"), other
        setting = BY_NAME.get(meant.split("=")[0])
        if setting is None:  # image_path: images, not a setting
            continue
        flag = FLAGS[flag_of(other)]
        assert flag == (setting.flag if "=" not in meant else f"--no-{setting.flag[2:]}"), other
        for command in setting.commands:
            if command in REQUIRED and "=" not in meant and flag_of(other) not in setting.flags:
                with pytest.raises(InputError, match=f"did you mean {flag}"):
                    parser(command).parse_args(REQUIRED[command] + [flag_of(other), "1"])
        if other in ("model", "max_completion_tokens", "top_logprobs"):
            continue  # OpenAI's own field names, read as OpenAI means them
        with pytest.raises(ApiError) as e:
            server_settings({other: 1}, Limits())
        assert e.value.status == 400 and e.value.param == other, other
    # A typo of a field is a near miss too; an unknown field like nothing here is ignored, as OpenAI's clients send.
    with pytest.raises(ApiError, match="unknown field max_token: did you mean max_tokens?"):
        server_settings({"max_token": 3}, Limits())
    with pytest.raises(ApiError, match="deterministic is not a field of a request: it is this server's flag "
                                       "--deterministic"):
        server_settings({"deterministic": True}, Limits())
    assert server_settings({"user": "me", "metadata": {}, "colour": "red"}, Limits()) == server_settings({}, Limits())


def test_the_server_answers_max_new_tokens_with_a_400_naming_max_tokens():
    from test_server import Server, call, message

    s = Server(FIXTURES / "paligemma2-tiny")
    try:
        body = {"messages": message("caption en", str(FIXTURES / "images" / "chelsea.jpg")), "max_new_tokens": 3}
        status, out = call(s.url + "/v1/chat/completions", body)
        assert status == 400 and out["error"]["param"] == "max_new_tokens"
        assert out["error"]["message"] == "unknown field max_new_tokens: did you mean max_tokens?"
        body = {**body, "max_new_tokens": None, "max_completion_tokens": None, "max_tokens": 2, "colour": "red"}
        body.pop("max_new_tokens")
        status, out = call(s.url + "/v1/chat/completions", body)
        assert status == 200 and out["usage"]["completion_tokens"] <= 2
    finally:
        s.stop()


def test_the_page_takes_its_defaults_from_the_server():
    """The page sends no number of its own: an empty field is the server's default (defaults.py)."""
    page = (ROOT / "mlx_paligemma" / "server" / "index.html").read_text()
    for field in ("max-tokens", "temperature"):
        tag = re.search(rf'<input [^>]*id="{field}"[^>]*>', page).group(0)
        assert "value=" not in tag, tag
    assert "|| 100" not in page and '"100"' not in page


# The one options table of the docs, made from the table.

def render() -> list:
    """The rows of docs/PYTHON.md's settings table, as the table says them."""
    rows = ["| setting | flag | default | values | what it does | commands | server | OpenAI | transformers | mlx-lm |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        commands = [c for c in COMMANDS if c in s.commands]
        server = "field" if s.field else "flag" if "server" in s.commands else ""
        flag = f"`{s.flag}`" if commands or "server" in s.commands else ""
        names = " | ".join(f"`{n}`" if n else "" for n in (s.openai, s.transformers, s.mlx_lm))
        rows.append(f"| `{s.name}` | {flag} | {s.shown_default} | {s.values} | {s.help} | {', '.join(commands)} | "
                    f"{server} | {names} |")
    return rows


def test_the_docs_options_table_is_the_table():
    text = (ROOT / "docs" / "PYTHON.md").read_text().splitlines()
    start = text.index(render()[0])
    shown = text[start:start + len(render())]
    assert shown == render(), "docs/PYTHON.md's settings table, as the table says it:\n" + "\n".join(render())
