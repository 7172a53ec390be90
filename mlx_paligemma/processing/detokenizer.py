"""Text as it grows, one token at a time, for the engine's rows."""

from typing import Callable, List

from .processor import PaliGemmaProcessor


class Detokenizer:
    """Text as it grows, one token at a time, equal to decoding all the tokens at once.

    Only a short window is decoded per token: the tokens not yet handed out, after those of the last piece as
    context (for the tokenizer's leading-space rule; a piece always ends on a whole character), so the cost does
    not grow with the answer. mlx-lm's streaming
    detokenizers do the same but need a transformers tokenizer, which this package does not load."""

    def __init__(self, decode: Callable[[List[int]], str], byte_ids: frozenset = frozenset()):
        self.decode = decode
        self.byte_ids = byte_ids  # <0xNN> pieces: a run of them decodes as a whole, valid UTF-8 or not
        self.tokens: List[int] = []
        self.prefix = self.read = 0  # tokens[prefix:read] is decoded context; tokens[read:] is not yet handed out

    def add(self, token: int) -> str:
        self.tokens.append(token)
        if token in self.byte_ids or not self.decode([token]):
            return ""  # a byte, or an id decoding skips, may sit inside a run of bytes: wait for its end
        text = self.decode(self.tokens[self.prefix:])
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is incomplete: hold it until its last byte arrives
        return self._advance(text)

    def flush(self) -> str:
        """What is still held back, when the answer ends."""
        return self._advance(self.decode(self.tokens[self.prefix:]))

    def _advance(self, text: str) -> str:
        before = self.decode(self.tokens[self.prefix:self.read])
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]


def byte_ids(processor: PaliGemmaProcessor) -> frozenset:
    pieces = (processor.tokenizer.piece_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in pieces if i is not None)
