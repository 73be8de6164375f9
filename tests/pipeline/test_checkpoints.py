"""Both published checkpoint forms, written on disk in their real layouts and read back.

* the ``-hf`` form: one folder, ``config.json`` with ``text_config`` / ``vision_config``,
  safetensors (single or sharded) with keys under ``text_model.``, ``vision_model.``,
  ``mm_projector.`` -- in every key variant the official file may use;
* the alpha form: a Llama LLM folder, a full SigLIP folder (text and vision towers, as
  google/siglip-so400m-patch14-384 is) and ``mm_projector.bin`` in the LLaVA key form.
"""

import importlib.util
import json
import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama3vision_min import LlamaVision, ProjectionModule, build_prompt, tokenizer_image_token
from llama3vision_min.miniature.stand_ins import make_configs

from conftest import make_image, refused

ROOT = Path(__file__).resolve().parents[2]
PREFIXES = ("text_model.", "vision_model.", "mm_projector.")


# -- helpers ---------------------------------------------------------------------------------
def _inputs(model, tokenizer):
    ids = tokenizer_image_token(build_prompt("what is this?"), tokenizer)[None]  # (1, L)
    return ids, model.preprocess([make_image(seed=5)])


def _logits(model, tokenizer):
    ids, pixel_values = _inputs(model, tokenizer)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits


def _assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert sorted(state_a) == sorted(state_b)
    for key, tensor in state_a.items():
        assert tensor.dtype == state_b[key].dtype, key
        assert torch.equal(tensor, state_b[key]), key


def _file_keys(folder):
    keys = []
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def _rewrite(folder, rename=lambda key: key, drop=()):
    """Rewrite ``model.safetensors`` with renamed keys and some keys left out."""
    file = Path(folder) / "model.safetensors"
    state = load_file(str(file))
    new = {rename(key): tensor for key, tensor in state.items() if key not in drop}
    assert len(new) == len(state) - len(drop), "renaming made two keys collide"
    save_file(new, str(file), metadata={"format": "pt"})
    return set(new)


def _siglip_inner(key):
    """``vision_model.[vision_model.]X`` -> ``X``."""
    return key.removeprefix("vision_model.").removeprefix("vision_model.")


def _siglip_key(form):
    def rename(key):
        if not key.startswith("vision_model."):
            return key
        return ("vision_model.vision_model." if form == "nested" else "vision_model.") + _siglip_inner(key)

    return rename


def _projector_key(form):
    def rename(key):
        match = re.fullmatch(r"mm_projector\.(?:model\.)?([02]\.(?:weight|bias))", key)
        if match is None:
            return key
        return ("mm_projector.model." if form == "model" else "mm_projector.") + match.group(1)

    return rename


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny model written by ``save_pretrained`` into a fresh folder, and its reference logits."""
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return folder, _logits(model, tokenizer)


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    """A private copy of the saved folder, for tests that rewrite it."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for file in saved[0].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


# -- the -hf layout: round trip --------------------------------------------------------------
def test_save_then_load_gives_identical_weights_and_logits(tiny, saved):
    model, tokenizer = tiny
    folder, reference_logits = saved
    loaded = LlamaVision.from_pretrained(folder)
    _assert_same_state(model, loaded)
    assert not loaded.training
    assert torch.equal(_logits(loaded, tokenizer), reference_logits)


def test_saved_folder_has_the_hf_layout(tiny, saved):
    model, _ = tiny
    folder, _ = saved
    keys = _file_keys(folder)
    assert keys and all(key.startswith(PREFIXES) for key in keys), [k for k in keys
                                                                     if not k.startswith(PREFIXES)]
    for prefix in PREFIXES:  # each part is present, not just allowed
        assert any(key.startswith(prefix) for key in keys), prefix
    assert {k for k in keys if k.startswith("mm_projector.")} == {
        f"mm_projector.model.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    n_parameters = sum(len(getattr(model, prefix[:-1]).state_dict()) for prefix in PREFIXES)
    assert len(keys) == n_parameters  # everything saved once (no tied weights in this model)

    config = json.loads((folder / "config.json").read_text())
    assert isinstance(config["text_config"], dict) and isinstance(config["vision_config"], dict)
    assert config["text_config"]["hidden_size"] == model.text_model.config.hidden_size
    assert config["vision_config"]["hidden_size"] == model.vision_model.config.hidden_size
    assert config["vision_config"]["image_size"] == model.vision_model.config.image_size
    # transformers 4.x reads RoPE only from the top-level ``rope_theta`` (5.x also writes rope_parameters):
    # without it 4.x would load Llama 3's theta of 500000 as 10000
    assert config["text_config"]["rope_theta"] == 500000.0


@pytest.mark.parametrize("form", ["nested", "flat"])
def test_siglip_keys_load_nested_and_flat(tiny, saved, copy_of_saved, form):
    model, tokenizer = tiny
    keys = _rewrite(copy_of_saved, rename=_siglip_key(form))
    vision_keys = [k for k in keys if k.startswith("vision_model.")]
    assert vision_keys
    nested = [k for k in vision_keys if k.startswith("vision_model.vision_model.")]
    assert len(nested) == (len(vision_keys) if form == "nested" else 0)

    loaded = LlamaVision.from_pretrained(copy_of_saved)
    _assert_same_state(model, loaded)
    assert torch.equal(_logits(loaded, tokenizer), saved[1])


@pytest.mark.parametrize("form", ["model", "bare"])
def test_projector_keys_load_with_and_without_model_infix(tiny, saved, copy_of_saved, form):
    model, tokenizer = tiny
    keys = _rewrite(copy_of_saved, rename=_projector_key(form))
    infix = "mm_projector.model." if form == "model" else "mm_projector.0."
    assert any(k.startswith(infix) for k in keys)
    if form == "bare":
        assert not any(k.startswith("mm_projector.model.") for k in keys)

    loaded = LlamaVision.from_pretrained(copy_of_saved)
    for key, tensor in model.mm_projector.state_dict().items():
        assert torch.equal(loaded.mm_projector.state_dict()[key], tensor), key
    assert torch.equal(_logits(loaded, tokenizer), saved[1])


def test_checkpoint_without_the_unused_siglip_head_loads(tiny, saved, copy_of_saved):
    """Features come from hidden_states[-2]: a vision tower saved without its pooling head is enough."""
    _, tokenizer = tiny
    head = {k for k in _file_keys(copy_of_saved) if _siglip_inner(k).startswith("head.")}
    assert head, "the tiny SigLIP tower was expected to have a pooling head"
    _rewrite(copy_of_saved, drop=head)
    loaded = LlamaVision.from_pretrained(copy_of_saved)
    assert torch.equal(_logits(loaded, tokenizer), saved[1])


def test_sharded_checkpoint_loads_identically(tiny, saved, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    for key, shard in index["weight_map"].items():  # the index tells the truth about every key
        with safe_open(str(tmp_path / shard), framework="pt") as handle:
            assert key in handle.keys(), (key, shard)
    assert sorted(index["weight_map"]) == sorted(_file_keys(saved[0]))

    loaded = LlamaVision.from_pretrained(tmp_path)
    _assert_same_state(model, loaded)
    assert torch.equal(_logits(loaded, tokenizer), saved[1])


def test_tied_word_embeddings_round_trip(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    model, tokenizer = tiny
    _, text_config = make_configs("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    text_config.tie_word_embeddings = True
    torch.manual_seed(11)
    text_model = LlamaForCausalLM(text_config).eval()
    assert text_model.lm_head.weight.data_ptr() == text_model.get_input_embeddings().weight.data_ptr()
    tied = LlamaVision(vision_model=model.vision_model, text_model=text_model,
                       mm_projector=model.mm_projector)
    reference_logits = _logits(tied, tokenizer)

    tied.save_pretrained(tmp_path)
    assert "text_model.model.embed_tokens.weight" in _file_keys(tmp_path)
    loaded = LlamaVision.from_pretrained(tmp_path)
    assert loaded.text_model.config.tie_word_embeddings
    lm_head, embeddings = loaded.text_model.lm_head.weight, loaded.text_model.get_input_embeddings().weight
    assert lm_head.data_ptr() == embeddings.data_ptr(), "lm_head is not tied to the embeddings after loading"
    assert torch.equal(lm_head, text_model.lm_head.weight)
    assert torch.equal(_logits(loaded, tokenizer), reference_logits)


def test_dtype_bfloat16(tiny, saved):
    model, tokenizer = tiny
    loaded = LlamaVision.from_pretrained(saved[0], dtype=torch.bfloat16)
    for part in ("text_model", "vision_model", "mm_projector"):
        for name, parameter in getattr(loaded, part).named_parameters():
            assert parameter.dtype == torch.bfloat16, f"{part}.{name}"
    assert torch.equal(loaded.mm_projector.model[0].weight,
                       model.mm_projector.model[0].weight.to(torch.bfloat16))
    logits = _logits(loaded, tokenizer)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# -- the -hf layout: refusals ---------------------------------------------------------------
@pytest.mark.parametrize("part,name", [
    ("text_model.", "model.layers.1.mlp.down_proj.weight"),
    ("text_model.", "lm_head.weight"),
    ("vision_model.", "encoder.layers.0.self_attn.q_proj.weight"),
    ("mm_projector.", "model.2.bias"),
])
def test_missing_weight_is_refused_naming_it(copy_of_saved, part, name):
    # SigLIP keys may be stored flat or nested: find the stored key whatever its form.
    def inner(key):
        return _siglip_inner(key) if part == "vision_model." else key[len(part):]

    stored = [k for k in _file_keys(copy_of_saved) if k.startswith(part) and inner(k) == name]
    assert len(stored) == 1, stored
    _rewrite(copy_of_saved, drop=set(stored))
    with pytest.raises(ValueError) as error:
        LlamaVision.from_pretrained(copy_of_saved)
    assert name in str(error.value), str(error.value)


def test_unexpected_weight_is_refused(copy_of_saved):
    file = copy_of_saved / "model.safetensors"
    state = load_file(str(file))
    state["text_model.model.layers.9.mlp.down_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.9"):
        LlamaVision.from_pretrained(copy_of_saved)


def test_weight_whose_shape_disagrees_with_the_config_is_refused_as_value_error(copy_of_saved):
    file = copy_of_saved / "model.safetensors"
    state = load_file(str(file))
    state["text_model.model.norm.weight"] = torch.ones(state["text_model.model.norm.weight"].numel() + 1)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="norm.weight"):
        LlamaVision.from_pretrained(copy_of_saved)


def test_unreadable_weights_file_is_refused_as_value_error(copy_of_saved):
    file = copy_of_saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])  # truncated download
    refused(lambda: LlamaVision.from_pretrained(copy_of_saved), "is not a readable safetensors file")


def test_folder_without_config_is_refused(copy_of_saved):
    (copy_of_saved / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        LlamaVision.from_pretrained(copy_of_saved)


@pytest.mark.parametrize("drop", ["text_config", "vision_config"])
def test_config_without_a_sub_config_is_refused(copy_of_saved, drop):
    config_file = copy_of_saved / "config.json"
    config = json.loads(config_file.read_text())
    del config[drop]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=drop):
        LlamaVision.from_pretrained(copy_of_saved)


def test_folder_without_weights_is_refused(copy_of_saved):
    (copy_of_saved / "model.safetensors").unlink()
    refused(lambda: LlamaVision.from_pretrained(copy_of_saved), "expected model.safetensors or "
            "model.safetensors.index.json")


@pytest.fixture
def no_network(monkeypatch):
    """Record any Hub download and forbid any socket connection."""
    import huggingface_hub

    calls = []

    def no_download(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("network access attempted")

    def no_connect(*args, **kwargs):
        calls.append(("socket",) + args)
        raise OSError("network access attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return calls


@pytest.mark.parametrize("where", ["absolute", "dot-relative", "deep-relative", "a-file"])
def test_nonexistent_local_path_is_refused_without_network(tmp_path, monkeypatch, no_network, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    path = {"absolute": str(tmp_path / "no-such-model"), "dot-relative": "./no-such-model",
            "deep-relative": "no/such/model", "a-file": str(tmp_path / "weights.safetensors")}[where]
    refused(lambda: LlamaVision.from_pretrained(path), "expected a model folder or a Hub id", path)
    assert no_network == []


# -- the alpha form ---------------------------------------------------------------------------
def _full_siglip(vision_model, folder):
    """A full SiglipModel (text and vision towers) whose vision tower carries ``vision_model``'s weights."""
    from transformers import SiglipConfig, SiglipModel

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    config = SiglipConfig(text_config=text, vision_config=vision_model.config.to_dict())
    torch.manual_seed(5)
    full = SiglipModel(config).eval()
    flat = {key.removeprefix("vision_model."): tensor for key, tensor in vision_model.state_dict().items()}
    full.vision_model.load_state_dict(flat, strict=True)
    full.save_pretrained(folder)
    return folder


def _write_llava_projector(projector, path):
    torch.save({f"model.mm_projector.{k.removeprefix('model.')}": v.clone()
                for k, v in projector.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def alpha(tiny, tmp_path_factory):
    """The tiny model in the alpha form: (llm folder, siglip folder, mm_projector.bin)."""
    model, _ = tiny
    root = tmp_path_factory.mktemp("alpha")
    model.text_model.save_pretrained(root / "llm")
    _full_siglip(model.vision_model, root / "siglip")
    projector = _write_llava_projector(model.mm_projector, root / "mm_projector.bin")
    return root / "llm", root / "siglip", projector


def test_alpha_files_have_the_published_layouts(alpha):
    llm, siglip, projector = alpha
    siglip_config = json.loads((siglip / "config.json").read_text())
    assert siglip_config["model_type"] == "siglip" and "text_config" in siglip_config
    assert any(k.startswith("text_model.") for k in _file_keys(siglip))  # a full SiglipModel, not a tower
    assert sorted(torch.load(projector, weights_only=True)) == [
        "model.mm_projector.0.bias", "model.mm_projector.0.weight",
        "model.mm_projector.2.bias", "model.mm_projector.2.weight"]


def test_alpha_form_gives_the_same_logits(tiny, saved, alpha):
    model, tokenizer = tiny
    loaded = LlamaVision.from_alpha(*alpha)
    assert not loaded.training
    _assert_same_state(model, loaded)
    assert torch.equal(_logits(loaded, tokenizer), saved[1])


def test_alpha_form_takes_a_folder_holding_the_projector(tiny, saved, alpha, tmp_path):
    model, tokenizer = tiny
    llm, siglip, projector = alpha
    (tmp_path / "mm_projector.bin").write_bytes(Path(projector).read_bytes())
    loaded = LlamaVision.from_alpha(llm, siglip, tmp_path)
    assert torch.equal(_logits(loaded, tokenizer), saved[1])


def test_llm_swap_uses_the_other_llm_with_the_same_projector(tiny, saved, alpha, tmp_path):
    from transformers import LlamaForCausalLM

    model, tokenizer = tiny
    _, siglip, projector = alpha
    _, text_config = make_configs("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    text_config.num_hidden_layers = 3  # another LLM of the same width
    torch.manual_seed(7)
    other = LlamaForCausalLM(text_config).eval()
    other.save_pretrained(tmp_path / "other_llm")

    swapped = LlamaVision.from_alpha(tmp_path / "other_llm", siglip, projector)
    _assert_same_state(other, swapped.text_model)
    _assert_same_state(model.mm_projector, swapped.mm_projector)
    _assert_same_state(model.vision_model, swapped.vision_model)
    expected = LlamaVision(vision_model=model.vision_model, text_model=other, mm_projector=model.mm_projector)
    logits = _logits(swapped, tokenizer)
    assert torch.equal(logits, _logits(expected, tokenizer))
    assert not torch.allclose(logits, saved[1])


@pytest.mark.parametrize("widths,names", [((32, 48), ("48", "64")), ((40, 64), ("40", "32"))],
                         ids=["llm-width", "vision-width"])
def test_projector_of_the_wrong_width_is_refused(alpha, tmp_path, widths, names):
    llm, siglip, _ = alpha  # the tiny LLM embeds in 64, the tiny SigLIP gives 32
    path = _write_llava_projector(ProjectionModule(*widths), tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError) as error:
        LlamaVision.from_alpha(llm, siglip, path)
    assert all(name in str(error.value) for name in names), str(error.value)


def test_quantised_loading_without_bitsandbytes_says_how_to_get_it(alpha, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "bitsandbytes"
                        else find_spec(name, *args))
    for flag in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(ValueError, match=r"bitsandbytes .*llama3vision-min\[quant\]"):
            LlamaVision.from_alpha(*alpha, **{flag: True})


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install 'llama3vision-min[quant]')")
def test_4bit_loading_runs_on_a_cpu_and_the_export_refuses_it(tiny, alpha, tmp_path):
    """bitsandbytes >= 0.49 quantises on a CPU too; the LLaVA export needs full-precision weights and
    says so."""
    from llama3vision_min.tools.llava_export import export_llava

    _, tokenizer = tiny
    loaded = LlamaVision.from_alpha(*alpha, device="cpu", load_in_4bit=True)
    assert type(loaded.text_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert loaded.device.type == "cpu" and loaded.text_model.is_quantized
    ids = loaded.answer_question(make_image(), "what is this?", tokenizer, do_sample=False, max_new_tokens=4,
                                 min_new_tokens=4)
    assert ids.shape == (4,)
    with pytest.raises(ValueError, match="full-precision weights.*quantised"):
        export_llava(loaded, tokenizer, tmp_path / "export")
    assert not (tmp_path / "export").exists()  # refused before anything was written


# -- the source never trusts remote code or unpickles unsafely ----------------------------------
def _calls(text, name):
    """The argument text of every ``name(...)`` call in ``text`` (parentheses balanced, across lines)."""
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[match.end(): i - 1]


def test_package_source_has_no_remote_code_and_only_weights_only_torch_load():
    sources = sorted((ROOT / "llama3vision_min").rglob("*.py"))
    assert len(sources) > 5
    n_loads = 0
    for source in sources:
        text = source.read_text()
        assert "trust_remote_code=True" not in text, source
        assert not re.search(r"\bpickle\.loads?\(", text), f"{source} unpickles directly"
        for arguments in _calls(text, "torch.load"):
            n_loads += 1
            assert re.search(r"weights_only\s*=\s*True", arguments), f"{source}: torch.load({arguments})"
    assert n_loads >= 1  # the projector .bin is read somewhere, and the scan found it
