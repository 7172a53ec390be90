"""A token as every surface shows it: its `id`, its `token` (text) and `bytes` as OpenAI's logprobs entries have
them, and a log-probability entry with its alternatives: the same entry in the server's `logprobs.content`, a
dataset line's and `generate --json`'s `logprobs`."""

import re
from typing import List, Optional, Tuple

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def piece(tokenizer, token: int) -> dict:
    """OpenAI's token and bytes of an id: its sentencepiece piece with "\u2581" as a space; a byte-fallback piece
    <0xNN> is that byte (its token "bytes:\\xNN" when it is not a character alone). Special tokens (<eos>, ...)
    print as nothing in the answer: their bytes are null, as OpenAI's for a token without bytes, and so are those
    of ids beyond the tokenizer's pieces (a padded embedding), whose token is empty."""
    special = [name for name, i in tokenizer.specials.items() if i == token]  # <image> may have no piece
    if special:
        return {"token": special[0], "bytes": None}
    text = tokenizer.id_to_piece(token) if 0 <= token < tokenizer.vocab_size else None
    if text is None:
        return {"token": "", "bytes": None}
    byte = _BYTE_PIECE.fullmatch(text)
    if byte:
        value = int(byte.group(1), 16)
        return {"token": chr(value) if value < 128 else f"bytes:\\x{value:02x}", "bytes": [value]}
    text = text.replace("\u2581", " ")
    return {"token": text, "bytes": list(text.encode("utf-8"))}


def logprob_entry(tokenizer, token: int, logprob: float, top: Optional[List[Tuple[int, float]]] = None) -> dict:
    """One token's log-probability: OpenAI's logprobs.content entry (token, bytes, logprob, top_logprobs), each
    token with its id beside its text."""
    return {"id": token, **piece(tokenizer, token), "logprob": logprob,
            "top_logprobs": [{"id": t, **piece(tokenizer, t), "logprob": v} for t, v in top or []]}
