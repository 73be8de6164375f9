"""The notebooks' backend: one variable overrides the choice, offline CPU runs never touch the network, the
backend cell says why it chose and how to switch, and a notebook loads only the parts it asks for."""

import pytest
import torch
from PIL import Image

from llama3vision_min.tools import backend


def test_variable_overrides_the_choice(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_VARIABLE, "tiny")
    assert backend.choose_backend() == ("tiny", "forced by LLAMA3VISION_BACKEND=tiny")
    monkeypatch.setenv(backend.BACKEND_VARIABLE, "REAL")
    assert backend.choose_backend() == ("real", "forced by LLAMA3VISION_BACKEND=REAL")
    assert backend.choose_backend("mini") == ("mini", "asked for 'mini'")  # an argument beats the variable


def test_unknown_backend_is_a_value_error(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_VARIABLE, "gpu-please")
    with pytest.raises(ValueError, match="auto, real, mini or tiny"):
        backend.choose_backend()


@pytest.mark.parametrize("shipped", [True, False])
def test_auto_without_cuda_is_offline_and_never_asks_the_hub(monkeypatch, shipped):
    def no_network(*args, **kwargs):
        raise AssertionError("auto must not contact the Hub on a machine without CUDA")

    monkeypatch.delenv(backend.BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backend, "hub_answers", no_network)
    monkeypatch.setattr(backend, "mini_available", lambda: shipped)
    name, reason = backend.choose_backend()
    assert name == ("mini" if shipped else "tiny") and "no GPU" in reason
    assert ("tiny random stand-in" in reason) == (not shipped)


def test_auto_with_cuda_and_hub_is_real(monkeypatch):
    monkeypatch.delenv(backend.BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "hub_answers", lambda: True)
    assert backend.choose_backend() == ("real", "auto: a GPU and the Hugging Face Hub are both here")
    monkeypatch.setattr(backend, "hub_answers", lambda: False)
    name, reason = backend.choose_backend()
    assert name in ("mini", "tiny") and "the Hugging Face Hub does not answer" in reason


def test_hub_offline_variable_answers_false_without_network(monkeypatch):
    import urllib.request

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    assert backend.hub_answers() is False


def test_tiny_backend_loads_a_working_model(monkeypatch):
    loaded = backend.load_backend("tiny")
    assert loaded.name == "tiny"
    assert loaded.model.text_model.get_input_embeddings().num_embeddings == len(loaded.tokenizer)


def test_load_mini_is_public_and_says_how_to_train_when_nothing_is_shipped():
    import llama3vision_min

    if backend.mini_available():
        model, tokenizer = llama3vision_min.load_mini()
        assert model.text_model.get_input_embeddings().num_embeddings >= len(tokenizer)
    else:
        with pytest.raises(ValueError, match="train"):
            llama3vision_min.load_mini()


def test_the_report_says_why_which_gpu_and_how_to_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    offline = backend.Backend("mini", None, None, "the miniature", "auto: this runtime has no GPU").report()
    assert offline.splitlines() == ["backend: mini -- the miniature", "why: auto: this runtime has no GPU",
                                    "GPU: none (torch.cuda.is_available() is False)",
                                    "to switch: " + backend.HOW_TO_GET_THE_REAL_MODEL]
    assert "Change runtime type > T4 GPU" in offline
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (14.5 * 2**30, 15 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla T4")
    real = backend.Backend("real", None, None, "Llama 3",
                           "auto: a GPU and the Hugging Face Hub are both here")
    assert "GPU: Tesla T4, 14.5 GiB free of 15.0 GiB" in real.report().splitlines()
    assert real.report().endswith(backend.HOW_TO_GET_THE_MINIATURE)


def test_a_notebook_gets_only_the_parts_it_asks_for():
    from llama3vision_min.miniature import sample

    whole = backend.load_backend("tiny")
    vision = backend.load_backend("tiny", parts=("vision",))
    nothing = backend.load_backend("tiny", parts=())
    assert whole.model.text_model is not None and whole.tokenizer is not None
    assert vision.model.text_model is None and vision.tokenizer is None and nothing.model is None
    assert "no LLM" in vision.description and "nothing loaded" in nothing.description
    pixels = whole.model.preprocess([sample(0)[0]])
    assert torch.equal(vision.model.encode_images(pixels), whole.model.encode_images(pixels))
    with pytest.raises(ValueError,
                       match=r"parts must be \('vision', 'llm'\), \('vision',\) or \(\), got \('llm',\)"):
        backend.load_backend("tiny", parts=("llm",))


def test_real_vision_alone_reads_no_llm(fake_hub, monkeypatch):
    """parts=("vision",) on the real backend: SigLIP and the projector from the Hub, no file of the LLM."""
    import huggingface_hub
    import transformers

    asked = []
    real_download = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        asked.append(repo_id)
        return real_download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the LLM must not load")))
    loaded = backend.load_backend("real", parts=("vision",))
    assert loaded.model.text_model is None and loaded.tokenizer is None
    assert set(asked) == {backend.REAL_PROJECTOR}
    assert loaded.model.encode_images(
        loaded.model.preprocess([Image.open(backend.PHOTO)])).shape[:2] == (1, 16)
