"""One convention on every surface: defaults from defaults.py shown in --help, usage lines as the command is typed,
neighbours' forms (transformers' processor keywords, mlx-vlm's argument order) accepted where unambiguous, and
anything else one InputError line that names the right form."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma import defaults

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CHELSEA = str(FIXTURES / "images" / "chelsea.jpg")
COMMANDS = ["generate", "batch", "lora", "evaluate", "convert", "export", "server"]


@pytest.fixture(scope="module")
def tiny():
    return mp.load(str(FIXTURES / "paligemma2-tiny"))


def test_processor_return_tensors_np_and_padding(tiny):
    _, processor = tiny
    as_mx = processor(images=CHELSEA, text=["caption en", "answer en what is this?"])
    as_np = processor(images=CHELSEA, text=["caption en", "answer en what is this?"], return_tensors="np",
                      padding="longest")
    assert set(as_np) == set(as_mx)
    for k in as_mx:
        assert isinstance(as_np[k], np.ndarray)
        np.testing.assert_array_equal(as_np[k], np.array(as_mx[k]))


@pytest.mark.parametrize("keywords, names", [
    ({"return_tensors": "pt"}, 'return_tensors="mlx"'),
    ({"padding": "max_length"}, 'padding="longest"'),
    ({"max_length": 8}, "known keywords: images, text, suffix, return_tensors, padding"),
])
def test_processor_other_keywords_are_one_line(tiny, keywords, names):
    _, processor = tiny
    with pytest.raises(mp.InputError) as e:
        processor(images=CHELSEA, text="caption en", **keywords)
    assert names in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("call", ["generate", "stream_generate", "batch_generate"])
@pytest.mark.parametrize("given, meant", [("temp", "temperature"), ("max_new_tokens", "max_tokens"),
                                          ("do_sample", "temperature"), ("top_pp", "top_p")])
def test_misspelt_keyword_is_one_line_naming_the_one_meant(tiny, call, given, meant):
    """Names from transformers, mlx-lm and mlx-vlm, and typos, get a did-you-mean, not a list of every keyword."""
    model, processor = tiny
    with pytest.raises(mp.InputError) as e:
        if call == "batch_generate":
            mp.batch_generate(model, processor, [CHELSEA], ["caption en"], **{given: 1})
        else:
            list(getattr(mp, call)(model, processor, CHELSEA, "caption en", **{given: 1}) or [])
    message = str(e.value)
    assert message.startswith(f"{call}() got an unknown keyword {given}: did you mean {meant}")
    assert "\n" not in message and e.value.param == given


def test_mlx_vlm_order(tiny):
    model, processor = tiny
    ours = mp.generate(model, processor, images=CHELSEA, prompt="caption en", max_tokens=6).text
    assert mp.generate(model, processor, "caption en", image=CHELSEA, max_tokens=6).text == ours
    with pytest.raises(mp.InputError, match="give the images once"):
        mp.generate(model, processor, CHELSEA, "caption en", image=CHELSEA, max_tokens=6).text


def test_api_defaults_are_defaults_py():
    import inspect

    for f in (mp.generate, mp.stream_generate, mp.batch_generate):
        assert inspect.signature(f).parameters["max_tokens"].default == defaults.MAX_TOKENS
        assert inspect.signature(f).parameters["temperature"].default == defaults.TEMPERATURE
    assert inspect.signature(mp.batch_generate).parameters["batch_size"].default == defaults.BATCH_SIZE


def help_of(command: str) -> str:
    r = subprocess.run([sys.executable, "-m", f"mlx_paligemma.{command}", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_names_the_command_as_typed(command):
    text = help_of(command)
    assert text.startswith(f"usage: python -m mlx_paligemma.{command} ")
    assert ".py" not in text.split(" [")[0] and "__main__" not in text
    assert "(default: None)" not in text


def test_generate_help_shows_every_default():
    text = help_of("generate")
    for option, value in [("--max-tokens", defaults.MAX_TOKENS), ("--temperature", defaults.TEMPERATURE),
                          ("--top-p", defaults.TOP_P), ("--top-k", defaults.TOP_K), ("--min-p", defaults.MIN_P),
                          ("--repetition-context-size", defaults.REPETITION_CONTEXT_SIZE)]:
        # The option's help, after its aliases (`--temperature TEMPERATURE, --temp TEMPERATURE`).
        found = re.search(rf"(?<= ){option} [A-Z_]+(?:, --[\w-]+ [A-Z_]+)* (.*?)(?= --|$)", text)
        assert found and found.group(1).rstrip().endswith(f"(default: {value})"), (option, text[:200])
    assert "--prompt PROMPT" in text and "[--prompt" not in text  # required, never silently "caption en"


def test_generate_json_keeps_the_answer(tmp_path):
    import json

    args = [sys.executable, "-m", "mlx_paligemma.generate", "--model", str(FIXTURES / "paligemma2-tiny"),
            "--image", CHELSEA, CHELSEA, "--max-tokens", "4", "--json"]
    caption = subprocess.run(args + ["--prompt", "caption en"], capture_output=True, text=True, timeout=300)
    assert caption.returncode == 0, caption.stderr
    out = json.loads(caption.stdout)
    counts = {"finish_reason", "prompt_tokens", "generation_tokens"}
    assert set(out) == {"text"} | counts and isinstance(out["text"], str) and out["text"]
    # 4 tokens asked and made (no <eos> among them on this random model); the prompt: 2 images of 16 tokens (the
    # tiny checkpoint's image_seq_length), <bos>, and "caption en\n" in 3 tokens.
    assert out["finish_reason"] == "length" and out["generation_tokens"] == 4
    assert out["prompt_tokens"] == 2 * 16 + 1 + 3
    detect = subprocess.run(args + ["--prompt", "detect cat"], capture_output=True, text=True, timeout=300)
    assert detect.returncode == 0, detect.stderr
    assert set(json.loads(detect.stdout)) == {"text", "objects"} | counts
