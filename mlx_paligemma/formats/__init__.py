"""Checkpoint formats, one module each, below everything that reads or writes checkpoints.

- `mlx`: model folders (Hugging Face and MLX layouts in, MLX out): config, the weight-name map, quantization.
- `atomic`: every file and folder the project writes, whole or not at all.
- `adapters`: LoRA adapter folders (mlx-lm's layout).
- `big_vision`: Google's original `.npz` checkpoints in.
- `hf`: transformers folders out.
"""
