"""The projector file: every published key form, both file formats, shape checks, refusals.

The official ``mm_projector.bin`` was written by the LLaVA trainer (keys
``model.mm_projector.0.weight`` ...) and the official loader read it with a plain
``torch.load``. ``load_projector`` must read every key form into the same module, take
its widths from the file, and refuse -- without running it -- a pickle that carries code.
"""

import math
import os
import pathlib
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from llama3vision_min import ProjectionModule, load_projector

from conftest import refused

MM, HIDDEN = 24, 40  # deliberately not the real 1152 -> 4096, and not square
PARAM_NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")
KEY_FORMS = {
    "llava": "model.mm_projector.{}",  # what the LLaVA trainer wrote into mm_projector.bin
    "stripped": "model.{}",  # after the official loader removes "mm_projector."
    "prefixed": "mm_projector.model.{}",  # as in the -hf checkpoint
}


def _reference_projector(mm=MM, hidden=HIDDEN, seed=0):
    torch.manual_seed(seed)
    projector = ProjectionModule(mm, hidden).eval()
    with torch.no_grad():  # non-default values everywhere, biases included
        for parameter in projector.parameters():
            parameter.normal_(0.0, 0.5)
    return projector


def _state_in_form(projector, form):
    """The projector's tensors under one of the published key forms (clones: no shared storage)."""
    state = projector.state_dict()
    return {KEY_FORMS[form].format(name): state[f"model.{name}"].clone() for name in PARAM_NAMES}


def _write(path, state):
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def reference():
    return _reference_projector()


@pytest.fixture(scope="module")
def features():
    return torch.randn(2, 7, MM, generator=torch.Generator().manual_seed(1))


# -- the module itself ---------------------------------------------------------------------
def test_projection_module_state_dict_keys_are_exactly_the_official_ones():
    projector = ProjectionModule(MM, HIDDEN)
    assert list(projector.state_dict()) == ["model.0.weight", "model.0.bias", "model.2.weight",
                                            "model.2.bias"]
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    assert shapes == {"model.0.weight": (HIDDEN, MM), "model.0.bias": (HIDDEN,),
                      "model.2.weight": (HIDDEN, HIDDEN), "model.2.bias": (HIDDEN,)}
    assert (projector.mm_hidden_size, projector.hidden_size) == (MM, HIDDEN)


def test_projection_module_is_linear_exact_gelu_linear(reference, features):
    w0, b0 = reference.model[0].weight, reference.model[0].bias
    w2, b2 = reference.model[2].weight, reference.model[2].bias
    with torch.no_grad():
        hidden = features @ w0.T + b0
        exact = torch.nn.functional.gelu(hidden, approximate="none") @ w2.T + b2
        by_erf = (0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2.0)))) @ w2.T + b2
        tanh = torch.nn.functional.gelu(hidden, approximate="tanh") @ w2.T + b2
        output = reference(features)
    assert output.shape == (2, 7, HIDDEN)
    torch.testing.assert_close(exact, by_erf, rtol=0, atol=1e-5)
    torch.testing.assert_close(output, exact, rtol=0, atol=1e-6)
    # The two GELUs differ enough on these inputs for the check above to tell them apart.
    assert (output - tanh).abs().max() > 1e-4


# -- reading every key form from both file formats -----------------------------------------
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@pytest.mark.parametrize("form", sorted(KEY_FORMS))
def test_every_key_form_and_format_gives_the_same_projector(tmp_path, reference, features, form, suffix):
    path = _write(tmp_path / f"mm_projector{suffix}", _state_in_form(reference, form))
    loaded = load_projector(path)
    assert isinstance(loaded, ProjectionModule)
    assert (loaded.mm_hidden_size, loaded.hidden_size) == (MM, HIDDEN)  # read from the file
    assert list(loaded.state_dict()) == list(reference.state_dict())
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(loaded(features), reference(features))


def test_shapes_come_from_the_file(tmp_path):
    """Other widths than the default ones: nothing is hard-wired to 1152 -> 4096."""
    projector = _reference_projector(mm=8, hidden=12, seed=3)
    loaded = load_projector(_write(tmp_path / "p.safetensors", _state_in_form(projector, "llava")))
    assert tuple(loaded.model[0].weight.shape) == (12, 8)
    assert tuple(loaded.model[2].weight.shape) == (12, 12)
    assert torch.equal(loaded.model[2].bias, projector.model[2].bias)


def test_matching_expected_dims_are_accepted(tmp_path, reference):
    path = _write(tmp_path / "mm_projector.bin", _state_in_form(reference, "llava"))
    loaded = load_projector(path, mm_hidden_size=MM, hidden_size=HIDDEN)
    assert torch.equal(loaded.model[0].weight, reference.model[0].weight)


def test_file_dtype_is_kept(tmp_path, reference):
    state = {k: v.to(torch.float16) for k, v in _state_in_form(reference, "llava").items()}
    loaded = load_projector(_write(tmp_path / "half.safetensors", state))
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    assert torch.equal(loaded.model[0].weight, state["model.mm_projector.0.weight"])


@pytest.mark.parametrize("given", [{"mm_hidden_size": 32}, {"hidden_size": 48},
                                   {"mm_hidden_size": 32, "hidden_size": 48}])
def test_expected_dims_that_differ_from_the_file_are_refused_naming_both_shapes(tmp_path, reference, given):
    path = _write(tmp_path / "mm_projector.bin", _state_in_form(reference, "llava"))
    # (out, in) as Linear stores it
    expected = (given.get("hidden_size", HIDDEN), given.get("mm_hidden_size", MM))
    with pytest.raises(ValueError) as error:
        load_projector(path, **given)
    message = str(error.value)
    assert str(expected) in message, message  # what the caller expected
    assert str((HIDDEN, MM)) in message, message  # what the file holds


def test_second_layer_of_the_wrong_shape_is_refused(tmp_path, reference):
    state = _state_in_form(reference, "stripped")
    state["model.2.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    with pytest.raises(ValueError, match=r"model\.2\.weight"):
        load_projector(_write(tmp_path / "p.safetensors", state))


@pytest.mark.parametrize("bias", ["model.0.bias", "model.2.bias"])
def test_bias_of_the_wrong_shape_is_refused_as_value_error(tmp_path, reference, bias):
    state = _state_in_form(reference, "stripped")
    state[bias] = torch.zeros(HIDDEN + 3)
    with pytest.raises(ValueError, match=re.escape(bias)):
        load_projector(_write(tmp_path / "p.safetensors", state))


# -- keys that are not a projector's ----------------------------------------------------------
def _missing_one(reference):
    state = _state_in_form(reference, "llava")
    del state["model.mm_projector.2.bias"]
    return state


def _one_extra(reference):
    state = _state_in_form(reference, "llava")
    state["model.mm_projector.4.weight"] = torch.zeros(HIDDEN, HIDDEN)
    return state


def _unknown_names(reference):
    return {k.replace("mm_projector", "mm_proj"): v for k, v in _state_in_form(reference, "llava").items()}


def _linear_names(reference):  # transformers' LLaVA names: a different model's layout, not accepted silently
    state = _state_in_form(reference, "stripped")
    return {k.replace("model.0", "linear_1").replace("model.2", "linear_2"): v for k, v in state.items()}


@pytest.mark.parametrize("make_state", [_missing_one, _one_extra, _unknown_names, _linear_names])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_missing_or_unknown_keys_are_refused(tmp_path, reference, make_state, suffix):
    path = _write(tmp_path / f"mm_projector{suffix}", make_state(reference))
    refused(lambda: load_projector(path), "expected projector keys like model.mm_projector.0.weight")


def test_empty_file_of_tensors_is_refused(tmp_path):
    refused(lambda: load_projector(_write(tmp_path / "empty.bin", {})), "expected projector keys", "found []")


# -- files that are not projector files ------------------------------------------------------
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_corrupt_file_is_refused_as_value_error(tmp_path, suffix):
    path = tmp_path / f"mm_projector{suffix}"
    path.write_bytes(b"\x00this is not a checkpoint" * 10)
    words = {".bin": "not a plain tensor pickle",
             ".safetensors": "is not a readable safetensors file"}[suffix]
    refused(lambda: load_projector(path), words, path.name)


def test_bin_holding_something_other_than_a_dict_of_tensors_is_refused(tmp_path, reference):
    tensors = list(_state_in_form(reference, "llava").values())
    path = tmp_path / "list.bin"
    torch.save(tensors, path)
    refused(lambda: load_projector(path), "does not hold a dict of tensors")
    path = tmp_path / "mixed.bin"
    torch.save({**_state_in_form(reference, "llava"), "step": 3}, path)
    refused(lambda: load_projector(path), "does not hold a dict of tensors")


# -- a hostile pickle is refused and its code never runs --------------------------------------
class _RunsShellCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _TouchesFile:
    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _write_zip_pickle(path, payload, reference):
    torch.save({**_state_in_form(reference, "llava"), "model.mm_projector.extra": payload}, path)


def _write_legacy_pickle(path, payload, reference):
    torch.save({**_state_in_form(reference, "llava"), "model.mm_projector.extra": payload}, path,
               _use_new_zipfile_serialization=False)


def _write_bare_pickle(path, payload, reference):
    with open(path, "wb") as handle:  # not a torch file at all: the payload is the first thing unpickled
        pickle.dump({"model.mm_projector.0.weight": payload}, handle, protocol=2)


@pytest.mark.parametrize("payload_class", [_RunsShellCommand, _TouchesFile])
@pytest.mark.parametrize("writer", [_write_zip_pickle, _write_legacy_pickle, _write_bare_pickle])
def test_hostile_pickle_is_refused_and_its_code_does_not_run(tmp_path, reference, payload_class, writer):
    marker = tmp_path / "MARKER"
    path = tmp_path / "mm_projector.bin"
    writer(path, payload_class(marker), reference)

    # The file really is hostile: an unsafe load runs the payload.
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        pass  # the bare pickle is not a valid torch file, but its payload ran before that was noticed
    assert marker.exists(), "the test's payload did not run under an unsafe load: the test proves nothing"
    marker.unlink()

    refused(lambda: load_projector(path), "weights_only=True", "nothing in it was executed")
    assert not marker.exists(), "load_projector executed code from the pickle"


def test_two_key_forms_of_the_same_tensor_in_one_file_are_refused(tmp_path):
    """A file holding model.0.weight twice (in two key forms) is ambiguous: refuse it rather than pick one."""
    state = {"model.0.weight": torch.zeros(4, 3), "model.0.bias": torch.zeros(4),
             "model.2.weight": torch.zeros(4, 4), "model.2.bias": torch.zeros(4),
             "model.mm_projector.0.weight": torch.ones(4, 3)}
    path = tmp_path / "twice.bin"
    torch.save(state, path)
    with pytest.raises(ValueError, match="second time"):
        load_projector(path)
