"""The package's layout: imports run one way, from the commands down to errors.py, with no cycle; modules stay
readable in one sitting; importing the package prints nothing."""

import ast
import subprocess
import sys
from pathlib import Path

import mlx_paligemma as mp

PACKAGE = Path(mp.__file__).parent
# Floors, bottom first (docs/LAYOUT.md draws them). A module imports only its own floor or lower ones; a command
# imports no other command.
FLOORS = [{"errors", "defaults", "limits", "extras"}, {"models"}, {"processing"}, {"formats"}, {"data"}, {"generation"},
          {"tasks"},          {"training"}, {"api"}, {"cli"}, {"generate", "batch", "evaluate", "lora", "convert", "export", "server"},
          {"__init__", "__main__"}]
COMMANDS = FLOORS[-2]


def floor(top: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if top in names)


def module_name(file: Path) -> str:
    return ".".join(file.relative_to(PACKAGE).with_suffix("").parts)


def imports(file: Path):
    """The package's modules `file` imports (lazy imports included), as dotted names under the package."""
    here = module_name(file).split(".")
    package = here[:-1]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "mlx_paligemma":
                base, node_module = [], node.module.split(".", 1)[1:]
                yield from (".".join(node_module + [a.name]) if not node_module else ".".join(node_module)
                            for a in node.names)
                continue
            else:
                continue
            parts = base + (node.module.split(".") if node.module else [])
            for a in node.names:
                candidate = parts + [a.name]
                is_module = (PACKAGE.joinpath(*candidate).with_suffix(".py").is_file()
                             or PACKAGE.joinpath(*candidate).is_dir())
                yield ".".join(candidate if is_module else parts)


def graph():
    files = [f for f in PACKAGE.rglob("*.py")]
    return {module_name(f): {m for m in imports(f) if m} for f in files}


def test_imports_run_down_the_floors():
    wrong = []
    for source, targets in graph().items():
        top = source.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if floor(other) > floor(top) or (top in COMMANDS and other in COMMANDS and other != top):
                wrong.append(f"{source} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    edges = graph()

    def resolve(name):  # an import of a package means its __init__
        return name if name in edges else f"{name}.__init__"

    state, path, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(resolve(t) for t in edges.get(node, ())):
            if nxt not in edges or nxt == node:
                continue
            if state.get(nxt) == "open" and not nxt.endswith("__init__"):
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, cycles


def test_modules_are_readable_in_one_sitting():
    long = {module_name(f): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) >= 450}
    assert not long, long


def test_import_is_quiet():
    r = subprocess.run([sys.executable, "-c", "import mlx_paligemma"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
