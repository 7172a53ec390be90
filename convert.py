"""Convert a Hugging Face PaliGemma checkpoint to MLX: `python convert.py --hf-path ID_OR_DIR --mlx-path OUT [-q]`."""

import sys

from mlx_paligemma.convert import main

if __name__ == "__main__":
    sys.exit(main())
