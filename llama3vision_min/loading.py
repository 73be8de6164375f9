"""Step 8: both published forms, loaded without ``trust_remote_code``.

* **-hf** (``qresearch/llama-3-vision-alpha-hf``): ``config.json`` with ``text_config`` and
  ``vision_config``; safetensors keyed ``text_model.``, ``vision_model.``, ``mm_projector.`` --
  ``LlamaVision``'s own attribute names. One pass reads every tensor under one name (whatever form its key
  came in) and checks sizes, shards, dtypes and duplicates; the model is built on the meta device and filled
  by one ``load_state_dict(strict=True, assign=True)``, as nanochat's ``checkpoint_manager.py`` does.
* **alpha** (``qresearch/llama-3-vision-alpha``): a Llama 3 LLM and a SigLIP model as they are, plus
  ``mm_projector.bin`` (``projector.load_projector`` reads it without running code).

Device, dtype and ``implementation="scratch"`` are ``from_pretrained`` and ``from_alpha``'s (``model.py``).
Sources: https://huggingface.co/qresearch/llama-3-vision-alpha-hf/tree/main, the alpha form's script
(https://huggingface.co/qresearch/llama-3-vision-alpha) and nanochat's checkpoint manager
(https://github.com/karpathy/nanochat/blob/master/nanochat/checkpoint_manager.py).
"""

import json
import threading
from pathlib import Path

from safetensors import safe_open

from .generation import reset_generation_config
from .projector import ProjectionModule, load_projector, projector_key

SKIPPED = ("rotary_emb.inv_freq", "embeddings.position_ids")  # buffers older transformers saved

BUILDING = threading.RLock()
"""Held while modules are built on the meta device and filled: accelerate's ``init_empty_weights`` patches
``nn.Module`` for the whole process, so a load in another thread would see its parameters moved there.
Loads from several threads run one after another; other code making modules meanwhile is not covered."""


def model_key(key, nested_siglip=False):
    """A -hf checkpoint key in any of its forms as ``LlamaVision`` names it (a key of no part is refused,
    not ignored). The projector's four forms become one; SigLIP's keys, nested (``vision_model.vision_model.
    X``, as transformers 4.x writes them) or flat, come out flat, or nested with ``nested_siglip=True``."""
    if projector_key(key):
        return "mm_projector." + projector_key(key)
    part, _, inner = key.partition(".")
    if part == "vision_model":
        return "vision_model." + "vision_model." * nested_siglip + inner.removeprefix("vision_model.")
    if part not in ("text_model", "mm_projector"):
        raise ValueError(f"{key} belongs to no part of the model (text_model., vision_model., mm_projector.)")
    return key


def _nests_siglip(tower):
    """True when transformers' ``SiglipVisionModel`` keys its weights ``vision_model.X`` (4.x), not ``X``."""
    return any(key.startswith("vision_model.") for key in tower.state_dict())


# -- a checkpoint folder: found, its configs and weights read and checked --------------------------------
def _resolve_folder(path_or_hub_id, allow_patterns):
    """A local folder as it is, or a Hub repository downloaded (``allow_patterns`` only: never code)."""
    local, name = Path(path_or_hub_id), str(path_or_hub_id)
    if local.is_dir():
        return local
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ValueError(f"expected a model folder or a Hub id like 'owner/name', got {path_or_hub_id!r}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"could not download {path_or_hub_id!r} from the Hugging Face Hub: "
                         f"{type(error).__name__}: {reason}") from None


def load_tokenizer(path_or_hub_id):
    """The tokenizer saved beside a checkpoint, as a ``PreTrainedTokenizerFast`` (``AutoTokenizer`` would
    also read ``config.json``, whose ``llamavision`` type transformers does not know)."""
    from transformers import PreTrainedTokenizerFast

    folder = _resolve_folder(path_or_hub_id, ["*.json", "*.jinja", "tokenizer*"])
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"expected tokenizer.json in {folder}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _read_config(folder):
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"expected config.json in {folder}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, found a {type(config).__name__}")
    return config


def _siglip_vision_config(vision):
    """A ``SiglipVisionConfig`` from a vision-config dict, or from a full SigLIP config that nests one."""
    from transformers import SiglipVisionConfig

    vision = vision.get("vision_config", vision)
    return SiglipVisionConfig(**{key: value for key, value in vision.items() if key != "model_type"})


def _sub_configs(config):
    """The text and vision transformers configs of the -hf ``config.json`` dict."""
    from transformers import AutoConfig

    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ValueError("expected a llama-3-vision-alpha-hf config.json with 'text_config' and "
                         f"'vision_config', found keys {sorted(config)}")
    text = dict(text)
    try:
        return AutoConfig.for_model(text.pop("model_type", "llama"), **text), _siglip_vision_config(vision)
    except Exception as error:  # transformers 5's configs raise their own validation errors
        raise ValueError("config.json's text_config or vision_config cannot be read: "
                         f"{' '.join(str(error).split())}") from None


def _weight_files(folder):
    """The folder's safetensors: the shards its index names (each inside the folder), else the single file."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        if (folder / "model.safetensors").is_file():
            return [folder / "model.safetensors"]
        raise ValueError(f"expected model.safetensors or {index.name} in {folder}, "
                         f"found {sorted(p.name for p in folder.iterdir())}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{index} is not a JSON object: {error}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} must hold a 'weight_map' of tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    outside = [shard for shard in shards if Path(shard).is_absolute() or ".." in Path(shard).parts]
    if outside:  # refused before the file system is asked anything about them
        raise ValueError(f"{index} names shard {outside[0]!r} outside the model folder")
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise ValueError(f"{index} names shard {missing[0]!r}, which is not in {folder}")
    return [folder / shard for shard in shards]


def _read_weights(folder, name_of):
    """Every tensor of the folder's safetensors under ``name_of(key)`` (None: never read); a name twice is
    refused (two key forms of one weight in one checkpoint)."""
    state = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    name = name_of(key)
                    if name in state:
                        raise ValueError(f"{key} holds {name} a second time (two key forms in one file)")
                    if name is not None:
                        state[name] = handle.get_tensor(key)
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None
        except Exception as error:  # safetensors raises its own SafetensorError type
            raise ValueError(f"{file} is not a readable safetensors file: {error}") from None
    return state


def _check_sizes(folder, state, text_config, vision_config):
    """Each config's sizes are whole positive numbers that agree with the weights: checked before anything is
    built (a config asking for millions of layers would otherwise be built first)."""
    for what, config in (("text_config", text_config), ("vision_config", vision_config)):
        text = what == "text_config"
        sizes = ("vocab_size",) if text else ("image_size", "patch_size")
        optional = ("num_key_value_heads", "head_dim") if text else ()  # None: transformers' default
        for name in sizes + ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") \
                + optional:
            value = getattr(config, name, None)
            if (value is not None or name not in optional) and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{folder}: {what}.{name} must be a whole number >= 1, found {value!r}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{folder}: {what}.hidden_size ({config.hidden_size}) is not a multiple of "
                             f"num_attention_heads ({config.num_attention_heads})")
        kv_heads = getattr(config, "num_key_value_heads", None) if text else None
        if kv_heads and config.num_attention_heads % kv_heads:
            raise ValueError(f"{folder}: {what}.num_attention_heads ({config.num_attention_heads}) is not a "
                             f"multiple of num_key_value_heads ({kv_heads})")
        layer = "text_model.model.layers." if text else "encoder.layers."
        layers = sorted((int(key.split(layer)[1].split(".")[0]), key) for key in state if layer in key)
        if layers and layers[-1][0] + 1 != config.num_hidden_layers:
            raise ValueError(f"{folder}: config.json gives {what}.num_hidden_layers = "
                             f"{config.num_hidden_layers}, but the weights hold {layers[-1][0] + 1} layers, "
                             f"the last {layers[-1][1]}")
        names = ("vocab_size", "hidden_size") if text else ("hidden_size", "patch_size")
        ending = "embed_tokens.weight" if text else "patch_embedding.weight"  # (vocab, width), (width..patch)
        key = next((key for key in state if key.endswith(ending)), None)
        said, found = tuple(getattr(config, name) for name in names), key and (state[key].shape[0],
                                                                                state[key].shape[-1])
        if key and found != said:
            raise ValueError(f"{folder}: config.json gives {what}.({', '.join(names)}) = {said}, but the "
                             f"weights hold {found} ({key})")


def load_strict(module, state, folder):
    """Fill ``module`` (built on the meta device) with ``state`` in one ``load_state_dict(strict=True,
    assign=True)``, after checking every name, shape and dtype so that each refusal names its weight."""
    expected = module.state_dict()
    state = {key: tensor for key, tensor in state.items() if key in expected or not key.endswith(SKIPPED)}
    for key in sorted(set(state) & set(expected)):
        if expected[key].is_floating_point() and not state[key].is_floating_point():
            raise ValueError(f"{folder}: {key} must hold floating-point weights, found {state[key].dtype}")
        if state[key].shape != expected[key].shape:
            raise ValueError(f"{folder}: the {key.split('.')[0]} weights do not fit its config: {key} holds "
                             f"{tuple(state[key].shape)}, the config asks for {tuple(expected[key].shape)}")
    for keys, what in ((sorted(set(expected) - set(state)), "the checkpoint lacks {n} weights"),
                       (sorted(set(state) - set(expected)), "{n} unexpected weights")):
        if keys:
            raise ValueError(f"{folder}: {what.format(n=len(keys))}, e.g. {keys[:3]}")
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def load_hf_layout(cls, path_or_hub_id):
    """The -hf form on the CPU, as stored: the configs and every tensor read and checked, the three parts
    built on the meta device and filled in one strict load (the caller holds ``BUILDING``)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    folder = _resolve_folder(path_or_hub_id, ["*.json", "*.jinja", "*.safetensors", "tokenizer*"])
    text_config, vision_config = _sub_configs(_read_config(folder))
    state = _read_weights(folder, model_key)
    _check_sizes(folder, state, text_config, vision_config)
    if text_config.tie_word_embeddings and "text_model.model.embed_tokens.weight" in state:
        state.setdefault("text_model.lm_head.weight", state["text_model.model.embed_tokens.weight"])
    if not any(key.startswith("vision_model.head.") for key in state):
        vision_config.vision_use_head = False  # the pooling head is not used: a checkpoint may leave it out
    for key in [key for key in state if key.startswith("mm_projector.")]:
        if state[key].is_floating_point() and not state[key].isfinite().all():
            raise ValueError(f"{folder}: {key} holds NaN or infinite values")
    with init_empty_weights():  # the caller holds BUILDING (LlamaVision.from_pretrained)
        try:  # what the size checks cannot see, e.g. a RoPE type transformers does not know
            model = cls(vision_model=SiglipVisionModel(vision_config),
                        text_model=AutoModelForCausalLM.from_config(text_config),
                        mm_projector=ProjectionModule(vision_config.hidden_size, text_config.hidden_size))
        except (ArithmeticError, LookupError, TypeError, AttributeError) as error:
            raise ValueError(f"{folder}: config.json describes a model transformers cannot build: "
                             f"{type(error).__name__}: {error}") from None
    if _nests_siglip(model.vision_model):
        state = {model_key(key, nested_siglip=True): tensor for key, tensor in state.items()}
    load_strict(model, state, folder)
    if text_config.tie_word_embeddings:
        model.text_model.tie_weights()
    reset_generation_config(model.text_model)
    return model


def load_vision_tower(path_or_hub_id):
    """SigLIP's vision tower from a folder or Hub id holding a full ``SiglipModel`` (as
    ``google/siglip-so400m-patch14-384`` does) or a ``SiglipVisionModel``: only the vision tensors are
    read."""
    from accelerate import init_empty_weights
    from transformers import SiglipVisionModel

    folder = _resolve_folder(path_or_hub_id, ["*.json", "*.safetensors"])
    vision_config = _siglip_vision_config(_read_config(folder))
    text_tower = ("text_model.", "logit_scale", "logit_bias")  # the rest of a full SiglipModel: never read
    state = _read_weights(folder, lambda key: None if key.startswith(text_tower) else
                          key.removeprefix("vision_model."))
    if not any(key.startswith("head.") for key in state):
        vision_config.vision_use_head = False
    with BUILDING:  # built on the meta device and filled before another load may start
        with init_empty_weights():
            tower = SiglipVisionModel(vision_config)
        tower.config.name_or_path = str(path_or_hub_id)  # recorded, as from_pretrained does
        nested = "vision_model." * _nests_siglip(tower)
        return load_strict(tower, {nested + key: tensor for key, tensor in state.items()}, folder)


# -- the alpha form ------------------------------------------------------------------------------------
def load_alpha_form(cls, llm, vision, projector, dtype, device, load_in_4bit=False, load_in_8bit=False):
    """Any Llama 3 LLM + a SigLIP model + a projector file -> ``LlamaVision`` in ``dtype`` on ``device``
    (the caller holds ``BUILDING``: transformers builds on the meta device too).

    ``projector``: a file, a folder holding ``mm_projector.*`` or a Hub id; None starts a fresh, untrained
    projector (stage-1 training). ``load_in_4bit`` / ``load_in_8bit`` quantise the LLM with bitsandbytes
    (on a GPU, or on a CPU with bitsandbytes >= 0.49).
    """
    import importlib.util

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized, llm_kwargs = load_in_4bit or load_in_8bit, {"dtype": dtype, "trust_remote_code": False}
    if quantized:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("4-bit/8-bit loading needs bitsandbytes (0.49 or newer also runs on a CPU): "
                             "pip install 'llama3vision-min[quant]'")
        llm_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, bnb_4bit_compute_dtype=dtype)
        llm_kwargs["device_map"] = {"": str(device)}
    try:
        text_model = reset_generation_config(AutoModelForCausalLM.from_pretrained(llm, **llm_kwargs))
    except (ArithmeticError, LookupError, TypeError, AttributeError) as error:  # e.g. head_dim 0
        raise ValueError(f"the LLM {llm!r} cannot be built from its config: {type(error).__name__}: "
                         f"{error}") from None
    vision_model = load_vision_tower(vision)
    widths = vision_model.config.hidden_size, text_model.config.hidden_size
    if projector is None:
        projector = ProjectionModule(*widths)
    else:
        local = Path(projector).exists()
        projector = load_projector(projector if local else _resolve_folder(projector, ["mm_projector.*"]))
    if (projector.mm_hidden_size, projector.hidden_size) != widths:
        raise ValueError(f"the projector maps {projector.mm_hidden_size}-wide features to "
                         f"{projector.hidden_size}-wide vectors, but the vision model gives {widths[0]} and "
                         f"the LLM embeds in {widths[1]}")
    for part in (vision_model, projector) + ((text_model,) if not quantized else ()):
        part.to(device=device, dtype=dtype)
    return cls(vision_model=vision_model, text_model=text_model, mm_projector=projector).eval()
