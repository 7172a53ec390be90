"""One step's picking: each row's token from the step's (B, vocab) logits, by its request's strategy (greedy rows of
a batch in one argmax; sampled rows, best_of, beams and forced rows by their strategy's `pick`), inside its
constraint (structured output: forbidden tokens are -inf for every way of picking), with the log-probabilities its
request wants, and the row each row continues (itself, but for beams). What a request's own parts raise (its
sampler, processors, constraint) or produce (logits through an adapter that are not finite) fails that request
alone; the batch goes on."""

from typing import List, Tuple

import mlx.core as mx

from ..errors import InputError
from .constraints import apply_masks
from .sampling import Picked, log_softmax, rows_token_logprobs, top_logprobs
from .strategies import Row


def not_finite(row: Row) -> InputError:
    """The error of a row whose logits were NaN or infinite (an adapter's overflow): its request ends with it."""
    adapter = row.request.settings.adapter
    if adapter is None:
        return InputError("the model gave logits that are not finite (NaN or infinite)")
    return InputError(f"adapter {adapter!r} gave logits that are not finite (NaN or infinite)", param="adapter")


def pick(rows: List[Row], logits: mx.array, eos_id: int) -> Tuple[Picked, List[int]]:
    """(B, vocab) logits -> each row's token by its request's strategy, with log-probabilities, and the row each
    row continues (itself, but for beams). A batch of greedy rows (the usual case) is one argmax."""
    # Logits that are not finite (an adapter's overflow) end their row's request with an error, not NaN scores.
    # Finite weights give finite logits (Gemma 2 also soft-caps them): only the rows through an adapter look.
    finite = mx.isfinite(logits).all(axis=-1) if any(r.request.settings.adapter for r in rows) else None
    constraints = [r.constraint for r in rows]
    constrained = any(c is not None for c in constraints)
    if constrained:
        # The step runs while the masks are computed on the CPU; forbidden tokens become -inf for every way
        # of picking (greedy, sampled, beams), and the log-probabilities are the constrained distribution's.
        mx.async_eval(logits)
        logits = apply_masks(logits, constraints, lambda i, e: rows[i].strategy.fail(e, rows[i].constraint.field))
    parents = list(range(len(rows)))
    greedy = all(r.strategy.greedy for r in rows)
    k = max(r.request.settings.logprobs or 0 for r in rows)
    # Greedy rows pick by the logits, and those asked for their tokens' log-probabilities alone get them from the
    # logits too: the whole log-softmax is built only where something reads it.
    logprobs = None if greedy and not k else log_softmax(logits)
    if greedy:
        tokens = mx.argmax(logits, axis=-1)
    # Rows given one sampler callable (generate_tokens') are sampled together by it.
    elif (shared := rows[0].request.sampler) is not None and all(r.request.sampler is shared and not r.processors
                                                                for r in rows):
        tokens = shared(logprobs)
    else:
        tokens = [None] * len(rows)
        members = {}
        for i, r in enumerate(rows):
            members.setdefault(r.strategy, []).append((i, r))
        for strategy, mine in members.items():
            try:
                strategy.pick(mine, logits, logprobs, tokens, parents)
            except Exception as e:  # the request's own sampler or processors: it ends, the others go on
                strategy.fail(e, strategy.blame())
                for i, _ in mine:
                    tokens[i], parents[i] = mx.array([eos_id]), i
        tokens = mx.concatenate(tokens)
    for r in rows:
        r.picked += 1
    if constrained:
        advance(rows, parents, tokens.tolist(), [True] * len(rows) if finite is None else finite.tolist())
    wanting = [i for i, r in enumerate(rows) if r.strategy.wants_logprobs]
    picked = Picked(tokens, rows_token_logprobs(logits, logprobs, tokens, wanting), finite=finite)
    if k:
        picked.top_ids, picked.top_values = top_logprobs(logprobs, k)
    return picked, parents


def advance(rows: List[Row], parents: List[int], tokens: List[int], finite: List[bool]) -> None:
    """Each constrained row's grammar takes its token; a beam first takes over its parent's state (a copy
    when the parent goes on too), all before any advances. A row whose logits were not finite ends here."""
    states = [rows[p].constraint if p == j or rows[p].constraint is None else rows[p].constraint.copy()
              for j, p in enumerate(parents)]
    for r, c, t, ok in zip(rows, states, tokens, finite):
        r.constraint = c
        if not ok:
            r.strategy.fail(not_finite(r))
        if c is None or r.strategy.error is not None:
            continue
        try:
            c.advance(t)
        except Exception as e:
            # A beam may be handed a forbidden (-inf) candidate when fewer than 2 * num_beams are allowed: it
            # can never win, and its grammar, now in error, lets it write only <eos>.
            if not (r.strategy.forgiving and isinstance(e, ValueError)):
                r.strategy.fail(e, c.field)
