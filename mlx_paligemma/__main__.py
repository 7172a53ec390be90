"""`python -m mlx_paligemma`: the commands, one line each; `python -m mlx_paligemma NAME ...` runs one."""

import importlib
import sys

COMMANDS = {
    "generate": "answer a prompt about one or more images",
    "batch": "answer a prompt about every item of a folder, a JSONL file or a dataset; resumable",
    "server": "an OpenAI-compatible server with a web page",
    "evaluate": "score a model on a set by each task's metric, with an HTML report",
    "lora": "fine-tune: LoRA, QLoRA, attention-only or full; --fuse merges adapters",
    "convert": "a Hugging Face checkpoint or big_vision .npz to an MLX folder, optionally quantized",
    "export": "any model this package loads to a transformers folder",
}


def main() -> int:
    if sys.argv[1:2] == ["--version"]:
        from .cli import version_line

        print(version_line())
        return 0
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        from .cli import run_main

        name = sys.argv[1]
        module = importlib.import_module(f"mlx_paligemma.{name}" + (".__main__" if name == "server" else ""))
        sys.argv = [f"python -m mlx_paligemma.{name}"] + sys.argv[2:]
        run_main(lambda: module.main(sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help"):
        print(f"error: no command {sys.argv[1]!r}: choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 1
    print("mlx-paligemma: PaliGemma 1 and 2 in MLX. Commands (each also mlx-paligemma-NAME):\n")
    for name, what in COMMANDS.items():
        print(f"  python -m mlx_paligemma.{name:<9} {what}")
    print("\nEach takes --help and --version. Docs: README.md and docs/ in the repository.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
