"""Per-step cost of structured output's masks (mlx_paligemma.generation.constraints): microseconds to build the (B, vocab)
mask of a batch, for a JSON schema, a regex and the detect grammar, at batch 1 and 8; with --compare, the mask
cost of llguidance, xgrammar and outlines-core (those installed) on the same byte tables of both tokenizer kinds.

    python benchmarks/constraints.py                                    # tiny fixtures' tokenizers
    python benchmarks/constraints.py --vocab-size 257216                # masks as wide as a full PaliGemma's
    python benchmarks/constraints.py --compare                          # the three libraries, mask alone
    python benchmarks/constraints.py --engine --model tests/fixtures/paligemma2-tiny   # tokens/s, whole engine

Each row walks its grammar for --steps steps, taking a seeded random allowed token each step (never <eos> while
another is allowed), so the masks are those of answers in progress; the figure is the median step. Only the mask
is timed, not the model: the engine computes it beside the decode step. --engine times the whole engine instead:
tokens/s of batches of 1 and 8 prompts, unconstrained and under each form (every row constrained), medians of
--rounds runs after a warm-up; constrained answers may end sooner, so tokens made are counted, not max_tokens.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_paligemma  # noqa: E402,F401  (before mlx: it may load a faster BLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_paligemma.generation.constraints import make_constraint, masks
from mlx_paligemma.processing.processor import PaliGemmaProcessor

TINY = ROOT / "tests" / "fixtures" / "paligemma-tiny"
SCHEMA = {"type": "object", "properties": {
    "store": {"type": "string", "maxLength": 20}, "total": {"type": "number"},
    "items": {"type": "array", "items": {"type": "object", "required": ["name", "price"], "properties": {
        "name": {"type": "string"}, "price": {"type": "number"}}}}}, "required": ["store", "total", "items"]}
REGEX = r"(\d{3}-\d{4}|[a-z]+ [a-z]+), [A-Z][a-z]{2,10}\.?"
FORMS = {"schema": dict(json_schema=SCHEMA), "regex": dict(regex=REGEX),
         "detect": dict(constrain=True, prompt="detect cat ; dog ; coffee cup")}


def processors():
    """The tiny checkpoint's processor from tokenizer.json, and from tokenizer.model alone."""
    out = {"tokenizer.json": PaliGemmaProcessor.from_pretrained(TINY)}
    folder = Path(tempfile.mkdtemp())
    for name in ("tokenizer.model", "preprocessor_config.json"):
        shutil.copy(TINY / name, folder / name)
    out["tokenizer.model"] = PaliGemmaProcessor.from_pretrained(folder)
    return out


def walk(batch, vocab_size, steps, eos, rng):
    """Median seconds of masks() over `steps` steps of `batch` rows."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        allowed = masks(batch, vocab_size)
        mx.eval(allowed)
        times.append(time.perf_counter() - start)
        allowed = np.array(allowed)
        for c, row in zip(batch, allowed):
            ids = np.flatnonzero(row)
            if len(ids) > 1:
                ids = ids[ids != eos]
            c.advance(int(rng.choice(ids)))
    return statistics.median(times)


def ours(args):
    print(f"mask per step, median of {args.steps} steps (us); mask width {args.vocab_size or 1600}")
    print(f"{'tokenizer':16} {'form':8} {'batch 1':>9} {'batch 8':>9}")
    for kind, processor in processors().items():
        vocab_size = args.vocab_size or 1600  # the tiny checkpoints' padded embedding
        for form, kw in FORMS.items():
            figures = []
            for size in (1, 8):
                rng = np.random.default_rng(0)
                batch = [make_constraint(processor, vocab_size, **kw) for _ in range(size)]
                figures.append(walk(batch, vocab_size, args.steps, processor.tokenizer.eos_id, rng) * 1e6)
            print(f"{kind:16} {form:8} {figures[0]:9.1f} {figures[1]:9.1f}")


def table(processor):
    from mlx_paligemma.generation.constraints import vocabulary

    vocab = vocabulary(processor.tokenizer)
    return [vocab.ll.decode_bytes([i]) if not vocab.ll.is_special_token(i) else b"" for i in range(vocab.size)]


def compare(args):
    """The mask alone in each library, on one byte table per tokenizer kind (eos id 1)."""
    def llguidance_run(tokens, form, encode):
        import llguidance as llg
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        class Wrapped:
            eos_token_id, bos_token_id, special_token_ids = 1, 2, [0, 1, 2, 3, 4]

            def __call__(self, text):
                return encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        Wrapped.tokens = tokens
        tok = llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()))
        grammar = (llg.LLMatcher.grammar_from_json_schema(SCHEMA) if form == "schema"
                   else llg.LLMatcher.grammar_from_regex(REGEX))
        m = llg.LLMatcher(tok, grammar, log_level=0)
        bits = allocate_token_bitmask(1, tok.vocab_size)

        def mask():
            fill_next_token_bitmask(m, bits)
            return np.unpackbits(bits.view(np.uint8), bitorder="little")[:len(tokens)].astype(bool)
        return mask, m.consume_token

    def xgrammar_run(tokens, form, encode):
        import xgrammar as xgr

        info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, stop_token_ids=[1])
        compiler = xgr.GrammarCompiler(info, max_threads=1)
        m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)) if form == "schema"
                               else compiler.compile_regex(REGEX))
        bits = xgr.allocate_token_bitmask(1, info.vocab_size)

        def mask():
            m.fill_next_token_bitmask(bits)
            return np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:len(tokens)].astype(bool)
        return mask, m.accept_token

    def outlines_run(tokens, form, encode):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        by_bytes = {}
        for i, b in enumerate(tokens):
            if b and i > 4:
                by_bytes.setdefault(b, []).append(i)
        index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA)) if form == "schema" else REGEX,
                         oc.Vocabulary(1, by_bytes))
        guide = oc.Guide(index)

        def mask():
            out = np.zeros(len(tokens), bool)
            out[guide.get_tokens()] = True
            return out
        return mask, guide.advance

    print(f"mask alone, median us per step over up to {args.steps} steps (compile ms)")
    for kind, processor in processors().items():
        tokens = table(processor)
        for name, run in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run), ("outlines-core", outlines_run)):
            cells = []
            for form in ("schema", "regex"):
                try:
                    start = time.perf_counter()
                    mask, advance = run(tokens, form, processor.tokenizer.encode)
                    compile_ms = (time.perf_counter() - start) * 1e3
                except ImportError as e:
                    cells.append(f"not installed ({e.name})")
                    continue
                rng, times = np.random.default_rng(0), []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    allowed = mask()
                    times.append(time.perf_counter() - start)
                    ids = np.flatnonzero(allowed)
                    ids = ids[ids != 1]
                    if not len(ids):
                        break
                    advance(int(rng.choice(ids)))
                cells.append(f"{form} {statistics.median(times) * 1e6:7.1f} ({compile_ms:.1f})")
            print(f"{kind:16} {name:14} " + "   ".join(cells))


def engine(args):
    from mlx_paligemma.generation.engine import Engine

    model, processor = mlx_paligemma.load(args.model)
    images = sorted((ROOT / "tests" / "fixtures" / "images").glob("*.*"))
    forms = {"none": {}, **FORMS}

    def run(size, kw):
        kw = dict(kw)
        prompt = kw.pop("prompt", "caption en")
        e = Engine(model, processor, batch_size=size)
        for i in range(size):
            e.submit(str(images[i % len(images)]), prompt, max_tokens=args.tokens, **kw)
        made, tic = 0, time.perf_counter()
        with e.running():
            while e.has_work:
                made += len(e.step())
        return made / (time.perf_counter() - tic)

    print(f"engine tokens/s (greedy, up to {args.tokens} tokens a row, median of {args.rounds}), {args.model}")
    print("| constraint | batch 1 | batch 8 |\n|---|---|---|")
    for form, kw in forms.items():
        cells = []
        for size in (1, 8):
            run(size, kw)  # warm-up: compiles the step, builds the vocabulary
            cells.append(statistics.median(run(size, kw) for _ in range(args.rounds)))
        print(f"| {form} | {cells[0]:.1f} | {cells[1]:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="steps per walk (default: 50)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="mask width (default: the tiny checkpoints' 1600; 257216 is a full PaliGemma's)")
    parser.add_argument("--compare", action="store_true", help="compare llguidance, xgrammar, outlines-core")
    parser.add_argument("--engine", action="store_true", help="tokens/s of the engine with and without constraints")
    parser.add_argument("--model", default=str(TINY), help="--engine: the checkpoint (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="--engine: max_tokens a row (default: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="--engine: timed runs a cell (default: 3)")
    args = parser.parse_args()
    engine(args) if args.engine else compare(args) if args.compare else ours(args)


if __name__ == "__main__":
    main()
