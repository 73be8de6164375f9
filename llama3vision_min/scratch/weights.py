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
    same tensors when ``implementation="scratch"``; as it is otherwise."""
    check_implementation(implementation)
    if implementation == "scratch":
        model.text_model = llm_from_transformers(model.text_model)
        model.vision_model = vision_from_transformers(model.vision_model)
    return model


WRITTEN_OUT = {  # what the from-scratch towers compute; any other value is refused, never approximated
    "LlamaLM": {"model_type": ("llama",), "hidden_act": ("silu",)},
    "SiglipVisionTower": {"hidden_act": ("gelu_pytorch_tanh", "gelu_new", "gelu")},
}


def check_written_out(config, tower):
    """Refuse a config that ``tower`` (``"LlamaLM"`` or ``"SiglipVisionTower"``) would compute otherwise
    than transformers: e.g. a Llama with ``hidden_act: gelu`` (ours is SiLU) or SigLIP's ``quick_gelu``."""
    for field, values in WRITTEN_OUT[tower].items():
        if getattr(config, field, None) not in values:
            raise ValueError(f'implementation="scratch" writes out {tower} with {field} in {values}, but the '
                             f'config has {field}={getattr(config, field, None)!r}: load it with '
                             'implementation="transformers"')


def vision_from_transformers(tower):
    """A ``SiglipVisionTower`` sharing the tensors of transformers' ``SiglipVisionModel`` ``tower``."""
    check_written_out(tower.config, "SiglipVisionTower")
    with init_empty_weights():
        ours = SiglipVisionTower(copy.deepcopy(tower.config))
    state = {key.removeprefix("vision_model."): tensor for key, tensor in tower.state_dict().items()
             if not key.removeprefix("vision_model.").startswith("head.")}  # the pooling head is not used
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval()


def llm_from_transformers(llm):
    """A ``LlamaLM`` around the modules of transformers' ``LlamaForCausalLM`` ``llm``: its embedding, its
    projections (plain or quantised ``Linear`` modules, taken as they are), its norms' weights, its head."""
    check_written_out(llm.config, "LlamaLM")
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
