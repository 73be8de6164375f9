"""The real path, rehearsed offline: the real repository ids served by the fake Hub (``tests/fake_hub.py``).

What a Colab user runs -- ``from_alpha`` / ``from_pretrained`` with Hub ids, ``LLAMA3VISION_BACKEND=real``,
the command lines, the notebooks, the README's code -- runs here on tiny checkpoints laid out like the real
ones, on the CPU. The GPU itself is not here: device handling is checked by where tensors are sent
(``process_tensors`` test) and by reading the code.
"""

import importlib.util
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import llama3vision_min.loading as loading
from llama3vision_min import LlamaVision, process_tensors
from llama3vision_min.tools.backend import PHOTO, REAL_LLM, REAL_PROJECTOR, REAL_VISION

from conftest import offline_env
from fake_hub import OTHER_LLM, REAL_HF

ROOT = Path(__file__).resolve().parents[1]
REPOS = {REAL_VISION: {"config.json", "model.safetensors", "preprocessor_config.json"},
         REAL_LLM: {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"},
         OTHER_LLM: {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"},
         REAL_PROJECTOR: {"mm_projector.bin"},
         REAL_HF: {"config.json", "model.safetensors", "tokenizer.json"}}
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def alpha(fake_hub):
    return LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR)


@pytest.fixture(scope="module")
def tokenizer(fake_hub):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL_LLM)


# -- the fake Hub itself ------------------------------------------------------------------------
@pytest.mark.parametrize("repo_id", sorted(REPOS))
def test_fake_hub_is_laid_out_as_huggingface_hub_caches_a_download(fake_hub, repo_id):
    from huggingface_hub import snapshot_download

    repo = Path(fake_hub) / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = (repo / "refs" / "main").read_text()
    snapshot = repo / "snapshots" / commit
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert REPOS[repo_id] <= {path.name for path in snapshot.iterdir()}
    for path in snapshot.iterdir():  # every file a link into blobs/, as huggingface_hub writes it
        assert path.is_symlink() and path.resolve().parent == (repo / "blobs").resolve()
    assert Path(snapshot_download(repo_id)) == snapshot  # found offline, under the real id


def test_fake_checkpoints_hold_what_the_real_ones_hold(fake_hub):
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    siglip = json.loads(Path(hf_hub_download(REAL_VISION, "config.json")).read_text())
    assert siglip["model_type"] == "siglip" and "text_config" in siglip  # the whole SigLIP, both towers
    with safe_open(hf_hub_download(REAL_VISION, "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"logit_scale", "logit_bias"} <= keys and any(k.startswith("text_model.") for k in keys)
    generation = json.loads(Path(hf_hub_download(REAL_LLM, "generation_config.json")).read_text())
    assert generation["top_p"] == 0.9 and generation["max_length"] == 4096 and len(generation["eos_token_id"]) == 2
    projector = torch.load(hf_hub_download(REAL_PROJECTOR, "mm_projector.bin"), weights_only=True)
    assert sorted(projector) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    hf = json.loads(Path(hf_hub_download(REAL_HF, "config.json")).read_text())
    assert hf["model_type"] == "llamavision" and {"text_config", "vision_config", "auto_map"} <= set(hf)


# -- loading the real ids -----------------------------------------------------------------------
def test_alpha_form_loads_from_the_hub_ids_where_and_as_chosen(alpha, tokenizer):
    device = loading.choose_device()  # the GPU when there is one, else the CPU
    assert alpha.device.type == device.type
    # one dtype for the whole model, chosen from the LLM's stored bfloat16: float16 on a GPU, never on a CPU
    expected = loading.choose_dtype(device, torch.bfloat16)
    assert {p.dtype for p in alpha.parameters()} == {expected}
    assert device.type == "cuda" or expected in (torch.bfloat16, torch.float32)
    ids = alpha.answer_question(Image.open(PHOTO), "what is this?", tokenizer, do_sample=False, max_new_tokens=4,
                                min_new_tokens=4)
    assert ids.shape == (4,)


def test_hf_form_loads_from_the_hub_id_and_a_float16_checkpoint_leaves_float16_on_a_cpu(fake_hub, monkeypatch):
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    with safe_open(hf_hub_download(REAL_HF, "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16  # stored as the real one
    for computes_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_computes_bfloat16", lambda: computes_bf16)
        model = LlamaVision.from_pretrained(REAL_HF)
        assert model.device.type == "cpu" and {p.dtype for p in model.parameters()} == {expected}
    assert LlamaVision.from_pretrained(REAL_HF, dtype=torch.float16).text_model.dtype == torch.float16  # if asked


@pytest.mark.parametrize("stored, device, bf16, expected", [
    (torch.float16, "cpu", True, torch.bfloat16), (torch.float16, "cpu", False, torch.float32),
    (torch.bfloat16, "cpu", False, torch.float32), (torch.float32, "cpu", True, torch.float32),
    (torch.float32, "cuda", False, torch.float16), (torch.bfloat16, "cuda:0", True, torch.float16)])
def test_dtype_choice(monkeypatch, stored, device, bf16, expected):
    monkeypatch.setattr(loading, "cpu_computes_bfloat16", lambda: bf16)
    assert loading.choose_dtype(device, stored) == expected


class Heard(logging.Handler):
    """Collects what transformers logs (its own handler writes to a stderr that pytest holds elsewhere)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_both_forms_generate_with_the_same_defaults_and_quietly(fake_hub, tokenizer, recwarn):
    """Llama 3's generation_config (top_p 0.9, max_length 4096) no longer leaks into the alpha form; nothing
    warns about max_length, and SigLIP's unused text tower is neither loaded nor reported."""
    heard, logger = Heard(), logging.getLogger("transformers")
    logger.addHandler(heard)
    try:
        hf = LlamaVision.from_pretrained(REAL_HF)
        fresh = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR)
        fresh.answer_question(Image.open(PHOTO), "what is this?", tokenizer, max_new_tokens=3)
    finally:
        logger.removeHandler(heard)
    assert fresh.text_model.generation_config.to_diff_dict() == hf.text_model.generation_config.to_diff_dict()
    assert fresh.text_model.generation_config.top_p in (None, 1.0)
    assert fresh.text_model.generation_config.max_length in (None, 20)  # the library default, not 4096
    said = "\n".join(heard.messages + [str(warning.message) for warning in recwarn])
    for noise in ("max_length", "max_new_tokens", "LOAD REPORT", "UNEXPECTED", "text_model."):
        assert noise not in said, (noise, said[-2000:])


def test_process_tensors_sends_the_ids_to_the_embedding_layers_device():
    """On a GPU the ids from ``tokenizer_image_token`` (CPU) must meet the embedding where it lives; the meta
    device stands in for the GPU here: the ids the embedding receives must be on it."""
    seen = []

    class Recording(torch.nn.Embedding):
        def forward(self, ids):
            seen.append(ids.device)
            return super().forward(ids)

    embedding = Recording(10, 4, device="meta")
    ids = torch.tensor([[1, 2, -200, 3]])  # on the CPU, as the tokenizer gives them
    embeds, mask = process_tensors(ids, torch.empty(1, 5, 4, device="meta"), embedding)
    assert seen == [torch.device("meta")] * 2 and embeds.shape == (1, 8, 4) and mask.device.type == "meta"


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes is not installed (pip install 'llama3vision-min[quant]')")
def test_real_model_in_4bit_on_a_cpu(fake_hub, tokenizer):
    model = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, load_in_4bit=True)
    assert model.text_model.is_quantized and model.device.type == "cpu"
    assert model.answer_question(Image.open(PHOTO), "what is this?", tokenizer, do_sample=False,
                                 max_new_tokens=3, min_new_tokens=3).shape == (3,)


# -- the notebooks' backend and the command lines --------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real backend loads in 4-bit on it")
def test_real_backend_runs_on_a_cpu(fake_hub):
    from llama3vision_min.tools.backend import load_backend

    backend = load_backend("real")
    assert backend.name == "real" and "on the CPU" in backend.description and backend.model.device.type == "cpu"
    assert not getattr(backend.model.text_model, "is_quantized", False)  # 4-bit only on a GPU, or when asked


def _cli(*argv):
    from llama3vision_min.tools.cli import main

    return main(list(argv))


def test_cli_alpha_form_answers_and_names_its_parts(fake_hub, capsys):
    assert _cli("ask", "--image", str(PHOTO), "what is this?", "--llm", REAL_LLM, "--greedy",
                "--max-new-tokens", "3") == 0
    assert capsys.readouterr().out.strip()
    assert _cli("ask", "--image", str(PHOTO), "what is this?", "--llm", OTHER_LLM, "--vision", REAL_VISION,
                "--projector", REAL_PROJECTOR, "--dtype", "float32", "--device", "cpu", "--greedy",
                "--max-new-tokens", "3") == 0
    assert _cli("ask", "--image", str(PHOTO), "what is this?", "--model", REAL_HF, "--max-new-tokens", "3") == 0


def test_cli_places_the_model_as_told(fake_hub):
    from llama3vision_min.tools import cli

    args = cli._parser().parse_args(["ask", "q", "--image", "x", "--llm", REAL_LLM, "--dtype", "float32"])
    model, _ = cli._load_model(args)
    assert model.device.type == "cpu" and {p.dtype for p in model.parameters()} == {torch.float32}
    args = cli._parser().parse_args(["ask", "q", "--image", "x", "--model", "mini", "--dtype", "bfloat16"])
    assert cli._load_model(args)[0].text_model.dtype == torch.bfloat16


@pytest.mark.parametrize("argv, words", [
    (["--model", "mini", "--llm", REAL_LLM], "give one"),
    (["--vision", REAL_VISION], "give --llm too"),
    (["--load-in-4bit"], "needs the alpha form"),
    (["--device", "cuda"], "torch sees none"),
    (["--device", "tpu-please"], "is not a device"),
    (["--llm", "nobody/no-such-llm"], "could not load model 'nobody/no-such-llm'"),
])
def test_cli_refuses_what_does_not_go_together_in_one_line(fake_hub, capsys, argv, words):
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("there is a GPU")
    assert _cli("ask", "--image", str(PHOTO), "what is this?", *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and words in err, err


def test_stage1_trial_runs_on_the_cpu_with_the_real_ids(fake_hub, tmp_path):
    """The trainer's command line with its defaults (the real ids), in a process of its own (accelerate's
    state is one per process)."""
    from llama3vision_min.loading import load_projector

    data = Path(fake_hub) / "LLaVA-Pretrain"
    done = subprocess.run([sys.executable, "-m", "llama3vision_min.training.stage1",
                           "--data", str(data / "blip_laion_cc_sbu_558k.json"), "--images", str(data / "images"),
                           "--out", str(tmp_path), "--max-steps", "2", "--per-device-batch", "4",
                           "--global-batch", "8", "--num-workers", "0"],
                          env=offline_env(fake_hub), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 updates" in done.stdout, done.stderr[-3000:]
    assert "no GPU: training on the CPU" in done.stderr or torch.cuda.is_available()
    projector = load_projector(tmp_path / "mm_projector.safetensors")
    assert projector.mm_hidden_size == 32 and projector.hidden_size == 64  # the fake SigLIP and Llama widths


# -- every notebook, and the README's code, on the real path ------------------------------------------
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_top_to_bottom_on_the_real_backend(fake_hub, path, tmp_path, monkeypatch):
    """LLAMA3VISION_BACKEND=real against the fake Hub: every cell runs (the stored outputs stay the offline ones)."""
    import nbformat
    from nbclient import NotebookClient

    for key, value in offline_env(fake_hub, LLAMA3VISION_BACKEND="real",
                                  LLAVA_PRETRAIN=str(Path(fake_hub) / "LLaVA-Pretrain")).items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "backend: real" in text and ("on the CPU" in text or torch.cuda.is_available())


def readme_real_blocks():
    """The README's Python blocks that load the real model (they name a qresearch repository)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [block for block in blocks if "qresearch/" in block]


def test_readme_has_real_model_code_to_run():
    assert len(readme_real_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(readme_real_blocks())))
def test_readme_code_for_the_real_model_runs_on_the_fake_hub(fake_hub, tmp_path, index):
    block = readme_real_blocks()[index]
    if "load_in_4bit=True" in block and not HAS_BITSANDBYTES:
        pytest.skip("this block loads in 4-bit: bitsandbytes is not installed")
    Image.open(PHOTO).save(tmp_path / "picture.jpg")
    script = textwrap.dedent(block) + "\nprint('ran to the end')\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=offline_env(fake_hub),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ran to the end" in done.stdout, done.stderr[-3000:]
