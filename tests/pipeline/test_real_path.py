"""The real path, rehearsed offline: the real repository ids served by the fake Hub (``tests/fake_hub.py``).

What a Colab user runs -- ``from_alpha`` / ``from_pretrained`` with Hub ids, ``LLAMA3VISION_BACKEND=real``,
the command lines, the README's code -- runs here on tiny checkpoints laid out like the real
ones, on the CPU. The GPU itself is not here: device handling is checked by where tensors are sent
(``process_tensors`` test) and by reading the code. The notebooks run on this path in
``tests/repo/test_colab.py``.
"""

import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import llama3vision_min.loading as loading
import llama3vision_min.model as model_module
from llama3vision_min import LlamaVision, process_tensors
from llama3vision_min.tools.backend import PHOTO, REAL_LLM, REAL_PROJECTOR, REAL_VISION

from conftest import offline_env
from fake_hub import OTHER_LLM, REAL_HF, REMOTE_CODE_MARKER

ROOT = Path(__file__).resolve().parents[2]
HF_SHARDS = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
REMOTE_CODE = {"configuration_llamavision.py", "modeling_llamavision.py"}
REAL_HF_FILES = {"config.json", *REMOTE_CODE, *HF_SHARDS, "model.safetensors.index.json",
                 "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "README.md"}
"""The files on the real -hf repository's main branch (the reference's listing), but its ``assets/`` folder,
whose contents were not listed (the fake has none)."""
REPOS = {REAL_VISION: {"config.json", "model.safetensors", "preprocessor_config.json"},
         REAL_LLM: {"config.json", "generation_config.json", "model.safetensors.index.json",
                    "tokenizer.json"},
         OTHER_LLM: {"config.json", "generation_config.json", "model.safetensors.index.json",
                     "tokenizer.json"},
         REAL_PROJECTOR: {"mm_projector.bin"},
         REAL_HF: REAL_HF_FILES}
EXACT = {REAL_HF}
"""Repositories whose fake holds exactly the real file list (the others hold at least the files named)."""

# The real -hf config.json, key by key (reference, "The real -hf repository")
REAL_HF_TOP = {"architectures": ["Llamavision"], "model_type": "llamavision", "torch_dtype": "float16",
               "transformers_version": "4.40.1",
               "auto_map": {"AutoConfig": "configuration_llamavision.LlamavisionConfig",
                            "AutoModelForCausalLM": "modeling_llamavision.Llamavision"}}
REAL_TEXT_CONFIG = {"_name_or_path": "unsloth/llama-3-8b-Instruct", "architectures": ["LlamaForCausalLM"],
                    "bos_token_id": 128000, "eos_token_id": 128001, "intermediate_size": 14336,
                    "max_length": 8192, "max_position_embeddings": 8192, "model_type": "llama",
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                    "torch_dtype": "bfloat16", "vocab_size": 128256}
REAL_VISION_CONFIG = {"_name_or_path": "google/siglip-so400m-patch14-384", "hidden_size": 1152,
                      "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
REAL_CONFIGS = {"text_config": REAL_TEXT_CONFIG, "vision_config": REAL_VISION_CONFIG}
TEXT_ADDITIONS = {"hidden_size", "num_hidden_layers", "num_attention_heads"}
"""What the fake's text_config adds: the sizes the real file leaves to LlamaConfig's defaults."""
OFFICIAL_TREE = re.compile(r"^(text_model\.model\.|text_model\.lm_head\.weight$|"
                           r"vision_model\.vision_model\.(embeddings|encoder|post_layernorm|head)\.|"
                           r"mm_projector\.model\.[02]\.(weight|bias)$)")
"""Checkpoint keys by the official module tree (Llamavision: text_model, vision_model, mm_projector)."""
PROMPT = ("<|start_header_id|>user<|end_header_id|>\n\n<image>what is this?<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")
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
    names = {path.name for path in snapshot.iterdir()}
    assert names == REPOS[repo_id] if repo_id in EXACT else REPOS[repo_id] <= names, sorted(names)
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
    assert (generation["top_p"] == 0.9 and generation["max_length"] == 4096
            and len(generation["eos_token_id"]) == 2)
    projector = torch.load(hf_hub_download(REAL_PROJECTOR, "mm_projector.bin"), weights_only=True)
    assert sorted(projector) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    # the -hf repository: test_fake_hf_repository_is_laid_out_as_the_real_one


def _snapshot(repo_id):
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id))


def _tensors(folder, names=None):
    """Every tensor of the safetensors files ``names`` (default: all) in ``folder``, by key."""
    from safetensors.torch import load_file

    files = [folder / name for name in names] if names else sorted(folder.glob("*.safetensors"))
    return {key: tensor for file in files for key, tensor in load_file(str(file)).items()}


def test_fake_hf_repository_is_laid_out_as_the_real_one(fake_hub):
    """config.json key by key, the official module tree in four shards and their index, the tokenizer's
    special tokens, and the two remote-code files (our stand-ins)."""
    from huggingface_hub import hf_hub_download

    snapshot = _snapshot(REAL_HF)
    config = json.loads((snapshot / "config.json").read_text())
    llm = json.loads(Path(hf_hub_download(REAL_LLM, "config.json")).read_text())
    siglip = json.loads(Path(hf_hub_download(REAL_VISION, "config.json")).read_text())["vision_config"]
    assert set(config) == set(REAL_HF_TOP) | {"text_config", "vision_config"}
    assert {key: config[key] for key in REAL_HF_TOP} == REAL_HF_TOP
    text, vision = config["text_config"], config["vision_config"]
    assert set(text) == set(REAL_TEXT_CONFIG) | TEXT_ADDITIONS, sorted(set(text) ^ set(REAL_TEXT_CONFIG))
    assert set(vision) == set(REAL_VISION_CONFIG) and "vision_use_head" not in vision
    for key in ("_name_or_path", "architectures", "model_type", "rope_theta", "torch_dtype"):
        assert text[key] == REAL_TEXT_CONFIG[key], key  # the values that are no size
    assert vision["_name_or_path"] == REAL_VISION_CONFIG["_name_or_path"]
    assert vision["model_type"] == "siglip_vision_model"
    # the tiny values: the same model as the alpha form's LLM and SigLIP
    for key in TEXT_ADDITIONS | {"intermediate_size", "max_position_embeddings", "num_key_value_heads",
                                 "rms_norm_eps", "vocab_size", "bos_token_id"}:
        assert text[key] == llm[key], key
    assert text["max_length"] == text["max_position_embeddings"]  # as the real file's 8192 and 8192
    for key in set(REAL_VISION_CONFIG) - {"_name_or_path", "model_type"}:
        assert vision[key] == siglip[key], key

    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(set(weight_map.values())) == HF_SHARDS
    assert sorted(path.name for path in snapshot.glob("*.safetensors")) == HF_SHARDS
    shards = {name: _tensors(snapshot, [name]) for name in HF_SHARDS}
    assert all(shards.values())  # four non-empty shards ...
    held = [key for tensors in shards.values() for key in tensors]
    assert len(held) == len(set(held)) and set(held) == set(weight_map)  # ... whose union is the weight_map
    assert all(weight_map[key] == name for name, tensors in shards.items() for key in tensors)
    tensors = {key: tensor for part in shards.values() for key, tensor in part.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    assert [key for key in weight_map if not OFFICIAL_TREE.match(key)] == []
    for part in ("text_model.model.embed_tokens.", "text_model.model.layers.", "text_model.model.norm.",
                 "text_model.lm_head.weight", *(f"vision_model.vision_model.{name}." for name in
                                                ("embeddings", "encoder", "post_layernorm", "head")),
                 "mm_projector.model.0.", "mm_projector.model.2."):
        assert any(key.startswith(part) for key in weight_map), part  # every part there, the pooling head too
    assert not OFFICIAL_TREE.match("vision_model.embeddings.patch_embedding.weight")  # the pattern is strict
    assert not OFFICIAL_TREE.match("text_model.embed_tokens.weight")

    special = json.loads((snapshot / "special_tokens_map.json").read_text())
    content = {name: value["content"] if isinstance(value, dict) else value
               for name, value in special.items()}
    assert content == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                       "pad_token": "<|end_of_text|>"}
    loaded = loading.load_tokenizer(REAL_HF)
    assert loaded.bos_token == "<|begin_of_text|>"
    assert loaded.eos_token == loaded.pad_token == "<|end_of_text|>"
    assert loaded.pad_token_id == loaded.eos_token_id
    assert text["eos_token_id"] == loaded.eos_token_id  # as the real 128001: <|end_of_text|>, not <|eot_id|>
    assert text["eos_token_id"] != loaded.convert_tokens_to_ids("<|eot_id|>")
    for name in REMOTE_CODE:
        code = (snapshot / name).read_text()
        assert "NOT the official code" in code and REMOTE_CODE_MARKER in code and "raise RuntimeError" in code


def test_the_hf_repository_holds_the_alpha_forms_weights(fake_hub):
    """Key by key, the -hf shards hold the alpha form's LLM, SigLIP vision tower (with its head) and
    projector, cast to float16 -- so both forms are the same model. A fine-tuned LLM does not pass."""
    hf = _tensors(_snapshot(REAL_HF))
    google = _tensors(_snapshot(REAL_VISION))
    projector = torch.load(_snapshot(REAL_PROJECTOR) / "mm_projector.bin", weights_only=True)

    def expected(llm):
        return {**{f"text_model.{key}": tensor for key, tensor in _tensors(_snapshot(llm)).items()},
                **{f"vision_model.{key}": tensor for key, tensor in google.items()
                   if key.startswith("vision_model.")},
                **{f"mm_projector.model.{key.removeprefix('model.mm_projector.')}": tensor
                   for key, tensor in projector.items()}}

    alpha = expected(REAL_LLM)
    assert set(hf) == set(alpha)
    unequal = [key for key in hf if not torch.equal(hf[key], alpha[key].to(torch.float16))]
    assert unequal == []
    other = expected(OTHER_LLM)  # negative control: the fine-tune's LLM is not what the -hf repository holds
    assert all(not torch.equal(hf[key], other[key].to(torch.float16))
               for key in hf if key.startswith("text_model."))


def _real_shaped_config():
    """The fake -hf config.json as the real one is: without the three text sizes the fake adds."""
    config = json.loads((_snapshot(REAL_HF) / "config.json").read_text())
    for key in TEXT_ADDITIONS:
        del config["text_config"][key]
    return config


def test_the_text_sizes_the_real_config_leaves_out_are_llamaconfigs_defaults(fake_hub, tmp_path):
    from transformers import LlamaConfig

    defaults = LlamaConfig()
    text, vision = loading._sub_configs(_real_shaped_config())
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 32, 32)
    assert (defaults.hidden_size, defaults.num_hidden_layers, defaults.num_attention_heads) == (4096, 32, 32)
    assert text.num_key_value_heads == 2 and vision.hidden_size == 32  # the rest is still the file's
    text, _ = loading._sub_configs(json.loads((_snapshot(REAL_HF) / "config.json").read_text()))
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)  # the fake's
    # the real file's values: Llama-3-8B exactly, GQA with 8 of 32 heads, head_dim 128
    text, vision = loading._sub_configs(REAL_CONFIGS)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.hidden_size // text.num_attention_heads, text.vocab_size) == (4096, 32, 32, 8, 128, 128256)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size // vision.patch_size) == \
        (1152, 27, 27)
    # the loader takes the defaults too: the tiny weights then disagree with the config, and it says so
    folder = tmp_path / "real-shaped"
    shutil.copytree(_snapshot(REAL_HF), folder)  # the links' targets, copied
    (folder / "config.json").write_text(json.dumps(_real_shaped_config()))
    with pytest.raises(ValueError, match=r"text_config.num_hidden_layers = 32, but the weights hold 2"):
        LlamaVision.from_pretrained(folder)


def test_the_real_configs_module_tree_gives_the_real_indexs_743_names(fake_hub):
    """The official module tree at the real sizes (on the meta device): 291 LLM + 448 SigLIP (pooling head
    included) + 4 projector tensors, whose index is 750 lines long like the real one; and the fake's keys are
    the same names but for the layer numbers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    from llama3vision_min.projector import ProjectionModule

    text, vision = loading._sub_configs(REAL_CONFIGS)
    with init_empty_weights():
        parts = {"text_model.": AutoModelForCausalLM.from_config(text),
                 "vision_model.vision_model.": SiglipVisionModel(vision),
                 "mm_projector.": ProjectionModule(vision.hidden_size, text.hidden_size)}
    names = [prefix + key.removeprefix("vision_model.") if prefix.startswith("vision") else prefix + key
             for prefix, module in parts.items() for key in module.state_dict()]
    assert [name for name in names if not OFFICIAL_TREE.match(name)] == []
    assert len(names) == 743 == 32 * 9 + 3 + 27 * 16 + 16 + 4
    index = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(sorted(names), HF_SHARDS[0])}
    assert len(json.dumps(index, indent=2, sort_keys=True).splitlines()) == 750  # the real index's length

    def shape_of(keys):
        return {re.sub(r"\.layers\.\d+\.", ".layers.N.", key) for key in keys}

    fake = json.loads((_snapshot(REAL_HF) / "model.safetensors.index.json").read_text())["weight_map"]
    assert shape_of(fake) == shape_of(names)
    assert shape_of(fake) != shape_of(key for key in names if ".head." not in key)  # the head counts


# -- loading the real ids -----------------------------------------------------------------------
def test_alpha_form_loads_from_the_hub_ids_where_and_as_chosen(alpha, tokenizer):
    device = model_module.choose_device()  # the GPU when there is one, else the CPU
    assert alpha.device.type == device.type
    # one dtype for the whole model, chosen from the LLM's stored bfloat16: float16 on a GPU, never on a CPU
    expected = model_module.choose_dtype(device, torch.bfloat16)
    assert {p.dtype for p in alpha.parameters()} == {expected}
    assert device.type == "cuda" or expected in (torch.bfloat16, torch.float32)
    ids = alpha.answer_question(Image.open(PHOTO), "what is this?", tokenizer, do_sample=False,
                                max_new_tokens=4, min_new_tokens=4)
    assert ids.shape == (4,)


def test_hf_form_loads_from_the_hub_id_and_a_float16_checkpoint_leaves_float16_on_a_cpu(fake_hub,
                                                                                        monkeypatch):
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    for shard in HF_SHARDS:
        with safe_open(hf_hub_download(REAL_HF, shard), framework="pt") as handle:
            assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float16}  # as the real
    for computes_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(model_module, "cpu_computes_bfloat16", lambda: computes_bf16)
        model = LlamaVision.from_pretrained(REAL_HF)
        assert model.device.type == "cpu" and {p.dtype for p in model.parameters()} == {expected}
    # if asked
    assert LlamaVision.from_pretrained(REAL_HF, dtype=torch.float16).text_model.dtype == torch.float16


def test_the_remote_code_is_neither_downloaded_nor_run(fake_hub, monkeypatch):
    """What huggingface_hub is asked for while both -hf loaders run, replayed over the real repository's file
    list: no .py file passes; and the stand-ins never ran (no marker, nothing in sys.modules)."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub.utils import filter_repo_objects

    asked = []

    def spy(module, name):
        real = getattr(module, name)

        def recording(*args, **kwargs):
            asked.append((name, args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    for module in (huggingface_hub, transformers_hub):  # transformers keeps its own references
        for name in ("snapshot_download", "hf_hub_download"):
            spy(module, name)
    LlamaVision.from_pretrained(REAL_HF)
    loading.load_tokenizer(REAL_HF)
    assert len(asked) >= 2, asked  # both went to the (fake) Hub
    fetched = set()
    for name, args, kwargs in asked:
        assert kwargs.get("repo_id", args[0] if args else None) == REAL_HF
        if name == "snapshot_download":
            assert kwargs.get("allow_patterns"), kwargs  # no patterns would mean every file
            fetched |= set(filter_repo_objects(sorted(REAL_HF_FILES), allow_patterns=kwargs["allow_patterns"],
                                               ignore_patterns=kwargs.get("ignore_patterns")))
        else:
            fetched.add(kwargs.get("filename", args[1] if len(args) > 1 else None))
    assert [name for name in fetched if not name or name.endswith(".py")] == []
    assert {"config.json", "model.safetensors.index.json", *HF_SHARDS, "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= fetched  # what the loaders do need
    assert REMOTE_CODE <= set(filter_repo_objects(sorted(REAL_HF_FILES)))  # negative control: unfiltered
    assert not (Path(fake_hub) / REMOTE_CODE_MARKER).exists()
    modules = {Path(file).stem for file in REMOTE_CODE}
    assert [name for name in sys.modules if name.rsplit(".", 1)[-1] in modules] == []


def test_the_remote_code_stand_ins_would_show_if_they_ran(fake_hub, tmp_path):
    """Negative control of the test above: transformers with trust_remote_code=True does import the stand-in,
    which leaves its marker and stops the load (in a child process, under another HF_HOME)."""
    code = "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1], " \
           "trust_remote_code=True)"
    done = subprocess.run([sys.executable, "-c", code, str(_snapshot(REAL_HF))], env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "remote code must never run here" in done.stderr, done.stderr[-2000:]
    assert "configuration_llamavision" in (tmp_path / REMOTE_CODE_MARKER).read_text()
    assert not (Path(fake_hub) / REMOTE_CODE_MARKER).exists()


@pytest.mark.parametrize("stored, device, bf16, expected", [
    (torch.float16, "cpu", True, torch.bfloat16), (torch.float16, "cpu", False, torch.float32),
    (torch.bfloat16, "cpu", False, torch.float32), (torch.float32, "cpu", True, torch.float32),
    (torch.float32, "cuda", False, torch.float16), (torch.bfloat16, "cuda:0", True, torch.float16)])
def test_dtype_choice(monkeypatch, stored, device, bf16, expected):
    monkeypatch.setattr(model_module, "cpu_computes_bfloat16", lambda: bf16)
    assert model_module.choose_dtype(device, stored) == expected


class Heard(logging.Handler):
    """Collects what transformers logs (its own handler writes to a stderr that pytest holds elsewhere)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class ForceAt:
    """A logits processor that leaves ``token`` the only choice at generated position ``step`` (0-based)."""

    def __init__(self, token, step):
        self.token, self.step = token, step

    def __call__(self, input_ids, scores):  # with inputs_embeds alone, input_ids holds the new tokens only
        if input_ids.shape[1] != self.step:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0
        return forced


def test_both_forms_are_one_model_and_generate_alike_quietly(fake_hub, tokenizer, recwarn):
    """Llama 3's generation_config (top_p 0.9, max_length 4096) no longer leaks into the alpha form; nothing
    warns about max_length, and SigLIP's unused text tower is neither loaded nor reported. Both forms are
    one model: the same greedy ids and close logits, each with its own repository's tokenizer -- the -hf
    one, whose eos is <|end_of_text|>, still stops at <|eot_id|>."""
    image = Image.open(PHOTO)
    hf_tokenizer = loading.load_tokenizer(REAL_HF)
    heard, logger = Heard(), logging.getLogger("transformers")
    logger.addHandler(heard)
    try:
        hf = LlamaVision.from_pretrained(REAL_HF)
        fresh = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR)
        fresh.answer_question(image, "what is this?", tokenizer, max_new_tokens=3)
        hf.answer_question(image, "what is this?", hf_tokenizer, max_new_tokens=3)
    finally:
        logger.removeHandler(heard)
    # the same settings but for the end id each config names, which differs as the real files' do: the -hf
    # text_config names <|end_of_text|> (128001), the LLM repository's config <|eot_id|>
    settings = [{key: value for key, value in model.text_model.generation_config.to_diff_dict().items()
                 if key != "eos_token_id"} for model in (fresh, hf)]
    assert settings[0] == settings[1]
    assert hf.text_model.generation_config.eos_token_id == hf_tokenizer.eos_token_id
    assert fresh.text_model.generation_config.top_p in (None, 1.0)
    assert fresh.text_model.generation_config.max_length in (None, 20)  # the library default, not 4096
    said = "\n".join(heard.messages + [str(warning.message) for warning in recwarn])
    for noise in ("max_length", "max_new_tokens", "LOAD REPORT", "UNEXPECTED", "text_model."):
        assert noise not in said, (noise, said[-2000:])

    # one model: in float32 the forms differ only by SigLIP's float16 rounding in the -hf files
    def alpha_form(llm):
        return LlamaVision.from_alpha(llm, REAL_VISION, REAL_PROJECTOR, dtype=torch.float32), tokenizer

    forms = {"hf": (LlamaVision.from_pretrained(REAL_HF, dtype=torch.float32), hf_tokenizer),
             "alpha": alpha_form(REAL_LLM), "swapped": alpha_form(OTHER_LLM)}
    ids = {name: LlamaVision.tokenizer_image_token(PROMPT, tok) for name, (_, tok) in forms.items()}
    assert torch.equal(ids["hf"], ids["alpha"])
    with torch.no_grad():
        logits = {name: model(input_ids=ids[name][None], pixel_values=model.preprocess([image])).logits
                  for name, (model, _) in forms.items()}
    torch.testing.assert_close(logits["hf"], logits["alpha"], atol=0.05, rtol=0)
    assert (logits["swapped"] - logits["alpha"]).abs().max() > 0.2  # negative control: another LLM is seen
    greedy = {name: model.answer_question(image, "what is this?", tok, do_sample=False, max_new_tokens=12,
                                          min_new_tokens=12).tolist() for name, (model, tok) in forms.items()}
    assert greedy["hf"] == greedy["alpha"] and len(greedy["hf"]) == 12

    # the -hf tokenizer's eos is <|end_of_text|>, yet an <|eot_id|> ends the answer
    from transformers import LogitsProcessorList

    model, eot = forms["hf"][0], hf_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert hf_tokenizer.eos_token == "<|end_of_text|>" and eot != hf_tokenizer.eos_token_id

    def answer(**kwargs):
        forced = LogitsProcessorList([ForceAt(eot, 2)])
        return model.answer_question(image, "what is this?", hf_tokenizer, do_sample=False, max_new_tokens=8,
                                     logits_processor=forced, **kwargs).tolist()

    stopped = answer()
    assert stopped[:2] == greedy["hf"][:2] and stopped[2:] == [eot]
    ran_on = answer(eos_token_id=[hf_tokenizer.eos_token_id])  # negative control: the tokenizer's eos alone
    assert len(ran_on) == 8 and ran_on[2] == eot


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


@pytest.mark.skipif(not HAS_BITSANDBYTES,
                    reason="bitsandbytes is not installed (pip install 'llama3vision-min[quant]')")
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
    assert (backend.name == "real" and "on the CPU" in backend.description
            and backend.model.device.type == "cpu")
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
    assert _cli("ask", "--image", str(PHOTO), "what is this?", "--model", REAL_HF,
                "--max-new-tokens", "3") == 0


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
    (["--llm", "nobody/no-such-llm"], "could not load model 'nobody/no-such-llm'"),
])
def test_cli_refuses_what_does_not_go_together_in_one_line(fake_hub, capsys, argv, words):
    assert _cli("ask", "--image", str(PHOTO), "what is this?", *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and words in err, err


def test_stage1_trial_runs_on_the_cpu_with_the_real_ids(fake_hub, tmp_path):
    """The trainer's command line with its defaults (the real ids), in a process of its own (accelerate's
    state is one per process)."""
    from llama3vision_min.projector import load_projector

    data = Path(fake_hub) / "LLaVA-Pretrain"
    done = subprocess.run([sys.executable, "-m", "llama3vision_min.training.stage1",
                           "--data", str(data / "blip_laion_cc_sbu_558k.json"),
                           "--images", str(data / "images"),
                           "--out", str(tmp_path), "--max-steps", "2", "--per-device-batch", "4",
                           "--global-batch", "8", "--num-workers", "0"],
                          env=offline_env(fake_hub), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 updates" in done.stdout, done.stderr[-3000:]
    assert "no GPU: training on the CPU" in done.stderr or torch.cuda.is_available()
    projector = load_projector(tmp_path / "mm_projector.safetensors")
    assert projector.mm_hidden_size == 32 and projector.hidden_size == 64  # the fake SigLIP and Llama widths


# -- the README's code on the real path (the notebooks: tests/repo/test_colab.py, from the wheel) ------------
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
