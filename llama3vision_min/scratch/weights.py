"""The towers' weights into the from-scratch modules: from transformers' modules, or from a checkpoint.

Both from-scratch towers carry transformers' parameter names, so a checkpoint's state dict loads into
them as it is (``loading.load_hf_layout`` does that with ``implementation="scratch"``). A model that
transformers has already loaded -- the alpha form's LLM and SigLIP, possibly in 4-bit -- is taken
over instead: the from-scratch module is built around the very same tensors and projection modules,
so nothing is copied and a bitsandbytes ``Linear4bit`` serves as a projection unchanged.
"""

import copy

from accelerate import init_empty_weights

from .llama import LlamaLM
from .siglip import SiglipVisionTower

IMPLEMENTATIONS = ("transformers", "scratch")


def check_implementation(implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


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
