"""The limits on what users hand in, the one place every surface takes them from: each bounds a cost (memory, time)
before the work starts. The server's flags set the structured-output, image-decoding and request-size ones
(`configure`, at start-up; docs/SERVER.md lists the flags); docs/ERRORS.md says what each refusal reads.
"""

from dataclasses import dataclass, replace

MiB = 1 << 20

# Files read whole (config, index and schema files; COCO annotation files): regular files only, at most this big.
MAX_JSON_FILE_BYTES = 64 * MiB
MAX_SCHEMA_FILE_BYTES = 1 * MiB  # --json-schema FILE
MAX_ANNOTATION_BYTES = 1024 * MiB  # COCO instances_*.json (train2017's is 448 MB)
MAX_LINE_BYTES = 4 * MiB  # one line of a JSONL data set; a longer line is that item's error
# A server request body's JSON, counted before it is parsed (server/body.py): values (each up to ~130 bytes once
# built, so ~7 MB at most) and nesting. Far above a real request's: 10,000 `choices`, a 1 MiB schema, long chats.
MAX_JSON_VALUES = 50_000
MAX_JSON_DEPTH = 100
# An adapter folder's path as given (formats.adapters.read_adapter): far beyond any real one, short of the 4,096 bytes
# of Linux's PATH_MAX, so a longer one is one line naming the path, not the OS's "File name too long".
MAX_ADAPTER_PATH_CHARS = 1024


@dataclass(frozen=True)
class Limits:
    # Structured output: checked before the grammar is compiled...
    max_choices: int = 10_000  # strings in `choices`
    max_constraint_bytes: int = 1 * MiB  # UTF-8 bytes of a regex, of the choices together, of a schema's JSON
    # ... then while it compiles (llguidance's parser limits) ...
    max_grammar_size: int = 200_000  # symbols of the compiled grammar (llguidance's default 500,000)
    max_lexer_states: int = 50_000  # lexer states it may build, ~1-2 kB each (llguidance's default 250,000)
    # Work building a regex's first expressions (~50 a microsecond; llguidance's default 1,000,000): at 100,000 a
    # regex such as ((a{100}){100}){100} fails in well under a second instead of taking 13 s over its first mask,
    # and usual grammars (10,000 choices, a 60-field schema, the detect grammar) are untouched.
    initial_lexer_fuel: int = 100_000
    compile_seconds: float = 2.0  # wall time to compile a grammar and take its first step
    # ... and at every step: the work of one token mask, bounded by llguidance (its defaults: about 15 ms and
    # 2.5 ms at most) and measured on the second mask (a usual grammar's takes well under a millisecond).
    step_lexer_fuel: int = 200_000
    step_max_items: int = 50_000
    mask_seconds: float = 0.1
    # The server's image decoding, all requests together: the bytes that the images decoding at one time may take
    # (each weighed from its header before a pixel is decoded; one that alone weighs more is refused).
    decode_budget_bytes: int = 400 * 10**6
    # A request of several rows (n, best_of, num_beams): rows x (prompt tokens + max_tokens, within the context),
    # the positions of keys and values it holds at its end, over which each of its decode steps attends (its
    # prefill, shared by its rows, is of the prompt once). Half of what a batch of 8 rows holds at the full context
    # of 8,192: n=8 on a 7,300-token prompt is refused, n=8 at 448 px (1,024 image tokens) with 1,024 new tokens not.
    max_request_tokens: int = 32_768
    # Adapters (formats.adapters.read_adapter, models.adapters.add_adapter; the flags --max-adapter-rank and
    # --max-adapter-bytes of the commands that load them and the server): the rank of a LoRA factor, which every
    # row of a batch pays at each adapted layer once the adapter is loaded beside the base (base rows too: they
    # multiply the zero slot at the padded rank); and the bytes of an adapter's factors, and of the adapters' stacks
    # beside one base together (each layer's slots padded to its largest rank). docs/ADAPTERS.md has what they allow.
    max_adapter_rank: int = 256
    max_adapter_bytes: int = 2048 * MiB


LIMITS = Limits()


def configure(**changes) -> Limits:
    """Set some limits for the whole process (the server's flags, at start-up); returns the new limits."""
    global LIMITS
    LIMITS = replace(LIMITS, **changes)
    return LIMITS
