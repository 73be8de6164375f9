"""Export to transformers' own LLaVA format (and the key names vLLM reads).

``LlavaForConditionalGeneration`` expresses llama-3-vision-alpha exactly:

    ours                                         LLaVA
    ----                                         -----
    vision_model (SigLIP), hidden_states[-2]     vision_tower, vision_feature_layer=-2
    all 729 patches (SigLIP has no CLS token)    vision_feature_select_strategy="full"
    mm_projector.model.0 / GELU / .model.2       multi_modal_projector.linear_1 / "gelu" / linear_2
                                                 (with biases)
    text_model (Llama 3)                         language_model + lm_head
    one -200 sentinel, spliced into 729 rows     one real vocabulary id repeated 729 times in input_ids

The image token is a *real* vocabulary id that the prompt text never produces: for Llama 3 a
reserved special token (``<|reserved_special_token_0|>``), so the embedding matrix keeps its
size. Its embedding row is never read: LLaVA overwrites those 729 positions with the
projected image features, which is exactly our splice.

``export_llava`` writes a folder that stock transformers loads with no project code::

    AutoModelForImageTextToText.from_pretrained(DIR)   # LlavaForConditionalGeneration
    AutoProcessor.from_pretrained(DIR)                 # LlavaProcessor: SigLIP image processor + tokenizer

and whose chat template renders a user turn ``[image, text]`` exactly as our prompt
(``prompt.build_prompt``): the image token stands where ``<image>`` stands, first in the user turn.

Weight names on disk
--------------------
In memory, transformers 5.x names LLaVA's weights ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.weight``, and 4.57
the same except that SigLIP's weights sit one level deeper (``...vision_tower.vision_model.*``).
``save_pretrained`` writes the older names: 4.57 writes ``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``;
5.x writes the same but ``vision_tower.*`` without the nested ``vision_model.``. Both versions
read both. vLLM's llava loader builds its own SigLIP module that holds a ``vision_model``
attribute and so needs ``vision_tower.vision_model.*``: ``vllm_names=True`` writes exactly
the 4.57 names, whatever transformers version runs the export.
"""

import copy
import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from ..constants import DEFAULT_TEMPERATURE, EOT_TOKEN
from ..generation import stop_token_ids
from ..image import make_processor
from ..model import with_legacy_rope
from ..prompt import build_chat_prompt
from .atomic import new_folder

IMAGE_TOKEN = "<|reserved_special_token_0|>"
"""The image token of the exported model: a Llama 3 reserved special token (the tiny tokenizers have it
too)."""

WEIGHTS_NAME = "model.safetensors"


def chat_template(image_token=IMAGE_TOKEN):
    """A Llama 3 chat template that renders our prompt exactly, with ``image_token`` for the picture.

    Message content may be a string or a list of parts ``{"type": "image"}`` /
    ``{"type": "text", "text": ...}``; an image part renders as ``image_token`` (the processor
    then repeats it once per patch). Unlike Meta's template, content is not trimmed, so the
    rendering equals ``prompt.build_prompt`` / ``build_chat_prompt`` character for character::

        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{image_token}{question}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n
    """
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image_token + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '" + EOT_TOKEN + "' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )


def image_token_id(tokenizer, text_model, image_token=IMAGE_TOKEN):
    """The id of ``image_token``: it must already be a special token of the vocabulary (nothing is
    resized)."""
    vocab = tokenizer.get_vocab()
    if image_token not in vocab:
        raise ValueError(f"the tokenizer has no {image_token!r}; "
                         "pick a reserved special token it already has")
    token_id = vocab[image_token]
    n_embeddings = text_model.get_input_embeddings().weight.shape[0]
    if not 0 <= token_id < n_embeddings:
        raise ValueError(f"{image_token!r} has id {token_id}, outside the {n_embeddings} input embeddings")
    if tokenizer(image_token, add_special_tokens=False).input_ids != [token_id]:
        raise ValueError(f"{image_token!r} is not tokenized as one special token; "
                         "the processor could not find it")
    taken = {tokenizer.bos_token_id, tokenizer.pad_token_id, *stop_token_ids(tokenizer)}
    prompt = build_chat_prompt([("question", "answer"), ("question", None)])
    if token_id in taken or image_token in prompt:
        raise ValueError(f"{image_token!r} already has a job in the prompt (the chat format, a stop or "
                         "padding token): pick an unused reserved special token")
    return token_id


def n_patches(model):
    """Image tokens per picture: (image_size // patch_size) ** 2 -- 729 for so400m-patch14-384."""
    vision = model.vision_model.config
    return (vision.image_size // vision.patch_size) ** 2


def llava_config(model, tokenizer, image_token=IMAGE_TOKEN):
    """The ``LlavaConfig`` that expresses ``model`` (a ``LlamaVision``) exactly."""
    from transformers import LlavaConfig

    text_config = copy.deepcopy(model.text_model.config)
    config = LlavaConfig(
        vision_config=copy.deepcopy(model.vision_model.config),
        text_config=text_config,
        projector_hidden_act="gelu",  # exact GELU, as nn.GELU()
        vision_feature_layer=-2,  # hidden_states[-2]: second-to-last encoder layer, no post-layernorm
        vision_feature_select_strategy="full",  # keep every patch: SigLIP has no CLS token to drop
        multimodal_projector_bias=True,
        image_token_index=image_token_id(tokenizer, model.text_model, image_token),
        image_seq_length=n_patches(model),
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


# -- weights ------------------------------------------------------------------------------
def _siglip_state(model):
    """SigLIP weights with flat keys (``embeddings.patch_embedding.weight``) on any transformers version."""
    return {key.removeprefix("vision_model."): tensor
            for key, tensor in model.vision_model.state_dict().items()}


def _projector_state(model):
    """``model.0.*`` / ``model.2.*`` -> ``linear_1.*`` / ``linear_2.*``."""
    layers = {"model.0.": "linear_1.", "model.2.": "linear_2."}
    out = {}
    for key, tensor in model.mm_projector.state_dict().items():
        prefix = key[: len("model.0.")]
        out[layers[prefix] + key[len(prefix):]] = tensor
    return out


def vllm_state_dict(model):
    """Every weight under the names vLLM's llava loader reads (= what transformers 4.57 saves).

    vision_tower.vision_model.*        SigLIP (the pooling head too, when the tower has one)
    multi_modal_projector.linear_1.*   projector layer 0
    multi_modal_projector.linear_2.*   projector layer 2
    language_model.model.*             Llama decoder (embed_tokens, layers, norm)
    language_model.lm_head.weight      output head (left out when tied to embed_tokens)
    """
    state = {}
    for key, tensor in _siglip_state(model).items():
        state["vision_tower.vision_model." + key] = tensor
    for key, tensor in _projector_state(model).items():
        state["multi_modal_projector." + key] = tensor
    for key, tensor in model.text_model.get_decoder().state_dict().items():
        state["language_model.model." + key] = tensor
    if not getattr(model.text_model.config, "tie_word_embeddings", False):
        state["language_model.lm_head.weight"] = model.text_model.get_output_embeddings().weight
    return state


def _child(module, *paths):
    """The first attribute path that exists: LLaVA's sub-modules moved between transformers 4.57 and 5.x."""
    for path in paths:
        found = module
        for name in path.split("."):
            found = getattr(found, name, None)
            if found is None:
                break
        if isinstance(found, torch.nn.Module):
            return found
    raise AttributeError(f"none of {paths} on {type(module).__name__}")


def to_llava(model, tokenizer, image_token=IMAGE_TOKEN):
    """An in-memory ``LlavaForConditionalGeneration`` that shares ``model``'s tensors (nothing is copied).

    Built on the meta device and filled sub-module by sub-module with strict loads, so the
    mapping is checked on whichever transformers version runs (4.57 nests SigLIP's keys under
    ``vision_model.``, 5.x does not; each sub-module's own ``state_dict`` hides that).
    """
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    if getattr(model.text_model, "is_quantized", False):
        raise ValueError("the LLaVA export needs the LLM's full-precision weights, but this one is quantised "
                         "(bitsandbytes 4-bit/8-bit): load the model without load_in_4bit / load_in_8bit "
                         "(e.g. from_alpha(..., dtype=torch.float16)) and export that")
    config = llava_config(model, tokenizer, image_token)
    with init_empty_weights(include_buffers=False):  # rotary and position-id buffers stay real
        llava = LlavaForConditionalGeneration(config)
    vision = _child(llava, "model.vision_tower", "vision_tower")
    projector = _child(llava, "model.multi_modal_projector", "multi_modal_projector")
    decoder = _child(llava, "model.language_model", "language_model.model", "language_model")
    # transformers 4.x nests SigLIP
    nested = any(key.startswith("vision_model.") for key in vision.state_dict())
    vision.load_state_dict({"vision_model." * nested + key: tensor
                            for key, tensor in _siglip_state(model).items()},
                           strict=True, assign=True)
    projector.load_state_dict(_projector_state(model), strict=True, assign=True)
    decoder.load_state_dict(model.text_model.get_decoder().state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        llava.tie_weights()
    else:
        llava.get_output_embeddings().load_state_dict(
            model.text_model.get_output_embeddings().state_dict(), strict=True, assign=True)
    meta = [name for name, p in llava.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"LLaVA weights left without a value: {meta[:3]}")
    return llava.eval()


def _template_tokenizer(tokenizer, template):
    """A copy of ``tokenizer`` with the chat template, that adds no ``<|begin_of_text|>`` of its own.

    The template writes BOS. transformers' LLaVA model cards tokenize its text with
    ``processor(images=..., text=prompt)``, i.e. with the tokenizer's special tokens, while
    ``apply_chat_template(..., tokenize=True)`` does not add them: only a tokenizer that adds no BOS
    gives exactly one in both ways (Llama 3's own tokenizer would add a second one in the first).
    """
    from tokenizers import processors

    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own template and BOS
    tokenizer.chat_template = template
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tokenizer


def llava_processor(model, tokenizer, image_token=IMAGE_TOKEN):
    """A ``LlavaProcessor``: SigLIP image processor at the tower's size + a copy of the tokenizer with the
    template."""
    from transformers import LlavaProcessor

    template = chat_template(image_token)
    tokenizer = _template_tokenizer(tokenizer, template)
    return LlavaProcessor(
        image_processor=make_processor(model.image_size),
        tokenizer=tokenizer,
        patch_size=model.vision_model.config.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,  # no CLS token: image tokens = patches
        image_token=image_token,
        chat_template=template,
    )


def _generation_config(tokenizer):
    """Sampling defaults of the original (temperature 0.2) and both Llama 3 stop ids."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        do_sample=True,
        temperature=DEFAULT_TEMPERATURE,
    )


# -- the export ---------------------------------------------------------------------------
def export_llava(model, tokenizer, out_dir, vllm_names=False, image_token=IMAGE_TOKEN, max_shard_size="5GB"):
    """Write ``model`` (a ``LlamaVision``) and ``tokenizer`` as a transformers-native LLaVA folder.

    Files: ``config.json`` (``LlavaConfig``), ``generation_config.json``, safetensors weights,
    the processor files (SigLIP image processor, ``LlavaProcessor`` settings) and the tokenizer
    with the chat template. With ``vllm_names=True`` the weights carry the names vLLM's llava
    loader reads (see the module docstring); transformers reads those as well. Weights keep
    their dtype. ``out_dir`` must be absent or empty; it appears complete or not at all. Returns the
    folder as a ``Path``.
    """
    # refuses what it cannot express before anything is written
    llava = to_llava(model, tokenizer, image_token)
    with new_folder(out_dir) as folder:  # written beside out_dir, renamed to it when complete
        if vllm_names:
            llava.config.save_pretrained(folder)
            state = {key: tensor.detach().contiguous().cpu()
                     for key, tensor in vllm_state_dict(model).items()}
            save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
        else:
            llava.save_pretrained(folder, max_shard_size=max_shard_size)
        _generation_config(tokenizer).save_pretrained(folder)
        processor = llava_processor(model, tokenizer, image_token)
        processor.save_pretrained(folder)
        _make_portable(folder, processor)
    return Path(out_dir)


def _make_portable(folder, processor):
    """Small edits so one folder loads on transformers 4.57 and 5.x alike (and in vLLM, whichever it pins).

    * transformers 5.x names its fast tokenizer class ``TokenizersBackend``, which 4.57 does not know;
      ``PreTrainedTokenizerFast`` is read by both.
    * ``model_input_names`` without ``token_type_ids`` (as Meta's Llama 3 tokenizer_config says):
      otherwise 4.57's processor returns ``token_type_ids`` and ``generate(**inputs)`` refuses them.
    * 5.x nests the image processor inside ``processor_config.json``; 4.57 reads
      ``preprocessor_config.json``, so that file is written too (same settings).
    * 5.x writes the text model's ``rope_parameters``; 4.57 reads ``rope_theta`` / ``rope_scaling``
      and would silently fall back to a theta of 10000 (Llama 3 uses 500000): both are written.
    """
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"] = with_legacy_rope(config["text_config"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tokenizer_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_file.read_text())
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")

    image_file = folder / "preprocessor_config.json"
    if not image_file.is_file():
        processor.image_processor.save_pretrained(folder)
    image_config = json.loads(image_file.read_text())
    image_config["image_processor_type"] = "SiglipImageProcessor"  # 5.x may write its PIL-backed alias
    image_config["processor_class"] = "LlavaProcessor"
    image_file.write_text(json.dumps(image_config, indent=2) + "\n")
