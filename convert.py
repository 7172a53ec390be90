"""Convert a PaliGemma checkpoint to MLX: `python convert.py --hf-path ID_OR_DIR_OR_NPZ --mlx-path OUT [-q]`."""

import sys

from mlx_paligemma.convert import main

if __name__ == "__main__":
    sys.exit(main())
