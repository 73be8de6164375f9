"""The command line, run as a user runs it: ``python -m llama3vision_min ask ...`` in a subprocess.

Every case starts a Python process (about 5 s of imports each), so all of them are
started at once by one module fixture and the tests only read their results.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_image

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "what is this?"
MAX_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    picture = root / "picture.png"
    make_image(size=(45, 31), seed=3).save(picture)  # PNG: lossless, the test reads the same pixels
    fake = root / "notes.png"
    fake.write_text("this is a text file, not a picture\n")
    no_config = root / "no_config"
    shutil.copytree(tiny_dir, no_config)
    (no_config / "config.json").unlink()
    bad_weights = root / "bad_weights"
    shutil.copytree(tiny_dir, bad_weights)
    weights = bad_weights / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    return {"root": root, "picture": picture, "fake": fake, "no_config": no_config,
            "bad_weights": bad_weights, "missing_model": root / "no-such-model",
            "missing_image": root / "no-such-picture.png"}


def _arguments(case, files, tiny_dir):
    """The command line of each case, after ``python -m llama3vision_min``."""
    picture, model = str(files["picture"]), str(tiny_dir)
    greedy = ["--greedy", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    return {
        "answer": ["ask", "--image", picture, QUESTION, *greedy, "--model", model],
        "missing_image": ["ask", "--image", str(files["missing_image"]), QUESTION, *greedy, "--model", model],
        "not_an_image": ["ask", "--image", str(files["fake"]), QUESTION, *greedy, "--model", model],
        "missing_model": ["ask", "--image", picture, QUESTION, *greedy, "--model",
                          str(files["missing_model"])],
        "no_config": ["ask", "--image", picture, QUESTION, *greedy, "--model", str(files["no_config"])],
        "bad_weights": ["ask", "--image", picture, QUESTION, *greedy, "--model", str(files["bad_weights"])],
        "zero_tokens": ["ask", "--image", picture, QUESTION, "--greedy", "--max-new-tokens", "0",
                        "--model", model],
        "no_arguments": [],
    }[case]


SUBPROCESS_CASES = ("answer", "no_arguments", "not_an_image", "no_config")
"""Run for real, in parallel (each costs seconds of imports); every error case also runs in-process."""


@pytest.fixture(scope="module")
def runs(files, tiny_dir):
    """Start the ``SUBPROCESS_CASES`` in parallel; ``{case: CompletedProcess}``."""
    temp = files["root"] / "tmp"  # where a default tiny model would be built: never the shared /tmp
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONIOENCODING": "utf-8",  # a byte-level BPE's noise may decode to any character
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    commands = {case: [sys.executable, "-m", "llama3vision_min", *_arguments(case, files, tiny_dir)]
                for case in SUBPROCESS_CASES}
    processes = {case: subprocess.Popen(command, cwd=files["root"], env=env, encoding="utf-8",
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for case, command in commands.items()}
    results = {}
    for case, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[case] = subprocess.CompletedProcess(commands[case], process.returncode, stdout, stderr)
    return results


def _assert_one_error_line(returncode, stdout, stderr, words):
    assert returncode not in (0, None)
    assert "Traceback" not in stderr + stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), lines[0]
    assert all(word in lines[0] for word in words), lines[0]
    assert stdout.strip() == ""  # no answer, not even a partial one


def test_ask_prints_the_greedy_answer_of_the_model(runs, files, tiny):
    model, tokenizer = tiny
    result = runs["answer"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    with Image.open(files["picture"]) as image:
        ids = model.answer_question(image.copy(), QUESTION, tokenizer, do_sample=False,
                                    max_new_tokens=MAX_NEW_TOKENS)
    assert 0 < len(ids) <= MAX_NEW_TOKENS
    expected = tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert expected, "the tiny model's greedy answer is empty: the comparison would prove little"
    assert result.stdout.strip() == expected


ERROR_CASES = [
    ("missing_image", ["no-such-picture.png"]),
    ("not_an_image", ["notes.png"]),
    ("missing_model", ["no-such-model"]),
    ("no_config", ["config.json"]),
    ("bad_weights", ["bad_weights"]),
]


SUBPROCESS_ERROR_CASES = [c for c in ERROR_CASES if c[0] in SUBPROCESS_CASES]


@pytest.mark.parametrize("case,words", SUBPROCESS_ERROR_CASES, ids=[c[0] for c in SUBPROCESS_ERROR_CASES])
def test_user_errors_print_one_line_and_exit_non_zero(runs, case, words):
    result = runs[case]
    assert result.returncode != -9, "the command hung and was killed"
    _assert_one_error_line(result.returncode, result.stdout, result.stderr, words)


@pytest.mark.parametrize("case,words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_user_errors_in_process(files, tiny_dir, capfd, case, words):
    """``main`` returns the exit status (``__main__`` passes it to ``sys.exit``); an escaping exception
    would be the traceback a user sees."""
    from llama3vision_min.tools.cli import main

    returncode = main(_arguments(case, files, tiny_dir))
    captured = capfd.readouterr()
    _assert_one_error_line(returncode, captured.out, captured.err, words)


def test_zero_new_tokens_is_a_usage_error_as_argparse_reports_it(files, tiny_dir, capfd):
    from llama3vision_min.tools.cli import main

    with pytest.raises(SystemExit) as stop:
        main(_arguments("zero_tokens", files, tiny_dir))
    err = capfd.readouterr().err
    assert (stop.value.code == 2 and err.startswith("usage:")
            and "--max-new-tokens: must be at least 1, got 0" in err)


def test_no_arguments_is_an_argparse_usage_error(runs):
    result = runs["no_arguments"]
    assert result.returncode == 2
    assert result.stderr.startswith("usage:"), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_export_writes_a_llava_folder_with_vllm_names(tiny_dir, tmp_path, capfd):
    """``export`` writes what stock transformers reads: a llava config and vLLM's key names."""
    import json

    from safetensors import safe_open

    from llama3vision_min.tools import cli

    out = tmp_path / "llava"
    assert cli.main(["export", "--out", str(out), "--model", str(tiny_dir), "--vllm-names"]) == 0
    assert capfd.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "full"
    keys = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"} <= keys
    # a second export into the same, now non-empty, folder is refused with one line
    assert cli.main(["export", "--out", str(out), "--model", str(tiny_dir)]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not empty" in err[0]
