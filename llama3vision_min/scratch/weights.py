"""The towers' weights into the from-scratch modules: from transformers' modules, or from a checkpoint.

Both forms load into transformers' modules first (the -hf form by one strict ``load_state_dict``, the alpha
form through ``from_pretrained``, possibly in 4-bit); ``take_over`` then builds the from-scratch towers around
the very same tensors and projection modules, so nothing is copied and a bitsandbytes ``Linear4bit`` serves
as a projection unchanged. (Both towers carry transformers' parameter names, so a state dict fits either.)
"""

import copy

from accelerate import init_empty_weights

from .llama import LlamaLM
from .siglip import SiglipVisionTower

IMPLEMENTATIONS = ("transformers", "scratch")


def check_implementation(implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def take_over(model, implementation):
    """``model`` (a ``LlamaVision`` loaded with transformers' towers) with ``scratch/``'s towers around the
    same tensors when ``implementation="scratch"`` (the LLM only when it is a Llama); as it is otherwise."""
    check_implementation(implementation)
    if implementation == "scratch":
        if model.text_model.config.model_type == "llama":
            model.text_model = llm_from_transformers(model.text_model)
        model.vision_model = vision_from_transformers(model.vision_model)
    return model


def vision_from_transformers(tower):
    """A ``SiglipVisionTower`` sharing the tensors of transformers' ``SiglipVisionModel`` ``tower``."""
    with init_empty_weights():
        ours = SiglipVisionTower(copy.deepcopy(tower.config))
    state = {key.removeprefix("vision_model."): tensor for key, tensor in tower.state_dict().items()
             if not key.removeprefix("vision_model.").startswith("head.")}  # the pooling head is not used
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval()


def llm_from_transformers(llm):
    """A ``LlamaLM`` around the modules of transformers' ``LlamaForCausalLM`` ``llm``: its embedding, its
    projections (plain or quantised ``Linear`` modules, taken as they are), its norms' weights, its head."""
    with init_empty_weights():
        ours = LlamaLM(copy.deepcopy(llm.config))
    theirs = llm.model
    ours.model.embed_tokens = theirs.embed_tokens
    for mine, their in zip(ours.model.layers, theirs.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(mine.self_attn, name, getattr(their.self_attn, name))
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mine.mlp, name, getattr(their.mlp, name))
        mine.input_layernorm.weight = their.input_layernorm.weight
        mine.post_attention_layernorm.weight = their.post_attention_layernorm.weight
    ours.model.norm.weight = theirs.norm.weight
    ours.lm_head = llm.lm_head
    # RoPE's frequencies are ours, held in the dtype transformers holds its own in (rounding alike)
    reference = theirs.rotary_emb.inv_freq
    ours.model.inv_freq = ours.model.inv_freq.to(device=reference.device, dtype=reference.dtype)
    ours.generation_config = copy.deepcopy(llm.generation_config)
    ours.is_quantized = getattr(llm, "is_quantized", False)  # a quantised LLM stays refused by the export
    return ours.eval()
