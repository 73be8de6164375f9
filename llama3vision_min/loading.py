"""Step 8: checkpoint loading and saving, for both published forms, without ``trust_remote_code``.

* The **alpha form** (``qresearch/llama-3-vision-alpha``): a Llama 3 LLM and a SigLIP
  model loaded as they are, plus ``mm_projector.bin``, the trained projector.
* The **-hf form** (``qresearch/llama-3-vision-alpha-hf``): one folder with a
  ``config.json`` holding ``text_config`` and ``vision_config``, and safetensors whose
  keys start with ``text_model.``, ``vision_model.`` or ``mm_projector.``.

Pickled ``.bin`` files are read with ``torch.load(..., weights_only=True)``: a file that
tries to run code while loading is refused, and the code does not run.

Sources: the alpha form's script (https://huggingface.co/qresearch/llama-3-vision-alpha), which reads
``mm_projector.bin`` with plain ``torch.load`` and strips ``mm_projector.`` from its keys (transcribed in
``load_alpha_projector_state``, ``llama3vision_original.py``); the ``-hf`` repository's files
(https://huggingface.co/qresearch/llama-3-vision-alpha-hf/tree/main); LLaVA's projector keys come from
its trainer (``llava/train/train.py``, ``get_mm_adapter_state_maybe_zero_3``). Sharding follows
``huggingface_hub``'s ``split_torch_state_dict_into_shards``.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .constants import IMAGE_TOKEN_INDEX
from .projector import ProjectionModule

PROJECTOR_KEY = re.compile(r"^(?:model\.mm_projector\.|mm_projector\.model\.|mm_projector\.|model\.)([02])\.(weight|bias)$")
"""The projector's key forms: LLaVA (``model.mm_projector.0.weight``), prefixed
(``mm_projector.model.0.weight``), bare LLaVA (``mm_projector.0.weight``) and stripped
(``model.0.weight``). All become ``model.0.weight``."""

HARMLESS_EXTRA_KEYS = ("rotary_emb.inv_freq", "embeddings.position_ids")
"""Buffers that older transformers versions saved and newer ones recompute: skipped on load."""

PREFIXES = ("text_model.", "vision_model.", "mm_projector.")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# -- reading tensors safely --------------------------------------------------------------
def read_state_dict(path):
    """Read a ``.safetensors`` or ``.bin``/``.pt`` file into a dict of CPU tensors, safely."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expected a checkpoint file, but {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"refused to load {path}: it is not a plain tensor pickle that weights_only=True accepts "
                f"({type(error).__name__}); nothing in it was executed"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} does not hold a dict of tensors")
        return state
    raise ValueError(f"expected a .safetensors or .bin projector file, got {path.name}")


# -- the projector ------------------------------------------------------------------------
def projector_state_dict(state, source="projector file"):
    """Map any of the projector key forms onto ``model.0.*`` / ``model.2.*``."""
    out, unknown = {}, []
    for key, tensor in state.items():
        match = PROJECTOR_KEY.match(key)
        target = None if match is None else f"model.{match.group(1)}.{match.group(2)}"
        if target is None:
            unknown.append(key)
        elif target in out:
            raise ValueError(f"{source}: {key} holds {target} a second time (two key forms in one file)")
        else:
            out[target] = tensor
    expected = {f"model.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    if unknown or set(out) != expected:
        raise ValueError(
            f"{source}: expected projector keys like model.mm_projector.0.weight, model.0.weight or "
            f"mm_projector.model.0.weight (layers 0 and 2, weight and bias); found {sorted(state)[:8]}"
        )
    for key, tensor in sorted(out.items()):
        rank = 2 if key.endswith("weight") else 1
        if not tensor.is_floating_point() or tensor.dim() != rank:
            raise ValueError(f"{source}: expected {key} to be a {rank}-D floating-point tensor, found "
                             f"{tensor.dim()}-D {tensor.dtype} of shape {tuple(tensor.shape)}")
    return out


def load_projector(path, mm_hidden_size=None, hidden_size=None):
    """Load a projector from ``.bin`` or ``.safetensors``; shapes come from the file.

    If ``mm_hidden_size`` / ``hidden_size`` are given and the file disagrees, a
    ``ValueError`` names the expected and the found shapes.
    """
    state = projector_state_dict(read_state_dict(path), source=str(path))
    found_hidden, found_mm = state["model.0.weight"].shape  # Linear stores (out, in)
    expected_hidden, expected_mm = hidden_size or found_hidden, mm_hidden_size or found_mm
    if (found_hidden, found_mm) != (expected_hidden, expected_mm):
        raise ValueError(
            f"{path}: expected a projector {expected_mm} -> {expected_hidden} (model.0.weight of shape "
            f"{(expected_hidden, expected_mm)}), found model.0.weight of shape {(found_hidden, found_mm)}"
        )
    shapes = {"model.0.bias": (found_hidden,), "model.2.weight": (found_hidden, found_hidden),
              "model.2.bias": (found_hidden,)}
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: expected {key} of shape {shape}, found {tuple(state[key].shape)}")
    projector = ProjectionModule(found_mm, found_hidden)
    projector.load_state_dict(state)
    return projector.to(state["model.0.weight"].dtype)


# -- where, and in what precision ----------------------------------------------------------
def choose_device(device=None):
    """``device`` as given; by default the first GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_computes_bfloat16():
    """True when this CPU has bfloat16 instructions (AVX-512 BF16 or AMX), where bfloat16 matmuls are fast."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_dtype(device, stored=torch.float32):
    """The dtype to load in when the caller names none.

    On a GPU: float16, as the original runs (a T4 has no fast bfloat16). On a CPU: float32 weights
    stay float32, and a half-precision checkpoint becomes bfloat16 where the CPU computes it natively,
    else float32 -- float16 matmuls on a CPU are several times slower than either (a 743-row prefill
    of a 1024-wide, 8-layer model took 6.8 s in float16, 2.2 s in float32, 0.8 s in bfloat16).
    """
    if torch.device(device).type == "cuda":
        return torch.float16
    if stored in (None, torch.float32, torch.float64):
        return torch.float32
    return torch.bfloat16 if cpu_computes_bfloat16() else torch.float32


def reset_generation_config(text_model):
    """Keep only the special token ids of an LLM's generation config, so both forms sample alike.

    Llama 3's ``generation_config.json`` (temperature 0.6, top_p 0.9, max_length 4096) would give the
    alpha form top_p 0.9 where the ``-hf`` form has none, and a max_length warning on every call; the
    original's settings come from ``generation.generation_kwargs`` on every call instead.
    """
    from transformers import GenerationConfig

    config = text_model.config
    text_model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                                    pad_token_id=getattr(config, "pad_token_id", None))
    return text_model


# -- reading a checkpoint folder -----------------------------------------------------------
def _resolve_folder(path_or_hub_id, allow_patterns):
    """A local folder as it is, or a Hub repository downloaded (weights and json only, no code)."""
    local = Path(path_or_hub_id)
    if local.is_dir():
        return local
    if local.exists() or str(path_or_hub_id).startswith((".", "/", "~")) or str(path_or_hub_id).count("/") != 1:
        raise ValueError(f"expected a model folder or a Hub id like 'owner/name', got {path_or_hub_id!r}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=allow_patterns))
    except Exception as error:
        raise ValueError(f"could not download {path_or_hub_id!r} from the Hugging Face Hub: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def load_tokenizer(path_or_hub_id):
    """The tokenizer saved beside a checkpoint (a fast tokenizer, as Llama 3 ships).

    ``PreTrainedTokenizerFast`` is used rather than ``AutoTokenizer`` because the latter
    also reads ``config.json``, whose ``llamavision`` type transformers does not know.
    """
    from transformers import PreTrainedTokenizerFast

    folder = _resolve_folder(path_or_hub_id, ["*.json", "*.jinja", "tokenizer*"])
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"expected tokenizer.json in {folder}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _read_config(folder):
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"expected {CONFIG_NAME} in {folder}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, found a {type(config).__name__}")
    return config


def _siglip_vision_config(vision):
    """A ``SiglipVisionConfig`` from a vision-config dict, or from a full SigLIP config that nests one."""
    from transformers import SiglipVisionConfig

    vision = dict(vision.get("vision_config", vision))
    vision.pop("model_type", None)
    return SiglipVisionConfig(**vision)


def _sub_configs(config):
    """Build the text and vision transformers configs from the -hf ``config.json`` dict."""
    from transformers import AutoConfig

    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ValueError("expected a llama-3-vision-alpha-hf config.json with 'text_config' and 'vision_config', "
                         f"found keys {sorted(config)}")
    text = dict(text)
    try:
        return AutoConfig.for_model(text.pop("model_type", "llama"), **text), _siglip_vision_config(vision)
    except Exception as error:  # transformers 5's configs raise their own validation errors
        reason = " ".join(str(error).split())
        raise ValueError(f"config.json's text_config or vision_config cannot be read: {reason}") from None


def _check_sizes(text_config, vision_config, states, folder):
    """The configs' sizes: whole positive numbers that agree with the weights -- checked before any
    module is built (a config that asks for millions of layers would otherwise be built first)."""
    for what, config, names in (
            ("text_config", text_config, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads")),
            ("vision_config", vision_config, ("image_size", "patch_size", "hidden_size", "intermediate_size",
                                              "num_hidden_layers", "num_attention_heads"))):
        for name in names:
            value = getattr(config, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{folder}: {what}.{name} must be a whole number >= 1, found {value!r}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{folder}: {what}.hidden_size ({config.hidden_size}) is not a multiple of "
                             f"num_attention_heads ({config.num_attention_heads})")

    def layers(state, prefix):  # (how many layers the weights hold, the key of the last one)
        found = sorted((int(key[len(prefix):].split(".")[0]), key) for key in state if key.startswith(prefix))
        return (found[-1][0] + 1, f"layers, the last {found[-1][1]}") if found else (None, None)

    def shape(state, key):
        return (tuple(state[key].shape), f"({key})") if key in state else (None, None)

    text, vision = states.get("text_model", {}), states.get("vision_model", {})
    (patch, patch_key) = shape(vision, "embeddings.patch_embedding.weight")
    agreements = [  # (name, what the config says, (what the weights say, the key that says it))
        ("text_config.num_hidden_layers", text_config.num_hidden_layers, layers(text, "model.layers.")),
        ("vision_config.num_hidden_layers", vision_config.num_hidden_layers, layers(vision, "encoder.layers.")),
        ("text_config.(vocab_size, hidden_size)", (text_config.vocab_size, text_config.hidden_size),
         shape(text, "model.embed_tokens.weight")),
        ("vision_config.(hidden_size, patch_size)", (vision_config.hidden_size, vision_config.patch_size),
         ((patch[0], patch[-1]), patch_key) if patch else (None, None)),
    ]
    for name, said, (found, key) in agreements:
        if found is not None and said != found:
            raise ValueError(f"{folder}: config.json gives {name} = {said}, but the weights hold {found} {key}")


def _weight_files(folder):
    """The safetensors files of a folder: those its index names (each inside the folder), else the single file."""
    index = folder / INDEX_NAME
    if index.is_file():
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
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise ValueError(f"expected {WEIGHTS_NAME} or {INDEX_NAME} in {folder}, found {sorted(p.name for p in folder.iterdir())}")


def _read_parts(folder, route):
    """Every tensor of the folder's safetensors, sorted into parts: ``route(key)`` gives ``(part, key)`` or None."""
    states = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    routed = route(key)
                    if routed is None:
                        continue
                    part, inner = routed
                    if inner in states.setdefault(part, {}):
                        raise ValueError(f"{key} holds {part}.{inner} a second time (two key forms in one checkpoint)")
                    states[part][inner] = handle.get_tensor(key)
        except ValueError:
            raise
        except Exception as error:  # safetensors raises its own SafetensorError type
            raise ValueError(f"{file} is not a readable safetensors file: {error}") from None
    return states


def _route_key(key):
    """Checkpoint key -> (part, key inside that part), or None for keys of no part.

    SigLIP keys come back flat (``embeddings.patch_embedding.weight``): transformers 4.x
    nests them under ``vision_model.`` and 5.x does not, so the nesting is decided
    later by the module that receives them (``fit_siglip_keys``).
    """
    for prefix in PREFIXES:
        if key.startswith(prefix):
            part, inner = prefix[:-1], key[len(prefix):]
            if part == "vision_model":
                inner = inner.removeprefix("vision_model.")
            if part == "mm_projector" and not inner.startswith("model."):
                inner = "model." + inner
            return part, inner
    return None


def fit_siglip_keys(state, vision_model):
    """Add the nested ``vision_model.`` to flat SigLIP keys when this transformers version expects it."""
    nested = any(key.startswith("vision_model.") for key in vision_model.state_dict())
    return {("vision_model." + key if nested else key): tensor for key, tensor in state.items()}


def _stored_dtype(states):
    """The dtype the checkpoint's floating-point tensors are stored in."""
    for state in states.values():
        for tensor in state.values():
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32


def _fill(name, module, state, folder, allow_missing=()):
    """Load ``state`` into ``module`` (on the meta device) with the file's tensors as they are: every weight
    (but ``allow_missing``, e.g. a tied head) and nothing else (but buffers older transformers saved)."""
    parameters = dict(module.named_parameters())
    for key, tensor in state.items():
        if key in parameters and not tensor.is_floating_point():
            raise ValueError(f"{folder}: {name}.{key} must hold floating-point weights, found {tensor.dtype}")
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # e.g. a tensor whose shape disagrees with config.json
        reason = str(error).strip().splitlines()[-1].strip()
        raise ValueError(f"{folder}: the {name} weights do not fit its config: {reason}") from None
    missing = [key for key in result.missing_keys if key not in allow_missing]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} weights of {name}, e.g. {missing[:3]}")
    unexpected = [key for key in result.unexpected_keys if not key.endswith(HARMLESS_EXTRA_KEYS)]
    if unexpected:
        raise ValueError(f"{folder}: unexpected {name} weights, e.g. {unexpected[:3]}")
    return module


def _vision_tower(vision_config, state, folder, implementation="transformers"):
    """A SigLIP vision tower filled with ``state`` (flat keys); without the pooling head if the file has none
    or the tower is ours (it is not used: the features come from ``hidden_states[-2]``)."""
    from accelerate import init_empty_weights
    from transformers import SiglipVisionModel

    from .scratch.siglip import SiglipVisionTower

    if implementation == "scratch":
        state = {key: tensor for key, tensor in state.items() if not key.startswith("head.")}
    if not any(key.startswith("head.") for key in state):
        vision_config.vision_use_head = False
    with init_empty_weights():  # parameters on the meta device: nothing is allocated twice
        tower = SiglipVisionTower(vision_config) if implementation == "scratch" else SiglipVisionModel(vision_config)
    return _fill("vision_model", tower, fit_siglip_keys(state, tower), folder)


def load_hf_layout(cls, path_or_hub_id, dtype=None, device=None, implementation="transformers"):
    """Build the three parts with empty weights, then fill them from the safetensors shards.

    ``device`` defaults to the GPU when there is one; ``dtype`` to ``choose_dtype``'s choice;
    ``implementation="scratch"`` builds the towers of ``scratch/`` (the same state dicts fit).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .scratch.llama import LlamaLM
    from .scratch.weights import check_implementation

    check_implementation(implementation)

    folder = _resolve_folder(path_or_hub_id, ["*.json", "*.jinja", "*.safetensors", "tokenizer*"])
    text_config, vision_config = _sub_configs(_read_config(folder))
    states = _read_parts(folder, _route_key)
    _check_sizes(text_config, vision_config, states, folder)
    stored = _stored_dtype(states)
    states = {part: states.get(part, {}) for part in ("text_model", "vision_model", "mm_projector")}

    with init_empty_weights():
        scratch = implementation == "scratch" and text_config.model_type == "llama"
        text_model = LlamaLM(text_config) if scratch else AutoModelForCausalLM.from_config(text_config)
        mm_projector = ProjectionModule(vision_config.hidden_size, text_config.hidden_size)
    tied = ("lm_head.weight",) if text_config.tie_word_embeddings else ()
    text_model = _fill("text_model", text_model, states["text_model"], folder, allow_missing=tied)
    if tied:
        text_model.tie_weights()
    parts = {
        "text_model": reset_generation_config(text_model),
        "vision_model": _vision_tower(vision_config, states["vision_model"], folder, implementation),
        "mm_projector": _fill("mm_projector", mm_projector, states["mm_projector"], folder),
    }
    device = choose_device(device)
    model = cls(**parts)
    return model.to(device=device, dtype=dtype or choose_dtype(device, stored)).eval()


def _vision_key(key):
    """A SigLIP checkpoint key -> ("vision_model", flat key), or None for the text tower and the logit scale/bias."""
    if key.startswith("vision_model."):
        return "vision_model", key.removeprefix("vision_model.")
    if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
        return None
    return "vision_model", key  # a SiglipVisionModel saved by transformers 5.x: flat keys


def load_vision_tower(path_or_hub_id):
    """SigLIP's vision tower from a folder or Hub id holding a full ``SiglipModel`` or a ``SiglipVisionModel``.

    ``google/siglip-so400m-patch14-384`` holds the whole SigLIP (image and text towers); only the
    vision tensors are read, so nothing of the text tower is loaded, or reported as unused.
    """
    folder = _resolve_folder(path_or_hub_id, ["*.json", "*.safetensors"])
    vision_config = _siglip_vision_config(_read_config(folder))
    state = _read_parts(folder, _vision_key).get("vision_model", {})
    return _vision_tower(vision_config, state, folder).eval()


def _part_state_dicts(model):
    """The model's tensors with the -hf prefixes; a tied lm_head is stored once (as the embeddings).

    SigLIP keys are written nested (``vision_model.vision_model.embeddings...``), as
    transformers 4.x -- the official checkpoint's era -- names them, whatever version runs.
    """
    state = {}
    for name in PREFIXES:
        for key, tensor in getattr(model, name[:-1]).state_dict().items():
            if name == "vision_model.":
                key = "vision_model." + key.removeprefix("vision_model.")
            state[name + key] = tensor
    if getattr(model.text_model.config, "tie_word_embeddings", False):
        state.pop("text_model.lm_head.weight", None)
    return state


def with_legacy_rope(text_config):
    """A text-config dict that transformers 4.x reads with the right RoPE too.

    transformers 5 writes the RoPE settings as ``rope_parameters: {rope_theta, rope_type,
    ...}``; 4.x does not know that key and would fall back to ``rope_theta=10000`` (Llama 3
    uses 500000), silently changing every answer. The 4.x keys ``rope_theta`` (and
    ``rope_scaling`` for non-default RoPE) are added; 5.x reads them too.
    """
    config = dict(text_config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return config


def save_hf_layout(model, path, max_shard_size="5GB"):
    """Write ``config.json`` and safetensors shards in the -hf layout."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llamavision",
        "architectures": ["LlamaVision"],
        "image_token_index": IMAGE_TOKEN_INDEX,
        "text_config": with_legacy_rope(model.text_model.config.to_dict()),
        "vision_config": model.vision_model.config.to_dict(),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    save_state_dict(_part_state_dicts(model), folder, max_shard_size)


def save_state_dict(state, folder, max_shard_size="5GB"):
    """Write ``state`` to ``folder`` as safetensors, in shards with an index when it is large."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}
    stale = [Path(folder) / WEIGHTS_NAME, Path(folder) / INDEX_NAME, *Path(folder).glob("model-*-of-*.safetensors")]
    for file in stale:  # an earlier save's files: an index left behind would be read instead of the new weights
        file.unlink(missing_ok=True)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: state[key] for key in keys}, str(Path(folder) / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# -- the alpha form -----------------------------------------------------------------------
def _projector_file(projector):
    """A projector file path, a folder holding one, or a Hub repo id (``mm_projector.bin`` in it)."""
    local = Path(projector)
    if local.is_file():
        return local
    if local.is_dir():
        for name in ("mm_projector.safetensors", "mm_projector.bin"):
            if (local / name).is_file():
                return local / name
        raise ValueError(f"expected mm_projector.safetensors or mm_projector.bin in {local}")
    folder = _resolve_folder(projector, ["mm_projector.*"])
    return _projector_file(folder)


def _config_dtype(config):
    """The dtype a transformers config says its weights are stored in (``dtype``; ``torch_dtype`` in 4.x)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def load_alpha_form(cls, llm, vision, projector, dtype=None, device=None, load_in_4bit=False, load_in_8bit=False,
                    implementation="transformers"):
    """Any Llama 3 LLM + a SigLIP model + a projector file -> ``LlamaVision``.

    ``device`` defaults to the GPU when there is one, ``dtype`` to ``choose_dtype``'s choice for the
    LLM's stored dtype, for all three parts (one dtype, as in the original). ``load_in_4bit`` / ``load_in_8bit`` quantise the LLM with bitsandbytes (on a GPU, or on a
    CPU with bitsandbytes >= 0.49). ``projector=None`` starts a fresh, untrained projector of the
    right shape (for stage-1 training). ``implementation="scratch"``: transformers loads the files (and
    quantises), then ``scratch/`` towers take over its modules and tensors.
    """
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM

    from .scratch.weights import check_implementation, llm_from_transformers, vision_from_transformers

    check_implementation(implementation)
    device = choose_device(device)
    dtype = dtype or choose_dtype(device, _config_dtype(AutoConfig.from_pretrained(llm)))
    llm_kwargs = {"dtype": dtype}
    quantized = load_in_4bit or load_in_8bit
    if quantized:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("4-bit/8-bit loading needs bitsandbytes (0.49 or newer also runs on a CPU): "
                             "pip install 'llama3vision-min[quant]'")
        from transformers import BitsAndBytesConfig

        llm_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                                                               bnb_4bit_compute_dtype=dtype)
        llm_kwargs["device_map"] = {"": str(device)}

    text_model = reset_generation_config(AutoModelForCausalLM.from_pretrained(llm, **llm_kwargs))
    vision_model = load_vision_tower(vision)
    if projector is None:
        projector_module = ProjectionModule(vision_model.config.hidden_size, text_model.config.hidden_size)
    else:
        projector_module = load_projector(_projector_file(projector))
    if projector_module.mm_hidden_size != vision_model.config.hidden_size:
        raise ValueError(f"the projector takes {projector_module.mm_hidden_size}-wide features but the vision "
                         f"model gives {vision_model.config.hidden_size}")
    if projector_module.hidden_size != text_model.config.hidden_size:
        raise ValueError(f"the projector gives {projector_module.hidden_size}-wide vectors but the LLM "
                         f"embeds in {text_model.config.hidden_size}")

    if implementation == "scratch":
        text_model, vision_model = llm_from_transformers(text_model), vision_from_transformers(vision_model)
    model = cls(vision_model=vision_model, text_model=text_model, mm_projector=projector_module)
    if not quantized:
        model.text_model.to(device=device)
    model.vision_model.to(device=device, dtype=dtype)
    model.mm_projector.to(device=device, dtype=dtype)
    return model.eval()
