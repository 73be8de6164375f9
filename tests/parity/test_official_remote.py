"""Parity with the OFFICIAL remote code of qresearch/llama-3-vision-alpha-hf (online only).

Run with ``make test-online``, or on Colab with the cell at the end of notebook 05 (which clones this
repository and runs ``python -m pytest -m online tests/parity/test_official_remote.py``). Without the Hub
every comparison here is skipped with a reason. With it, a failure to download, import or build the
official code is a test failure, never a skip: "skipped" means only that the Hub did not answer.

Only the code files and ``config.json`` are downloaded (no weights). They are imported
from a temporary folder -- the one place in this project where the remote code runs,
as ``trust_remote_code=True`` would run it. The official class is then built on a tiny
config (our tiny towers' configs, at the real 384 px / patch 14 geometry in case the
official code hard-codes 384), the same random weights are copied into it and into a
``LlamaVision``, and both answer the same questions greedily.

Nobody here has seen the official files (no network): the code below only assumes the
public API named in the reference notes (``text_model``, ``vision_model``,
``mm_projector``, ``processor``, ``tokenizer_image_token``, ``process_tensors``,
``answer_question``) and says clearly what it found when something else is there.
"""

import importlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import uuid

import pytest
import torch
import transformers

from llama3vision_min import (LlamaVision, ProjectionModule, build_prompt, process_tensors,
                              tokenizer_image_token)
from llama3vision_min.generation import cut_at_stop, stop_token_ids
from llama3vision_min.miniature.stand_ins import make_configs, tiny_tokenizer

from conftest import make_image

pytestmark = pytest.mark.online

REPO = "qresearch/llama-3-vision-alpha-hf"
CODE_FILES = ("configuration_llamavision.py", "modeling_llamavision.py")
CONFIG_FILE = "config.json"
UNREACHABLE = "Hugging Face Hub unreachable: official remote code not downloaded"


# -- download --------------------------------------------------------------------------------
def _hub_answers(timeout=5.0):
    """A quick HEAD request (honours proxy variables): does the Hub answer at all? (no retry loop)"""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/{REPO}/resolve/main/{CONFIG_FILE}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered (gated, moved, ...): hf_hub_download reports the details
    except Exception:
        return False
    return True


def download_official_files():
    """``{file name: local path}`` for config.json and the two code files; skips the test when offline."""
    from huggingface_hub import hf_hub_download

    names = (CONFIG_FILE,) + CODE_FILES
    # Never from the local cache alone: this session's cache is private (conftest.py) and offline it holds the
    # fake Hub (tests/fake_hub.py), whose -hf repository carries stand-ins for these files, not the official
    # code.
    if not _hub_answers():
        pytest.skip(UNREACHABLE)
    try:
        return {name: hf_hub_download(REPO, name, etag_timeout=10) for name in names}
    except Exception as error:  # the Hub answered: not getting the files is a failure
        pytest.fail("the Hub answers but the official files did not download: "
                    f"{type(error).__name__}: {error}")


def import_official_code(files, root):
    """Import the official code files as a package under ``root``; ``{module name: module}``.

    A file that does not import (e.g. code written for another transformers version) fails the
    test with the reason: the comparison must not look like a pass when it did not run.
    """
    # a package, so relative imports in the files work
    package = f"official_llamavision_{uuid.uuid4().hex[:8]}"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    for name in CODE_FILES:
        shutil.copy(files[name], root / package / name)
    sys.path.insert(0, str(root))
    try:
        return {name[:-3]: importlib.import_module(f"{package}.{name[:-3]}") for name in CODE_FILES}
    except Exception as error:
        pytest.fail(f"the official remote code was downloaded but does not import on transformers "
                    f"{transformers.__version__}: {type(error).__name__}: {error}")
    finally:
        sys.path.remove(str(root))


def _class_from_auto_map(module_by_file, reference):
    """'modeling_llamavision.Llamavision' or 'owner/repo--modeling_llamavision.Llamavision' -> the class."""
    module_name, class_name = reference.split("--")[-1].rsplit(".", 1)
    return getattr(module_by_file[module_name], class_name)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """``(model class, config class, config.json dict)`` from the official remote code."""
    files = download_official_files()
    config_json = json.loads(open(files[CONFIG_FILE]).read())
    modules = import_official_code(files, tmp_path_factory.mktemp("official_code"))
    package = next(iter(modules.values())).__name__.split(".")[0]
    try:
        auto_map = config_json.get("auto_map", {})
        model_ref = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoModel")
        if model_ref:
            model_class = _class_from_auto_map(modules, model_ref)
        else:
            candidates = [value for value in vars(modules["modeling_llamavision"]).values()
                          if isinstance(value, type) and issubclass(value, transformers.PreTrainedModel)
                          and hasattr(value, "answer_question")]
            assert len(candidates) == 1, ("cannot tell the official model class: "
                                          f"auto_map={auto_map}, {candidates}")
            model_class = candidates[0]
        config_ref = auto_map.get("AutoConfig")
        config_class = _class_from_auto_map(modules, config_ref) if config_ref else model_class.config_class
        yield model_class, config_class, config_json
    finally:
        for name in [name for name in sys.modules if name.startswith(package)]:
            del sys.modules[name]


# -- a tiny pair: the official class and LlamaVision with the same weights ------------------
def _tiny_parts():
    """Our tiny towers' configs at 384 px / patch 14 (729 patches, like the real model), seeded weights."""
    from transformers import LlamaForCausalLM, SiglipVisionModel

    tokenizer = tiny_tokenizer()
    vision_config, text_config = make_configs("tiny", vocab_size=len(tokenizer),
                                              bos_token_id=tokenizer.bos_token_id,
                                              eos_token_id=tokenizer.eos_token_id)
    vision_config.image_size, vision_config.patch_size = 384, 14
    torch.manual_seed(0)
    vision_model = SiglipVisionModel(vision_config).eval()
    text_model = LlamaForCausalLM(text_config).eval()
    projector = ProjectionModule(vision_config.hidden_size, text_config.hidden_size).eval()
    return vision_model, text_model, projector


def _official_config_dict(template, vision_config, text_config):
    """The official config.json with our tiny sub-configs in place of the real ones (same nesting)."""
    config = {key: value for key, value in template.items()
              if key not in ("torch_dtype", "dtype", "_name_or_path", "transformers_version",
                             "quantization_config")}
    config["text_config"] = text_config.to_dict()
    vision = vision_config.to_dict()
    original_vision = template.get("vision_config")
    if isinstance(original_vision, dict) and isinstance(original_vision.get("vision_config"), dict):
        # a full SigLIP config that nests the vision part
        vision = {**{k: v for k, v in original_vision.items() if k not in ("text_config", "vision_config")},
                  "vision_config": vision}
    config["vision_config"] = vision
    return config


def _normalise(key):
    while key.startswith("vision_model."):
        key = key[len("vision_model."):]
    return key


def copy_weights(destination, source):
    """Copy ``source``'s tensors into ``destination`` by name (tolerating a nested ``vision_model.``)."""
    ours = {_normalise(key): tensor for key, tensor in source.state_dict().items()}
    target = destination.state_dict()
    missing = [key for key in target if _normalise(key) not in ours]
    assert not missing, f"official {type(destination).__name__} has weights we lack: {missing[:5]}"
    new_state = {key: ours[_normalise(key)] for key in target}
    for key, tensor in new_state.items():
        assert tensor.shape == target[key].shape, (key, tensor.shape, target[key].shape)
    destination.load_state_dict(new_state)


@pytest.fixture(scope="module")
def pair(official):
    model_class, config_class, config_json = official
    vision_model, text_model, projector = _tiny_parts()
    ours = LlamaVision(vision_model=vision_model, text_model=text_model, mm_projector=projector).eval()
    config = config_class.from_dict(_official_config_dict(config_json, vision_model.config,
                                                          text_model.config))
    torch.manual_seed(1)
    try:
        theirs = model_class(config)
    except Exception as error:
        pytest.fail(f"the official class cannot be built on transformers {transformers.__version__}: "
                    f"{type(error).__name__}: {error}")
    theirs = theirs.float().eval()
    for part in ("text_model", "vision_model", "mm_projector"):
        assert hasattr(theirs, part), f"the official model has no attribute {part!r}"
        copy_weights(getattr(theirs, part), getattr(ours, part))
    return ours, theirs


def _as_ids(result):
    if isinstance(result, torch.Tensor):
        return result[0] if result.dim() == 2 else result
    if isinstance(result, (list, tuple)) and result and isinstance(result[0], int):
        return torch.tensor(result)
    return result


# -- the tests -------------------------------------------------------------------------------
def test_official_model_has_the_documented_api(pair):
    _, theirs = pair
    for name in ("text_model", "vision_model", "mm_projector", "processor", "tokenizer_image_token",
                 "process_tensors", "answer_question"):
        assert hasattr(theirs, name), name
    assert sorted(theirs.mm_projector.state_dict()) == ["model.0.bias", "model.0.weight", "model.2.bias",
                                                        "model.2.weight"]


def test_weights_are_identical(pair):
    ours, theirs = pair
    for part in ("text_model", "vision_model", "mm_projector"):
        mine = {_normalise(k): v for k, v in getattr(ours, part).state_dict().items()}
        for key, tensor in getattr(theirs, part).state_dict().items():
            assert torch.equal(tensor, mine[_normalise(key)]), (part, key)


@pytest.mark.parametrize("where", ["<image>what is this?", build_prompt("what is this?"), "a<image>b<image>c",
                                   "none"],
                         ids=["start", "middle", "several", "none"])
def test_token_split_matches_official(pair, where):
    _, theirs = pair
    tokenizer = tiny_tokenizer()
    official_ids = theirs.tokenizer_image_token(where, tokenizer, -200, return_tensors="pt")
    assert (tokenizer_image_token(where, tokenizer).tolist()
            == torch.as_tensor(official_ids).reshape(-1).tolist())


def test_splice_matches_official(pair):
    ours, theirs = pair
    tokenizer = tiny_tokenizer()
    ids = tokenizer_image_token(build_prompt("what is this?"), tokenizer).unsqueeze(0)
    layer = ours.text_model.get_input_embeddings()
    features = torch.randn(1, 729, layer.embedding_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        official_embeds, official_mask = theirs.process_tensors(ids, features, layer)
        embeds, mask = process_tensors(ids, features, layer)
    assert torch.equal(embeds, official_embeds) and torch.equal(mask, official_mask.to(mask.dtype))


@pytest.mark.parametrize("seed, size", [(0, (37, 23)), (1, (300, 7)), (2, (640, 480))],
                         ids=["37x23", "300x7", "640x480"])
def test_greedy_answers_match_official(pair, seed, size):
    ours, theirs = pair
    image = make_image("RGB", size, seed=seed)
    our_tokenizer, official_tokenizer = tiny_tokenizer(), tiny_tokenizer()  # the official may set eos_token
    mine = ours.answer_question(image, "what is this?", our_tokenizer, do_sample=False, max_new_tokens=12)
    official = _as_ids(theirs.answer_question(image, "what is this?", official_tokenizer,
                                              do_sample=False, max_new_tokens=12))
    if isinstance(official, str):  # decoded text instead of ids (not what the notes say, but compare anyway)
        assert our_tokenizer.decode(mine, skip_special_tokens=True).strip() == official.strip()
        return
    # Both stop on <|eot_id|> at least; cut both at the first end token so a wider stop list does not count.
    stops = stop_token_ids(our_tokenizer)
    assert torch.equal(cut_at_stop(mine, stops), cut_at_stop(official.cpu(), stops)), (mine.tolist(),
                                                                                       official.tolist())


def test_official_code_that_does_not_import_is_a_failure_not_a_skip(tmp_path):
    """Offline check of the rule above: a downloaded file that does not import fails the comparison."""
    broken = tmp_path / "files"
    broken.mkdir()
    files = {}
    for name in CODE_FILES:
        files[name] = broken / name
        files[name].write_text("from transformers import NoSuchClassInThisVersion\n")
    with pytest.raises(pytest.fail.Exception, match="does not import on transformers"):
        import_official_code(files, tmp_path / "root")
