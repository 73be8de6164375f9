"""Shared fixtures: tiny stand-in checkpoints written to disk, loaded through the real loader, and a fake Hub.

The tests never read or write the user's Hugging Face cache: before anything imports huggingface_hub,
``HF_HOME`` points at a private folder of this session, which the ``fake_hub`` fixture fills with
tiny checkpoints under the real repository ids (``tests/fake_hub.py``).
"""

import json
import os
import shutil
import sys
import tempfile

PRIVATE_HF_HOME = tempfile.mkdtemp(prefix="llama3vision-hf-home-")
os.environ["HF_HOME"] = PRIVATE_HF_HOME
for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(variable, None)

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from llama3vision_min import LlamaVision  # noqa: E402
from llama3vision_min.loading import load_tokenizer  # noqa: E402
from llama3vision_min.miniature.stand_ins import build_tiny  # noqa: E402

torch.set_num_threads(2)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(PRIVATE_HF_HOME, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """The Colab rehearsal's timings (tests/repo/test_colab.py), when it ran."""
    rehearsal = sys.modules.get("test_colab")
    if rehearsal is not None and rehearsal.RESULTS:
        terminalreporter.section("Colab rehearsal (no GPU)")
        for what, seconds, detail in rehearsal.RESULTS:
            terminalreporter.write_line(f"{what:48s} {seconds:6.1f} s  {detail}")


@pytest.fixture(scope="session")
def fake_hub():
    """This session's ``HF_HOME``, filled with the fake Hub; skips unless the Hub is switched off.

    Online, a Hub id would resolve to the real repository (gigabytes), so the fake is only used
    with ``HF_HUB_OFFLINE=1`` (which ``make test`` sets).
    """
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("the fake Hub is used only with HF_HUB_OFFLINE=1 (make test sets it)")
    from fake_hub import build_fake_hub

    return build_fake_hub(PRIVATE_HF_HOME)


def offline_env(hf_home, **extra):
    """The environment for a child process on the fake Hub: offline, this session's HF_HOME."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny checkpoint in the -hf layout (tokenizer included)."""
    return build_tiny(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    """A second, slightly larger tiny checkpoint (other widths, layers and patch grid)."""
    return build_tiny(tmp_path_factory.mktemp("small"), size="small", seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """``(LlamaVision, tokenizer)`` loaded from ``tiny_dir``."""
    return LlamaVision.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def small(small_dir):
    return LlamaVision.from_pretrained(small_dir), load_tokenizer(small_dir)


@pytest.fixture(params=["tiny", "small"])
def both_sizes(request, tiny, small):
    """Each tiny size in turn: ``(LlamaVision, tokenizer)``."""
    return {"tiny": tiny, "small": small}[request.param]


def make_image(mode="RGB", size=(37, 23), seed=0):
    """A random picture in any PIL mode (odd sizes by default)."""
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    image = Image.fromarray(rgb, mode="RGB")
    if mode == "I;16":
        return image.convert("L").convert("I").point(lambda v: v * 200).convert("I;16")
    return image.convert(mode)


# -- refusals, each asserted with its words ("fail loudly, lose nothing") ------------------------------------
def refused(call, *words, kind=ValueError):
    """``call()`` raises ``kind`` whose message holds every one of ``words``."""
    with pytest.raises(kind) as error:
        call()
    message = str(error.value)
    assert all(word in message for word in words), message
    return message


def one_error_line(code, captured, *words):
    """Exit status 1, nothing on stdout, one ``error:`` line on stderr holding ``words``."""
    lines = captured.err.strip().splitlines()
    assert code == 1 and captured.out.strip() == "" and len(lines) == 1, (code, captured)
    assert lines[0].startswith("error:") and "Traceback" not in captured.err
    assert all(word in lines[0] for word in words), lines[0]


def usage_error(run, capfd, *words):
    """An argparse usage error: exit status 2, ``usage:`` first, ``words`` in what it printed."""
    with pytest.raises(SystemExit) as stop:
        run()
    err = capfd.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage:") and all(word in err for word in words), err


def shard_checkpoint(folder):
    """Turn the single weights file into a sharded checkpoint: two shards and an index."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name), metadata={"format": "pt"})
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def spoil_config(folder, change):
    """Rewrite ``folder``'s config.json by ``change(config)``."""
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
