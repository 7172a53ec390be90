"""What a new user meets first: the OpenBLAS line at import, a mistyped model folder, --version on every command."""

import importlib
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import mlx_paligemma as mp
from mlx_paligemma.__main__ import COMMANDS, main as list_main
from conftest import FIXTURES

ROOT = Path(__file__).parent.parent

# Runs before the package is imported: dlopen of OpenBLAS fails as on a machine without it.
NO_OPENBLAS = """
import ctypes, sys
class CDLL(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if name and "openblas" in str(name):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = CDLL
"""


def python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != mp.QUIET_BLAS}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**environ, **env})


linux_cpu = pytest.mark.skipif(sys.platform != "linux", reason="the OpenBLAS line is for Linux's CPU backend")


@linux_cpu
@pytest.mark.parametrize("first", ["", "import mlx.core\n"], ids=["package first", "mlx first"])
def test_no_openblas_is_one_line_naming_the_package(first):
    r = python(NO_OPENBLAS + first + "import mlx_paligemma")
    assert r.returncode == 0 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mlx_paligemma: no OpenBLAS found")
    assert "apt-get install libopenblas0-pthread" in lines[0] and f"{mp.QUIET_BLAS}=1" in lines[0]


@linux_cpu
def test_a_command_says_it_once():
    # `python -m mlx_paligemma.generate` imports its module twice (as the package's and as __main__).
    r = python(NO_OPENBLAS + "import runpy; sys.argv = ['generate', '--version']\n"
               "runpy.run_module('mlx_paligemma.generate', run_name='__main__', alter_sys=True)")
    assert r.returncode == 0 and r.stdout.startswith("mlx-paligemma ")
    assert len(r.stderr.splitlines()) == 1 and "libopenblas0-pthread" in r.stderr


def test_the_suite_silences_it_by_the_same_name():
    assert mp.QUIET_BLAS in os.environ  # tests/conftest.py: each test's own commands print no such line


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_line_can_be_silenced(value):
    r = python(NO_OPENBLAS + "import mlx_paligemma", **{mp.QUIET_BLAS: value})
    assert r.returncode == 0 and r.stderr == ""


def test_never_on_macos():
    r = python(NO_OPENBLAS + "sys.platform = 'darwin'\nimport mlx_paligemma")
    assert r.returncode == 0 and r.stderr == ""


# A model path that can only be local is reported as a missing folder; the hub is never asked.

@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub

    def download(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)


@pytest.mark.parametrize("name", ["./my-modle", "/path/that/does/not/exist", "~/no-such-model-here", "my-modle",
                                  "models/my-modle", "a/b/c", "../my-modle"])
def test_a_mistyped_folder_is_a_missing_local_folder(name, no_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # an existing parent makes `models/my-modle` a path
    with pytest.raises(mp.InputError) as e:
        mp.load(name)
    assert str(e.value) == f"local model folder not found: {name}"


def test_a_file_is_not_a_model_folder(no_hub, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(mp.InputError, match="model.safetensors is a file, not a model folder"):
        mp.load(str(tmp_path / "model.safetensors"))


def test_a_hub_id_the_hub_refuses_names_both_places(monkeypatch, tmp_path):
    import huggingface_hub

    def download(*args, **kwargs):
        raise OSError("404 Client Error: Repository Not Found\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mp.InputError) as e:
        mp.load("someone/my-modle")
    assert str(e.value) == ("no local folder someone/my-modle, and the Hugging Face hub does not give it: "
                            "404 Client Error: Repository Not Found")


def test_the_command_line_says_the_same(no_hub, capsys):
    from mlx_paligemma.generate import main

    assert main(["--model", "./my-modle", "--image", str(FIXTURES / "images" / "chelsea.jpg"),
                 "--prompt", "caption en"]) == 1
    assert capsys.readouterr().err == "error: local model folder not found: ./my-modle\n"


# --version: every command, from the installed package's metadata.

def test_the_version_is_the_metadata_one():
    declared = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert mp.__version__ == metadata.version("mlx-paligemma") == declared


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_version(name, capsys):
    module = importlib.import_module(f"mlx_paligemma.{name}" + (".__main__" if name == "server" else ""))
    with pytest.raises(SystemExit) as e:
        module.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"mlx-paligemma {mp.__version__}\n"


def test_the_command_list_has_version(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m mlx_paligemma", "--version"])
    assert list_main() == 0
    assert capsys.readouterr().out == f"mlx-paligemma {mp.__version__}\n"


# Every figure in the docs has its command and date, and docs/MEASURED.md lists it.

# A measured figure: a rate or a time per step (`1.46 tokens/s`, `30-150 us`), a ratio (`0.42x greedy's`; not a
# threshold, `0.9x of`, or a test's bound, `about 1.5x:`), or a table row with two cells or more that are numbers
# alone (`| 0.50 | **2.92x** |`).
RATE = re.compile(r"\d\s?(?:tokens/s|tok/s|images/s|items/s|steps/s|us)\b|\d\.\d+x\b(?! of|:)")
NUMBER_CELL = re.compile(r"^\**[-+]?\d[\d.,]*(?:e[-+]?\d+)?x?\**(?: \([^)]*\))?(?: [\w/]+)?$")
COMMAND = re.compile(r"`python [^`]+`|`[^`]*benchmarks/[^`]+`")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def sections(page: Path):
    """(heading, its GitHub anchor, its prose and table lines) of each section, fenced blocks left out: a shown
    output's speeds are not measurements."""
    from test_docs import FENCE

    found, heading, lines, fenced = [], page.name, [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line) or fenced and line.startswith("```"):
            fenced = not fenced
        elif fenced:
            continue
        elif line.startswith("#"):
            found.append((heading, lines))
            heading, lines = line.lstrip("#").strip(), []
        else:
            lines.append(line)
    found.append((heading, lines))
    return [(h, re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-"), ls) for h, ls in found]


def measured(lines) -> list:
    rows = [line for line in lines if line.startswith("|")
            and sum(bool(NUMBER_CELL.match(cell.strip())) for cell in line.strip().strip("|").split("|")) >= 2]
    return [line for line in lines if RATE.search(line)] + rows


def test_the_figure_rule_finds_figures():
    assert measured(["8 clients 984-1429 tokens/s", "made 0.33x greedy's tokens/s", "| batch 8 | 1.46 | **2.92x** |",
                     "a mask costs 30-150 us per row"]) != [] and len(measured(["a", "b"])) == 0
    assert measured(["a model larger than 0.9x of that set", "bounds about 1.5x: `FLOAT_BOUNDS`",
                     "| `--grad-clip` | 1.0 | clipping |",
                     "| `--top-p` | 1.0, 0, 0.0 | filters |"]) == []


def test_every_figure_has_its_command_and_date_and_is_listed():
    from test_docs import PAGES

    listed = (ROOT / "docs" / "MEASURED.md").read_text()
    failures = []
    for page in PAGES:
        for heading, anchor, lines in sections(page):
            figures = measured(lines)
            if not figures:
                continue
            text = "\n".join(lines)
            where = f"{page.name} # {heading} ({figures[0].strip()[:60]})"
            if not COMMAND.search(text) or not DATE.search(text):
                failures.append(f"{where}: give the command that made it and its date")
            if page.name != "MEASURED.md" and f"{page.name}#{anchor})" not in listed:
                failures.append(f"{where}: list it in docs/MEASURED.md as ({page.name}#{anchor})")
    assert not failures, "\n".join(failures)
