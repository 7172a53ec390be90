"""Beam search as transformers 5.x does it (GenerationMixin._beam_search), for the engine's rows.

A request with num_beams > 1 is num_beams rows of the one batch that share its prefix's keys and values. Each step
the group's (num_beams, vocab) log-probabilities go through `BeamGroup.step`, which picks the next token of every
beam and the beam it continues; the engine then copies that parent's keys and values into the row. The
bookkeeping is transformers', in float32 as there: 2 * num_beams candidates a step, a candidate ending in <eos> (or
reaching max_tokens) joins the finished hypotheses with its score divided by length ** length_penalty (the length
counts the generated tokens, <eos> included), and the search stops when the heuristic (early_stopping False or
"never") or the count of finished hypotheses (early_stopping True) says no running beam can do better.
"""

from typing import List, Tuple, Union

import mlx.core as mx
import numpy as np

from .results import Result

# The "impossible" score. transformers uses -1e9, which a real hypothesis passes under a negative length_penalty
# (a score divided by n ** -20 is far below it) and which then outranks it; -inf is below every score, and orders
# every real one as -1e9 does.
NEG = np.float32(-np.inf)


class BeamGroup:
    def __init__(self, num_beams: int, length_penalty: float, early_stopping: Union[bool, str], eos_id: int,
                 max_steps: int):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.eos_id, self.max_steps = eos_id, max_steps
        self.running: List[List[int]] = [[] for _ in range(num_beams)]
        self.running_logprobs: List[List[float]] = [[] for _ in range(num_beams)]
        # Only the first beam's continuations count at the first step (all beams hold the same prefix).
        self.running_scores = np.full(num_beams, NEG, np.float32)
        self.running_scores[0] = 0
        self.finished: List[List[int]] = [[] for _ in range(num_beams)]
        self.finished_logprobs: List[List[float]] = [[] for _ in range(num_beams)]
        self.finished_scores = np.full(num_beams, NEG, np.float32)
        self.is_finished = np.zeros(num_beams, bool)
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.steps = 0
        self.done = False
        self.emitted = False

    def step(self, logprobs: mx.array) -> Tuple[List[int], List[int]]:
        """(num_beams, vocab) log-probabilities -> the next token of each beam and the beam it continues."""
        nb, vocab = logprobs.shape
        k = 2 * nb  # max(2, 1 + one eos id) * num_beams candidates, so num_beams of them can go on
        flat = (logprobs + mx.array(self.running_scores)[:, None]).reshape(-1)
        idx = mx.argpartition(-flat, kth=k - 1)[:k]
        # Each candidate's own token log-probability, read from the distribution (not running score differences,
        # which float rounding would blur), so a beam's tokens carry their values as sampled tokens do.
        own = logprobs.reshape(-1)[idx]
        values, idx, own = np.array(flat[idx]), np.array(idx), np.array(own)
        order = np.argsort(-values, kind="stable")
        values, idx, own = values[order], idx[order], own[order]
        parents, tokens = idx // vocab, idx % vocab
        self.steps += 1
        n = self.steps
        hits = (tokens == self.eos_id) | (n >= self.max_steps)
        candidates = [self.running[p] + [int(t)] for p, t in zip(parents, tokens)]
        candidate_logprobs = [self.running_logprobs[p] + [float(v)] for p, v in zip(parents, own)]

        # The best num_beams candidates that go on.
        go_on = np.where(hits, NEG, values)
        keep = np.argsort(-go_on, kind="stable")[:nb]
        self.running = [candidates[i] for i in keep]
        self.running_logprobs = [candidate_logprobs[i] for i in keep]
        self.running_scores = go_on[keep]

        # Finished hypotheses: only the top num_beams candidates may join, and only while they can still matter.
        scores = normalised(values, n, self.length_penalty)
        just = hits.copy()
        just[nb:] = False
        if self.is_finished.all() and self.early_stopping is True or not self.improvable:
            just[:] = False
        scores = np.where(just, scores, NEG)
        merged = np.concatenate([self.finished_scores, scores])
        best = np.argsort(-merged, kind="stable")[:nb]
        pool = self.finished + candidates
        flags = np.concatenate([self.is_finished, just])
        self.finished = [pool[i] for i in best]
        self.finished_logprobs = [(self.finished_logprobs + candidate_logprobs)[i] for i in best]
        self.finished_scores, self.is_finished = merged[best], flags[best]

        length = self.max_steps if self.early_stopping == "never" and self.length_penalty > 0 else n
        best_running = normalised(self.running_scores[0], length, self.length_penalty)
        worst = np.where(self.is_finished, self.finished_scores.min(), NEG)
        self.improvable = self.improvable and bool(np.any(best_running > worst))
        all_in = self.is_finished.all() and self.early_stopping is True
        self.done = not self.improvable or all_in or bool(hits.all())
        return [int(tokens[i]) for i in keep], [int(parents[i]) for i in keep]

    def results(self, count: int) -> List[Result]:
        """The best `count` finished hypotheses, best first, and running beams after them where fewer finished (as
        transformers returns its running beams when none finished; here only when scores are not finite)."""
        done = [Result(tokens=list(t), score=float(s), logprobs=list(lp))
                for t, s, lp, f in zip(self.finished, self.finished_scores, self.finished_logprobs, self.is_finished)
                if f and t]
        running = [Result(tokens=list(t), score=float(s), logprobs=list(lp))
                   for t, s, lp in zip(self.running, self.running_scores, self.running_logprobs) if t]
        return (done + running)[:count]


def normalised(scores, length: int, length_penalty: float):
    """scores / length ** length_penalty in float32, as transformers divides. The divisor may overflow to inf
    (length_penalty 50) or underflow to 0 (-50): the quotients then order the hypotheses as the formula says (or
    are NaN, which no comparison prefers), without numpy's warnings."""
    with np.errstate(all="ignore"):
        return scores / np.float32(np.float64(length) ** length_penalty)
