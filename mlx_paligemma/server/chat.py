"""An OpenAI chat-completions request -> a checked Job: the prompt, its images (decoded), the engine's settings.

PaliGemma is not a chat model: messages.py says how a conversation becomes its prompt and images, and tools.py how
a forced tool call becomes a constraint. Everything here runs on the HTTP side (in threads),
so a bad request is refused before it reaches the model, and in two stages: `check_request` looks at the whole
request without fetching or decoding anything (every field's type and every limit), then images.py's `read_images`
fetches and decodes the images. Every cost is bounded before it is paid: the body (app.py), the prompt's bytes before
tokenizing, the stop strings (count and length: the engine's search per token grows with their length), the images
(count, bytes, pixels, and each cut to the model's input size at once, so a waiting request holds little memory),
max_tokens, n and num_beams (rows, counted against the queue), and each fetch (mlx_paligemma.processing.fetch: deadline, byte
cap, address policy). Constraints are checked for shape here; the engine compiles them and names what is wrong
inside one (a 400 from the worker, before any decoding).
"""

import difflib
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional


from .. import defaults
from ..tasks.detection import check_min_score
from ..processing.answer_format import has_objects
from ..generation.settings import (BY_NAME, CONSTRAINTS as SETTING_CONSTRAINTS, MAX_LOGPROBS, NEIGHBOURS, SETTINGS,
                                   check_settings)
from ..processing.fetch import shown
from ..errors import InputError, check_text
from .body import loads
from .messages import conversation, schema_in
from .tools import Call, forced_call
from .worker import Job



@dataclass
class Limits:
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = defaults.MAX_TOKENS
    max_images: int = 4
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 20 * 2**20  # one image, encoded, from a data URL, a URL or a file
    max_prompt_bytes: int = 32 * 2**10  # UTF-8 bytes of the prompt, checked before it is tokenized
    max_stops: int = 4  # OpenAI's limit
    max_stop_chars: int = 256
    max_parts: int = 64  # content parts of the user message
    max_logit_bias: int = 1024  # tokens in logit_bias
    max_n: int = 8  # choices of one request (rows: each counts against the queue)
    max_beams: int = 8  # num_beams or best_of of one request (rows too)
    fetch_timeout: float = 10.0  # seconds for a whole image download
    allow_private_urls: bool = False  # fetch loopback/private/link-local addresses too (a trusted network)
    local_files: Optional[Path] = None  # the folder image paths may name (--allow-local-files), or none
    image_size: Optional[int] = None  # the model's input size: images are cut to it as soon as they are decoded


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, one-line message, the parameter at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def chosen_adapter(model: Any, served: str, adapters: List[str]) -> Optional[str]:
    """The one rule of which model answers a request: its `model` chooses an adapter by its name, and None (the
    base) for the base's name or no name. A server without adapters answers every name with its one model (as
    mlx-lm's does, so a client written for a hub id runs against a local folder); with adapters loaded, any other
    name is a 404 naming what is served."""
    if not isinstance(model, str) or model in ("", served) or not adapters:
        return None
    if model in adapters:
        return model
    known = ", ".join(repr(n) for n in [served, *adapters])
    raise ApiError(404, f"model {model[:200]!r} is not served here; this server serves {known} (GET /v1/models)",
                   param="model", code="model_not_found")


def bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param)


def parse_json(data: bytes) -> Any:
    """The body as JSON within body.py's bounds, or a 400 saying why not."""
    try:
        return loads(data)
    except InputError as e:
        raise bad(str(e)) from None


@dataclass
class Checked:
    """A request that passed every check that needs no image: what remains is to read its images."""

    prompt: str
    sources: List[str]
    settings: dict
    objects: bool
    stream: bool = False
    include_usage: bool = False
    urls: int = field(default=0)  # how many of the images are fetched from http(s) URLs
    n: int = 1
    logprobs: bool = False
    min_score: float = defaults.MIN_SCORE
    call: Optional[Call] = None  # the tool call that tool_choice forces

    def job(self, images, size) -> Job:
        return Job(images, self.prompt, self.settings, self.objects, size, self.n, self.logprobs, self.min_score)


def check_request(body: Any, limits: Limits) -> Checked:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    try:
        talk = conversation(body.get("messages"), limits.max_parts, limits.max_prompt_bytes)
        call = forced_call(body)
    except InputError as e:
        raise bad(str(e), e.param or "messages") from None
    prompt, sources = talk.prompt, talk.sources
    if len(sources) > limits.max_images:
        raise bad(f"{len(sources)} images in the message; this server takes at most {limits.max_images}",
                  "messages")
    for url in sources:
        check_source(url, limits)
    objects = body.get("objects")
    if objects is None:
        objects = has_objects(prompt) and call is None  # unless the request says otherwise
    elif not isinstance(objects, bool):
        raise bad(f"objects must be true or false, got {reprlib.repr(objects)}", "objects")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {reprlib.repr(stream)}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad(f'stream_options must be an object such as {{"include_usage": true}}, got {reprlib.repr(options)}',
                  "stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad(f"stream_options.include_usage must be true or false, got {reprlib.repr(include_usage)}",
                  "stream_options")
    urls = sum(url.startswith(("http://", "https://")) for url in sources)
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_n:
        raise bad(f"n must be an integer in [1, {limits.max_n}], got {reprlib.repr(n)}", "n")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad(f"logprobs must be true or false, got {reprlib.repr(logprobs)}", "logprobs")
    min_score = body.get("min_score")
    try:
        min_score = defaults.MIN_SCORE if min_score is None else check_min_score(min_score)
    except InputError as e:
        raise bad(str(e), "min_score") from None
    out = settings(body, limits, n, bool(logprobs))
    given = [name for name in CONSTRAINTS if name in out]
    if call is not None:
        if given:
            raise bad(f"a forced tool call is its own constraint: give no {given[0]} with it", "tool_choice")
        out["json_schema"] = call.schema
    elif (out.get("response_format") or {}).get("type") == "json_object":
        schema = schema_in(talk.instructions)  # a JSON object of the schema the instructions show, when they do
        if schema is not None:
            out["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
    return Checked(prompt, sources, out, objects, bool(stream), bool(include_usage), urls, n, bool(logprobs),
                   min_score, call)


def check_source(url: str, limits: Limits) -> None:
    """What kind of image source it is, and whether this server takes it (no fetch, no decode)."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad("a data URL image must be base64: data:image/...;base64,...", "messages")
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise bad(f"an image in a data URL is more than {limits.max_image_bytes} bytes", "messages")
    elif "://" in url and not url.startswith(("http://", "https://", "file://")):
        raise bad(f"image URL {shown(url)}: only data:, http and https URLs are read", "messages")
    elif not url.startswith(("http://", "https://")) and limits.local_files is None:
        raise bad(f"image URL {shown(url)} is not a data: or http(s) URL (the server reads local files only with "
                  "--allow-local-files)", "messages")


# The request fields that are settings: the table's (generation/settings.py) by their names. Some are read by rules
# of their own: max_tokens (also as OpenAI's max_completion_tokens), logprobs (OpenAI's `logprobs: true` with
# `top_logprobs: k`), stop, logit_bias, and n and min_score (check_request).
FIELDS = tuple(s.name for s in SETTINGS if s.field)
OWN_RULES = ("max_tokens", "logprobs", "stop", "logit_bias", "n", "min_score")
CONSTRAINTS = tuple(name for name in SETTING_CONSTRAINTS if BY_NAME[name].field)
# OpenAI's chat-completions fields, read elsewhere or ignored: never taken for a misspelt setting.
OPENAI_FIELDS = frozenset((
    "messages", "model", "stream", "stream_options", "n", "logprobs", "top_logprobs", "max_completion_tokens",
    "max_tokens", "temperature", "top_p", "seed", "stop", "logit_bias", "response_format", "frequency_penalty",
    "presence_penalty", "user", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
    "metadata", "store", "service_tier", "modalities", "audio", "prediction", "reasoning_effort", "verbosity",
    "web_search_options", "prompt_cache_key", "safety_identifier", "objects"))


def near_miss(body: dict) -> None:
    """A field this server does not read but that is a setting's name, another name for one (`max_new_tokens`,
    `temp`) or a typo of one (`max_token`) is a 400 saying what to send; any other unknown field is ignored, as
    OpenAI-compatible servers do."""
    for name in body:
        if not isinstance(name, str) or name in FIELDS or name in OPENAI_FIELDS:
            continue
        close = NEIGHBOURS.get(name) or next(iter(difflib.get_close_matches(name, FIELDS, 1, 0.8)), None)
        setting = BY_NAME.get(name) or BY_NAME.get((close or "").split("=")[0])  # include_eos=False
        if setting is None:
            continue
        if setting.field or setting.openai:
            raise bad(f"unknown field {name}: did you mean {setting.name if setting.field else setting.openai}?", name)
        flag = f": it is this server's flag {setting.flag}" if "server" in setting.commands else ""
        raise bad(f"{name} is not a field of a request{flag}", name)


def settings(body: dict, limits: Limits, n: int = 1, logprobs: bool = False) -> dict:
    """The engine's settings of one row from the request's fields: the settings table's by their names (OpenAI's,
    and the extras: mlx-lm's top_k, min_p, repetition_penalty; transformers' num_beams, length_penalty,
    early_stopping; the constraints regex, choices, constrain), JSON null meaning "not given" for each; every one
    checked here, before anything is submitted (the engine checks a constraint's content)."""
    near_miss(body)
    given = {name: body[name] for name in FIELDS if name not in OWN_RULES and body.get(name) is not None}
    max_tokens = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    elif isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_tokens:
        raise bad(f"max_tokens is {max_tokens}, more than this server's limit of {limits.max_tokens}", "max_tokens")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) is not None and (isinstance(body[name], bool) or body[name] != 0):
            raise bad(f"{name} is not supported; use repetition_penalty", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {reprlib.repr(model)}", "model")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise bad(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {reprlib.repr(top)}",
                      "top_logprobs")
        if top and not logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    beams, best_of = given.get("num_beams", defaults.NUM_BEAMS), given.get("best_of", defaults.BEST_OF)
    for name, rows in (("num_beams", beams), ("best_of", best_of)):
        if isinstance(rows, int) and not isinstance(rows, bool) and rows > limits.max_beams:
            raise bad(f"{name} is {rows}, more than this server's limit of {limits.max_beams}", name)
    beam_search = isinstance(beams, int) and not isinstance(beams, bool) and beams > 1
    sampled_best = isinstance(best_of, int) and not isinstance(best_of, bool) and best_of > 1
    if beam_search and n > beams:
        raise bad(f"n ({n}) must be at most num_beams ({beams}): a beam search returns its best n", "n")
    if sampled_best and n > best_of:
        raise bad(f"n ({n}) must be at most best_of ({best_of}): best_of returns its likeliest n", "n")
    out = {name: given.get(name, BY_NAME[name].default) for name in FIELDS
           if name not in OWN_RULES and name not in CONSTRAINTS}
    out.update(max_tokens=max_tokens, stop=stops(body.get("stop"), limits),
               logit_bias=logit_bias(body.get("logit_bias"), limits),
               # None unless asked: a greedy row that nobody reads log-probabilities of computes none
               logprobs=(top or 0) if logprobs else None)
    constraints = [name for name in CONSTRAINTS if given.get(name, False) is not False
                   and given[name] != {"type": "text"}]  # plain text is no constraint
    if len(constraints) > 1:
        raise bad(f"give one constraint, not {' and '.join(constraints)}", constraints[1])
    for name in constraints:
        out[name] = constraint(name, given[name])
    try:
        # The one check of every setting and of their combinations (beams take no sampling); choice i of n sampled
        # choices is seeded seed + i.
        check_settings(**out, **({"num_return_sequences": n} if beam_search or sampled_best else {"n": n}))
    except InputError as e:
        raise bad(str(e), "top_logprobs" if e.param == "logprobs" else e.param) from None
    if out["temperature"] > 2:
        raise bad(f"temperature must be in [0, 2], got {out['temperature']}", "temperature")
    return out


def constraint(name: str, v: Any) -> Any:
    """A constraint field's shape (the engine compiles it and names what is wrong inside)."""
    if name == "response_format":
        if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
            raise bad('response_format must be {"type": "json_schema", "json_schema": {"schema": {...}}}, '
                      f'{{"type": "json_object"}} or {{"type": "text"}}, got {reprlib.repr(v)}', name)
        if v["type"] == "json_schema" and not (isinstance(v.get("json_schema"), dict)
                                               and isinstance(v["json_schema"].get("schema"), dict)):
            raise bad('response_format json_schema needs {"json_schema": {"schema": {...}}}', name)
    elif name == "regex" and not isinstance(v, str):
        raise bad(f"regex must be a string, got {reprlib.repr(v)}", name)
    elif name == "choices" and not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
        raise bad(f"choices must be a non-empty list of non-empty strings, got {reprlib.repr(v)}", name)
    elif name == "constrain" and not isinstance(v, bool):
        raise bad(f"constrain must be true or false, got {reprlib.repr(v)}", name)
    return v


def stops(value: Any, limits: Limits) -> List[str]:
    """OpenAI's stop: a string or a list of up to max_stops, each of at most max_stop_chars characters (the
    engine's search for them costs up to the square of their length per token: the length bounds it)."""
    stop = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > limits.max_stops:
        raise bad(f"stop must be a non-empty string or a list of up to {limits.max_stops} of them", "stop")
    for s in stop:
        if len(s) > limits.max_stop_chars:
            raise bad(f"a stop string is {len(s)} characters, more than this server's limit of "
                      f"{limits.max_stop_chars}", "stop")
        try:
            check_text(s, "a stop string")
        except InputError as e:
            raise bad(str(e), "stop") from None
    return stop


def logit_bias(value: Any, limits: Limits) -> Optional[dict]:
    """OpenAI's {"token id": bias in [-100, 100]} -> {int: float}; the engine checks the ids."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("logit_bias must be an object mapping token ids to numbers", "logit_bias")
    if len(value) > limits.max_logit_bias:
        raise bad(f"logit_bias has {len(value)} tokens; this server takes at most {limits.max_logit_bias}",
                  "logit_bias")
    out = {}
    for k, v in value.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 9):
            raise bad(f"logit_bias keys must be token ids, got {reprlib.repr(k)}", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad(f"logit_bias values must be numbers in [-100, 100], got {reprlib.repr(v)}", "logit_bias")
        out[int(k)] = float(v)
    return out or None
