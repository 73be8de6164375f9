"""The notebooks' backend choice: one variable overrides it, and offline CPU runs never touch the network."""

import pytest
import torch

from llama3vision_min.tools import backend


def test_variable_overrides_the_choice(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_VARIABLE, "tiny")
    assert backend.choose_backend() == "tiny"
    monkeypatch.setenv(backend.BACKEND_VARIABLE, "REAL")
    assert backend.choose_backend() == "real"
    assert backend.choose_backend("mini") == "mini"  # an explicit argument beats the variable


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
    assert backend.choose_backend() == ("mini" if shipped else "tiny")


def test_auto_with_cuda_and_hub_is_real(monkeypatch):
    monkeypatch.delenv(backend.BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "hub_answers", lambda: True)
    assert backend.choose_backend() == "real"
    monkeypatch.setattr(backend, "hub_answers", lambda: False)
    assert backend.choose_backend() in ("mini", "tiny")


def test_hub_offline_variable_answers_false_without_network(monkeypatch):
    import urllib.request

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
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
