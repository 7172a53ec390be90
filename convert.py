"""Convert a PaliGemma checkpoint to MLX: `python convert.py --model ID_OR_DIR_OR_NPZ --output OUT [-q]`."""

from mlx_paligemma.cli import run_main
from mlx_paligemma.convert import main

if __name__ == "__main__":
    run_main(main)  # as `python -m mlx_paligemma.convert`: one error line, never a traceback
