"""OpenAI's function tools on a model that writes no tool calls of its own: a forced call is a constraint.

`tool_choice` "required", or a named function ({"type": "function", "function": {"name": ...}}), makes the answer a
call: the grammar keeps it inside the function's JSON-schema `parameters`, written as compact JSON, and the reply
carries it as `tool_calls` with finish_reason "tool_calls" ("length" when max_tokens cut it). "required" with several
tools lets the grammar choose: the answer is {"name": ..., "arguments": {...}} over the tools, read back into the
call. "auto" (OpenAI's default when tools are given) and "none" are answered in text: PaliGemma cannot decide to call
a tool, so a client that needs a call asks for one.

Every refusal is an InputError naming its field; chat.py answers it as a 400.
"""

import json
import re
import reprlib
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..errors import InputError

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
_COMPACT = {"whitespace_flexible": False}  # llguidance's option: no whitespace between JSON tokens
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_CHOICES = 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


@dataclass
class Call:
    """The call a request forces: one function (its arguments are the answer) or a choice among several."""

    names: List[str]
    schema: dict  # the answer's JSON schema

    def read(self, text: str) -> Optional[Tuple[str, str]]:
        """(name, arguments) of an answer; None for an answer among several tools that is no whole call (cut by
        max_tokens or a stop string)."""
        if len(self.names) == 1:
            return self.names[0], text
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not (isinstance(value, dict) and value.get("name") in self.names and "arguments" in value):
            return None
        return value["name"], json.dumps(value["arguments"], ensure_ascii=False, separators=(",", ":"))


def forced_call(body: dict) -> Optional[Call]:
    """The call that a chat request's `tool_choice` forces among its `tools`, or None for an answer in text."""
    for old in ("functions", "function_call"):  # OpenAI's older form: refused rather than answered in text
        if body.get(old) is not None:
            raise InputError(f"{old} is OpenAI's deprecated form: send tools and tool_choice", old)
    functions, tool_choice = read_tools(body.get("tools")), body.get("tool_choice")
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        if not functions:
            raise InputError('tool_choice "required" needs tools', "tool_choice")
        names = list(functions)
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str)):
        names = [tool_choice["function"]["name"]]
        if names[0] not in functions:
            raise InputError(f"tool_choice names the function {reprlib.repr(names[0])}, which is not among the "
                             f"tools ({', '.join(functions) or 'none given'})", "tool_choice")
    else:
        raise InputError(f"{_CHOICES}, got {reprlib.repr(tool_choice)}", "tool_choice")
    if len(names) == 1:
        return Call(names, {"x-guidance": _COMPACT, **functions[names[0]]})
    # Each function's parameters keep their own "$ref"s: an "$id" makes them a schema resource of their own.
    return Call(names, {"x-guidance": _COMPACT, "anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": name}, "arguments": {"$id": f"urn:tool:{name}", **functions[name]}}}
        for name in names]})


def read_tools(tools: Any) -> Dict[str, dict]:
    """{name: parameters} of OpenAI's [{"type": "function", "function": {"name", "parameters", ...}}]."""
    if tools is None:
        return {}
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InputError(f"tools must be a list of at most {MAX_TOOLS} function tools", "tools")
    functions = {}
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InputError(f"only function tools are served, got {reprlib.repr(kind if kind else tool)}", "tools")
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError('a tool must be {"type": "function", "function": {"name": "...", "parameters": {...}}} '
                             f"with a name of letters, digits, _ and - (at most 64), got {reprlib.repr(function)}",
                             "tools")
        if name in functions:
            raise InputError(f"two tools are named {name!r}", "tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InputError(f"the parameters of tool {name!r} must be a JSON schema object", "tools")
        functions[name] = _NO_PARAMETERS if parameters is None else parameters
    return functions


def param(name: Optional[str]) -> Optional[str]:
    """The request field a constraint's error is about: the server's one json_schema is a forced call's."""
    return "tools" if name == "json_schema" else name


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish(finish_reason: str) -> str:
    """A whole call ends as "tool_calls"; one cut short keeps its reason ("length")."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def message(call: Call, text: str, finish_reason: str) -> Tuple[dict, str]:
    """A chat completion's message and finish reason for an answer to `call`; an answer that is no whole call (see
    Call.read) is given as its text."""
    read = call.read(text)
    if read is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": [entry(call_id(), *read)]}, finish(finish_reason)


def entry(id: str, name: str, arguments: str) -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


class Answer:
    """One streamed choice's answer to a call, as chat completion deltas: one function's arguments stream as they
    come; a choice among several arrives whole at the end (its name is known only then)."""

    def __init__(self, call: Call):
        self.call, self.id, self.text = call, call_id(), ""

    def first(self) -> dict:
        if len(self.call.names) > 1:
            return {"role": "assistant", "content": None}
        return {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **entry(self.id, self.call.names[0],
                                                                                            "")}]}

    def piece(self, text: str) -> Optional[dict]:
        self.text += text
        if len(self.call.names) > 1 or not text:
            return None
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}

    def last(self, finish_reason: str) -> Tuple[Optional[dict], str]:
        """The delta that completes the answer, if any, and the choice's finish reason."""
        if len(self.call.names) == 1:
            return None, finish(finish_reason)
        read = self.call.read(self.text)
        if read is None:
            return {"content": self.text}, finish_reason
        return {"tool_calls": [{"index": 0, **entry(self.id, *read)}]}, finish(finish_reason)
