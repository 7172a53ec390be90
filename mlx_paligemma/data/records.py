"""The one vocabulary of an answer written down: a dataset line (batch), `generate --json` and evaluation's records
hold the same fields, named as the Python result (GenerationResult) names them:

    text               the answer
    finish_reason      "stop" (<eos> or a stop string) or "length" (max_tokens cut it)
    prompt_tokens      tokens of the prompt, its images' included
    generation_tokens  tokens of the answer
    logprobs           when asked: each token's {"id", "token", "bytes", "logprob", "top_logprobs"}, the server's
                       logprobs.content entry (processing/tokens.py)
    objects            detect/segment answers: their boxes (and masks), as tasks.detection.objects_to_json writes

The server keeps OpenAI's wire format (`message.content`, `usage.completion_tokens`).
"""

from ..processing.tokens import logprob_entry

ANSWER_KEYS = ("text", "finish_reason", "prompt_tokens", "generation_tokens", "logprobs", "objects")
PREVIOUS_NAMES = {"answer": "text", "prediction": "text"}  # the previous release's names, read back for one release


def answer_record(result, tokenizer=None, logprobs: bool = False) -> dict:
    """The record of one answer (an engine Result or a GenerationResult); `logprobs` adds its tokens' entries."""
    out = {"text": result.text, "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
           "generation_tokens": result.generation_tokens}
    if logprobs:
        tops = result.top_logprobs or [[]] * len(result.tokens)  # beams and best_of have no alternatives
        out["logprobs"] = [logprob_entry(tokenizer, t, v, top)
                           for t, v, top in zip(result.tokens, result.logprobs, tops)]
    return out

