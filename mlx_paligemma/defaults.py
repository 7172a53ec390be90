"""The defaults of generation settings, the one place every surface (API, command lines, server) takes them from.

256 tokens, as mlx-lm's and mlx-vlm's command lines: PaliGemma's answers end with <eos> well before that, and a
detect/segment answer of several objects (4 + 16 tokens and a label each) still fits.
"""

MAX_TOKENS = 256
TEMPERATURE = 0.0  # greedy
TOP_P = 1.0  # off
TOP_K = 0  # off
MIN_P = 0.0  # off
REPETITION_CONTEXT_SIZE = 20  # mlx-lm's
BATCH_SIZE = 8  # rows sharing each decode step on the batch surfaces (batch_generate, batch CLI, evaluate)
NUM_BEAMS = 1  # beam search off; transformers' defaults for the rest
LENGTH_PENALTY = 1.0
EARLY_STOPPING = False
BEST_OF = 1  # big_vision's best_of_n off
LOGPROBS = None  # None: no log-probabilities (greedy rows skip them); 0: each token's own; k: and k alternatives
MIN_SCORE = 0.0  # detected objects kept whatever their score (the mean probability of their box and label tokens)
