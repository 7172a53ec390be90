"""OpenAI's Responses API (POST /v1/responses), stateless, on the chat completions' path.

A request becomes a chat completion's body (`to_chat`) and is checked, bounded and run as one (chat.py,
messages.py, tools.py): the same engine, limits and errors, each error's `param` named as the Responses API names
it (`renamed`). `input` is a string (one user message) or a list of messages (input_text and input_image parts)
and of earlier function_call / function_call_output items; `instructions` is a system message before them;
`max_output_tokens`, `text.format` (json_schema, json_object or text), `tools` and `tool_choice` are the chat
fields of the same meaning, and `include: ["message.output_text.logprobs"]` with `top_logprobs` gives each token's
log-probabilities. Nothing is stored: `previous_response_id`, `conversation`, `prompt`, `background` and
`store: true` are refused, naming them. The answer is one output item: a message with one output_text part, or a
function_call for a forced call; a run cut by max_output_tokens is "incomplete".
"""

import reprlib
import time
import uuid
from typing import List, Optional

from starlette.requests import Request

from . import tools
from .body import dumps
from .chat import ApiError
from .relay import collect, each, event_error
from .worker import Handle

# What this server cannot do without keeping responses between requests.
STATEFUL = ("previous_response_id", "conversation", "prompt", "background")
# Chat completions' fields, and what the Responses API sends instead.
CHAT_ONLY = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
             "response_format": "text.format", "n": "one request per answer",
             "logprobs": 'include: ["message.output_text.logprobs"]'}
# The Responses API's fields that are translated (the others are read as the chat fields of the same name).
TRANSLATED = ("input", "instructions", "max_output_tokens", "text", "tools", "tool_choice", "include")
# Chat's params as the Responses API names them.
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text", "logprobs": "include"}
LOGPROBS = "message.output_text.logprobs"


class Refused(ApiError):
    """A Responses request refused here, its param named as the Responses API names it already."""


def bad(message: str, param: str) -> ApiError:
    return Refused(400, message, param=param)


def renamed(e: ApiError) -> ApiError:
    """An error of the chat path, its param named as the Responses API names it."""
    if not isinstance(e, Refused):
        e.param = PARAMS.get(e.param, e.param)
    return e


def to_chat(body):
    """The chat completion's body of a Responses request (not an object: as it is, for chat.py to refuse)."""
    if not isinstance(body, dict):
        return body
    for name in STATEFUL:
        if body.get(name) not in (None, False):
            raise bad(f"{name} is not served: this server keeps no responses or conversations (send the whole "
                      "conversation as input)", name)
    if body.get("store") is True:
        raise bad("store: true is not served: this server keeps no responses (send store: false, or leave it out)",
                  "store")
    for name, instead in CHAT_ONLY.items():
        if body.get(name) is not None:
            raise bad(f"{name} is a chat completions field; the Responses API's is {instead}", name)
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(i, str) for i in include)):
        raise bad(f"include must be a list of strings, got {reprlib.repr(include)}", "include")
    chat = {k: v for k, v in body.items() if k not in TRANSLATED}
    top = body.get("top_logprobs")
    chat.update(messages=messages(body.get("input"), body.get("instructions")),
                max_tokens=body.get("max_output_tokens"), response_format=text_format(body.get("text")),
                tools=chat_tools(body.get("tools")), tool_choice=chat_tool_choice(body.get("tool_choice")),
                logprobs=LOGPROBS in (include or []) or (isinstance(top, int) and top > 0))
    return chat


def messages(given, instructions) -> List[dict]:
    out = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad(f"instructions must be a string, got {reprlib.repr(instructions)}", "instructions")
        out.append({"role": "system", "content": instructions})
    if isinstance(given, str):
        return out + [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise bad("input must be a string or a non-empty list of input items", "input")
    return out + [message(item) for item in given]


def message(item) -> dict:
    """A chat message of one input item."""
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list) and item.get("role") != "assistant":  # an assistant's earlier text is not read
            content = [part(p) for p in content]
        return {"role": item.get("role"), "content": content}
    if kind == "function_call":
        return {"role": "assistant", "content": None, "tool_calls": [
            tools.entry(item.get("call_id"), item.get("name"), item.get("arguments"))]}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")}
    raise bad(f"input item {reprlib.repr(kind if kind else item)} is not served: give messages (input_text and "
              "input_image parts), function_call and function_call_output items", "input")


def part(given) -> dict:
    kind = given.get("type") if isinstance(given, dict) else None
    if kind == "input_text":
        return {"type": "text", "text": given.get("text")}
    if kind == "input_image":
        url = given.get("image_url")
        if not isinstance(url, str) or not url:
            raise bad("an input_image part needs image_url, a data: or http(s) URL (file_id is not served)", "input")
        return {"type": "image_url", "image_url": {"url": url}}
    raise bad(f"unsupported content part {reprlib.repr(kind if kind else given)}: use input_text and input_image "
              "parts", "input")


def text_format(text) -> Optional[dict]:
    """text.format as chat's response_format."""
    if text is None:
        return None
    form = text.get("format") if isinstance(text, dict) else None
    if form is None or not isinstance(form, dict):
        if isinstance(text, dict) and "format" not in text:
            return None  # text: {"verbosity": ...}
        raise bad(f'text must be {{"format": {{"type": "json_schema", "name": ..., "schema": {{...}}}}}}, '
                  f'{{"type": "json_object"}} or {{"type": "text"}}, got {reprlib.repr(text)}', "text")
    if form.get("type") != "json_schema":
        return form
    if not isinstance(form.get("schema"), dict):
        raise bad('text.format json_schema needs "schema": {...}', "text")
    return {"type": "json_schema", "json_schema": {"name": form.get("name"), "schema": form["schema"]}}


def chat_tools(given):
    """Responses' function tools ({"type": "function", "name", "parameters", ...}) as chat's; anything else as it is,
    for tools.py to name."""
    if not isinstance(given, list):
        return given
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
            if isinstance(t, dict) and t.get("type") == "function" else t for t in given]


def chat_tool_choice(given):
    if isinstance(given, dict) and given.get("type") == "function" and "function" not in given:
        return {"type": "function", "function": {"name": given.get("name")}}
    return given


class Reply:
    """The Responses API's response object and its stream events around one request's events."""

    def __init__(self, handle: Handle, model_id: str, body: dict, call: Optional[tools.Call]):
        self.handle, self.model_id, self.body, self.call = handle, model_id, body, call
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.message_id, self.call_item_id, self.call_id = f"msg_{uuid.uuid4().hex}", f"fc_{uuid.uuid4().hex}", \
            tools.call_id()
        self.sequence = 0

    def response(self, status: str, output: list, last=None) -> dict:
        body, settings = self.body, self.handle.job.settings
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "model": self.model_id, "output": output, "error": None,
               "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
               "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
               "metadata": body.get("metadata") or {}, "previous_response_id": None, "store": False,
               "parallel_tool_calls": body.get("parallel_tool_calls") is not False, "reasoning": None,
               "temperature": settings.get("temperature"), "top_p": settings.get("top_p"),
               "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
               "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
               "tools": body.get("tools") or [], "truncation": "disabled", "user": body.get("user"), "usage": None}
        if last is not None:
            out["usage"] = {"input_tokens": last.prompt_tokens,
                            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                            "output_tokens": last.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": last.prompt_tokens + last.completion_tokens}
            if self.handle.job.objects:
                out["objects"] = last.objects
        return out

    def _message(self, text: str, entries: list, status: str) -> dict:
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant",
                "content": [self._text(text, entries)] if status != "in_progress" else []}

    def _text(self, text: str, entries: list) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": entries}

    def _call(self, name: str, arguments: str, status: str) -> dict:
        return {"id": self.call_item_id, "type": "function_call", "status": status, "call_id": self.call_id,
                "name": name, "arguments": arguments}

    def item(self, text: str, entries: list, finish_reason: str) -> dict:
        """The output item of a finished answer: a function call when it is one, else a message."""
        status = "incomplete" if finish_reason == "length" else "completed"
        read = self.call.read(text) if self.call else None
        return self._message(text, entries, status) if read is None else self._call(*read, status)

    async def whole(self, request: Request) -> Optional[dict]:
        try:
            got = await collect(self.handle, request)
        except ApiError as e:
            raise renamed(e) from None
        if got is None:
            return None
        (text,), (entries,), (last,) = got
        item = self.item(text, entries, last.finish_reason)
        return self.response(item["status"], [item], last)

    def _sse(self, kind: str, **fields) -> str:
        self.sequence += 1
        return f"event: {kind}\ndata: {dumps({'type': kind, 'sequence_number': self.sequence - 1, **fields})}\n\n"

    def _opened(self, item: dict) -> List[str]:
        """The events that open an output item (given in progress)."""
        events = [self._sse("response.output_item.added", output_index=0, item=item)]
        if item["type"] == "message":
            events.append(self._sse("response.content_part.added", item_id=item["id"], output_index=0,
                                    content_index=0, part=self._text("", [])))
        return events

    def _delta(self, item_type: str, text: str, entries: list) -> str:
        if item_type == "message":
            return self._sse("response.output_text.delta", item_id=self.message_id, output_index=0,
                             content_index=0, delta=text, logprobs=entries)
        return self._sse("response.function_call_arguments.delta", item_id=self.call_item_id, output_index=0,
                         delta=text)

    def _closed(self, item: dict) -> List[str]:
        if item["type"] == "message":
            part = item["content"][0]
            events = [self._sse("response.output_text.done", item_id=item["id"], output_index=0, content_index=0,
                                text=part["text"], logprobs=part["logprobs"]),
                      self._sse("response.content_part.done", item_id=item["id"], output_index=0, content_index=0,
                                part=part)]
        else:
            events = [self._sse("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                                name=item["name"], arguments=item["arguments"])]
        return events + [self._sse("response.output_item.done", output_index=0, item=item)]

    async def events(self):
        """The stream, in the specification's order: created, in_progress, the item added (a message's content part
        added), its deltas, done events, the item done, then completed or incomplete. A call among several tools
        arrives whole at the end (its name is known only then)."""
        yield self._sse("response.created", response=self.response("in_progress", []))
        yield self._sse("response.in_progress", response=self.response("in_progress", []))
        whole_at_end = self.call is not None and len(self.call.names) > 1
        kind = "message" if self.call is None else "function_call"
        if not whole_at_end:
            opening = self._message("", [], "in_progress") if self.call is None else \
                self._call(self.call.names[0], "", "in_progress")
            for event in self._opened(opening):
                yield event
        text, entries = "", []
        async for event in each(self.handle):
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if event.kind == "error":  # the headers are sent: the error is an event, as OpenAI's
                error = renamed(event_error(event))
                yield self._sse("error", code=error.code, message=error.message, param=error.param)
                return
            text, entries = text + event.text, entries + (event.logprobs or [])
            if (event.text or event.logprobs) and not whole_at_end:
                yield self._delta(kind, event.text, event.logprobs or [])
            if event.finish_reason:
                break
        item = self.item(text, entries, event.finish_reason)
        if whole_at_end:
            for sse in self._opened({**item, **({"content": []} if item["type"] == "message" else {"arguments": ""}),
                                     "status": "in_progress"}):
                yield sse
            yield self._delta(item["type"], item["content"][0]["text"] if item["type"] == "message"
                              else item["arguments"], entries if item["type"] == "message" else [])
        for sse in self._closed(item):
            yield sse
        status = item["status"]
        yield self._sse(f"response.{status}", response=self.response(status, [item], event))
