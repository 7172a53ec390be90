"""Chat messages -> PaliGemma's prompt and images, for a model that is not a chat model.

- The prompt is the text of the last user message (its text parts joined by spaces, stripped).
- The images are those of the latest user message that has any, so a follow-up, a client's re-ask after a
  validation error or its retry after a tool call keeps the conversation's image.
- After the last user message may come a tool round: assistant messages (their tool calls) and tool results. They
  are no part of the prompt. An assistant message last asks to continue it, which PaliGemma cannot do: refused.
- System and developer messages are no part of the prompt either (PaliGemma's prompts are task prefixes such as
  "caption en"); their texts are handed back as `instructions`, where a JSON schema may be read (`schema_in`).

Every refusal is an InputError naming `messages`; chat.py answers it as a 400.
"""

import json
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .. import limits
from ..errors import InputError, check_text

ROLES = ("system", "developer", "user", "assistant", "tool")
INSTRUCTING = ("system", "developer")
SCHEMA_TRIES = 8  # lines starting with "{" tried as a schema


@dataclass
class Conversation:
    prompt: str
    sources: List[str]  # image URLs, in order
    instructions: List[str] = field(default_factory=list)  # the texts of system and developer messages


def refused(message: str) -> InputError:
    return InputError(message, "messages")


def conversation(messages: Any, max_parts: int, max_prompt_bytes: int) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise refused("messages must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise refused("each message must be an object with a role and content")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise refused(f"message {i} has role {reprlib.repr(m.get('role'))}; the roles are {', '.join(ROLES)}")
    turns = [m for m in messages if m["role"] not in INSTRUCTING]
    if not turns or turns[-1]["role"] == "assistant":
        raise refused("PaliGemma is not a chat model: the prompt is the last user message, with the image(s) and "
                      "the prompt text; only tool results may follow it")
    users = [m for m in turns if m["role"] == "user"]
    if not users:
        raise refused("there is no user message: the prompt is the last user message")
    texts, sources = parts(users[-1].get("content"), max_parts)
    for earlier in reversed(users[:-1]):
        if sources:
            break
        sources = parts(earlier.get("content"), max_parts)[1]
    if sum(map(len, texts)) > max_prompt_bytes:  # characters, at most the bytes: refused before encoding
        raise refused(f"the prompt is more than this server's limit of {max_prompt_bytes} bytes")
    prompt = " ".join(texts).strip()
    check_text(prompt, "the prompt")
    if len(prompt.encode("utf-8")) > max_prompt_bytes:
        raise refused(f"the prompt is more than this server's limit of {max_prompt_bytes} bytes")
    if not sources:
        raise refused("PaliGemma needs an image: no user message has an image_url part")
    return Conversation(prompt, sources, [instruction(m.get("content")) for m in messages
                                          if m["role"] in INSTRUCTING])


def parts(content: Any, max_parts: int):
    """A user message's texts and image URLs."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise refused("a user message's content must be a string or a list of content parts")
    if len(content) > max_parts:
        raise refused(f"a user message has {len(content)} content parts; this server takes at most {max_parts}")
    texts, sources = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise refused('an image_url part must be {"type": "image_url", "image_url": {"url": "..."}}')
            sources.append(url)
        else:
            what = f"of type {reprlib.repr(kind)}" if kind is not None else reprlib.repr(part)
            raise refused(f"unsupported content part {what}: use text parts (with a string text) and image_url "
                          "parts")
    return texts, sources


def instruction(content: Any) -> str:
    """A system or developer message's text: a string, or text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise refused("a system or developer message's content must be a string or a list of text parts")


_OBJECT_LINE = re.compile(r"^[ \t]*\{", re.MULTILINE)


def schema_in(instructions: List[str]) -> Optional[dict]:
    """The JSON schema of an object that the instructions show, as instructor's JSON mode and pydantic-ai's
    prompted output write it: the first line starting with "{" (spaces before it allowed) that begins a JSON object
    with "type": "object" and "properties". None when there is none among the first SCHEMA_TRIES such lines. Each
    try reads at most four times the bytes a schema may have (pretty-printed, it is longer than the compact JSON
    that --max-constraint-bytes bounds), so a long text costs no more than that."""
    decoder, tries, window = json.JSONDecoder(), 0, 4 * limits.LIMITS.max_constraint_bytes
    for text in instructions:
        for start in _OBJECT_LINE.finditer(text):
            if tries == SCHEMA_TRIES:
                return None
            tries += 1
            try:
                value, _ = decoder.raw_decode(text[start.end() - 1:start.end() - 1 + window])
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict) and value.get("type") == "object" and isinstance(value.get("properties"),
                                                                                        dict):
                return value
    return None
