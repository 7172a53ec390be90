"""Sampling: a row's (1, vocab) logits -> its next token, and the log-probabilities handed out with tokens.

Log-probabilities are of the model's own distribution: log-softmax in float32 of the final logits (after Gemma 2's
final soft-cap), before temperature, penalties and filters, as transformers' `output_logits` followed by a
log-softmax, and as OpenAI's and vLLM's `logprobs`.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def token_logprobs(logprobs: mx.array, tokens: mx.array) -> mx.array:
    """(B, vocab), (B,) -> (B,): each row's log-probability of its token."""
    return mx.take_along_axis(logprobs, tokens.astype(mx.int32)[:, None], axis=-1)[:, 0]


@mx.compile
def _some_token_logprobs(logits: mx.array, index: mx.array, tokens: mx.array) -> mx.array:
    # A token's logit less its row's logsumexp: the very float32 subtraction log_softmax makes for that entry, without
    # writing the others; compiled, as the step's graph is built each step.
    rows = logits[index].astype(mx.float32)
    mine = mx.take_along_axis(rows, tokens[index].astype(mx.int32)[:, None], axis=-1)[:, 0]
    mine = mine - mx.logsumexp(rows, axis=-1)
    return mx.zeros(tokens.shape, mx.float32).at[index].add(mine)


def rows_token_logprobs(logits: mx.array, logprobs: Optional[mx.array], tokens: mx.array,
                        wanting: List[int]) -> Optional[mx.array]:
    """(B,): the log-probability of each row's token for the rows in `wanting` (zeros that nobody reads for the
    others), or None for none. From `logprobs` where the step has them; else (greedy rows) from the wanting rows'
    logits alone: a softmax over the vocabulary per row and step costs a small model on a CPU a quarter of its decode
    time, so a detect row's scores beside seven captions cost one row's logsumexp, not eight softmaxes."""
    if not wanting:
        return None
    if logprobs is not None:
        return token_logprobs(logprobs, tokens)
    return _some_token_logprobs(logits, mx.array(wanting), tokens)


def top_logprobs(logprobs: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    """(B, vocab) -> the k most likely ids of each row and their log-probabilities, most likely first."""
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def filter_logprobs(logprobs: mx.array, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> mx.array:
    """mlx-lm's filters, in make_sampler's order: what they remove becomes -inf."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    if min_p > 0:
        logprobs = apply_min_p(logprobs, min_p)
    if 0 < top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs


def sample(logprobs: mx.array, temperature: float, key: Optional[mx.array], top_p: float = 1.0,
           min_p: float = 0.0, top_k: int = 0) -> Tuple[mx.array, Optional[mx.array]]:
    """One row's token and its key for the next draw. Greedy at temperature 0; otherwise a draw from the filtered
    distribution with the row's own key instead of MLX's global generator, whose sequence would depend on which
    other rows share the step."""
    if temperature == 0:
        return mx.argmax(logprobs, axis=-1), key
    logprobs = filter_logprobs(logprobs, top_p, min_p, top_k)
    key, draw = mx.random.split(key)
    return mx.random.categorical(logprobs * (1 / temperature), key=draw), key


@dataclass
class Picked:
    """Each row's chosen token, its log-probability and the top alternatives asked for (the batch's widest k),
    still on the device: they are read when the tokens are handed out, after the next step is under way."""

    tokens: mx.array
    logprobs: Optional[mx.array]  # None: no row of the batch wants them
    top_ids: Optional[mx.array] = None
    top_values: Optional[mx.array] = None
    finite: Optional[mx.array] = None  # (B,) whether each row's logits were all finite (None: all were)

    def take(self, index: mx.array) -> "Picked":
        top = (None, None) if self.top_ids is None else (self.top_ids[index], self.top_values[index])
        return Picked(self.tokens[index], None if self.logprobs is None else self.logprobs[index], *top,
                      finite=None if self.finite is None else self.finite[index])

    def all_finite(self) -> mx.array:
        return self.finite if self.finite is not None else mx.ones(self.tokens.shape, mx.bool_)

    def concat(self, other: "Picked") -> "Picked":
        if (self.logprobs is None) != (other.logprobs is None):  # rows that skipped them: zeros nobody reads
            self, other = (Picked(p.tokens, mx.zeros(p.tokens.shape), p.top_ids, p.top_values, p.finite)
                           if p.logprobs is None else p for p in (self, other))
        logprobs = None if self.logprobs is None else mx.concatenate([self.logprobs, other.logprobs])
        finite = None if self.finite is None and other.finite is None else mx.concatenate(
            [self.all_finite(), other.all_finite()])
        width = max(0 if p.top_ids is None else p.top_ids.shape[1] for p in (self, other))
        if not width:
            return Picked(mx.concatenate([self.tokens, other.tokens]), logprobs, finite=finite)

        def padded(p: "Picked"):
            n, have = p.tokens.shape[0], 0 if p.top_ids is None else p.top_ids.shape[1]
            ids = mx.zeros((n, width - have), mx.int32)
            values = mx.full((n, width - have), -mx.inf)
            if have:
                ids = mx.concatenate([p.top_ids.astype(mx.int32), ids], 1)
                values = mx.concatenate([p.top_values, values], 1)
            return ids, values

        (a_ids, a_values), (b_ids, b_values) = padded(self), padded(other)
        return Picked(mx.concatenate([self.tokens, other.tokens]), logprobs,
                      mx.concatenate([a_ids, b_ids]), mx.concatenate([a_values, b_values]), finite)

