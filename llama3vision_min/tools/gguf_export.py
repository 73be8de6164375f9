"""The model as two GGUF files for llama.cpp: ``model.gguf`` (the LLM) and ``mmproj.gguf`` (SigLIP +
projector).

    python -m llama3vision_min export --format gguf --out DIR [--model ...] [--dtype f32|f16]

llama.cpp runs llama-3-vision-alpha as a LLaVA-style model: the LLM in one file, and in the other (the
"mmproj", architecture ``clip``) the vision tower and the projector, with ``projector_type`` "mlp"
(Linear -> GELU -> Linear). Both are written directly with the ``gguf`` package (kept by llama.cpp's
authors); llama.cpp's own converter cannot write the vision file for a SigLIP tower in this form.

Three details decide whether llama.cpp answers as we do:

* **The feature layer.** We read SigLIP's ``hidden_states[-2]``: the output of its second-to-last layer,
  before the final LayerNorm. llama.cpp's clip graph runs ``block_count - 1`` layers, so all N layers are
  stored with ``block_count = N``, ``feature_layer = [N - 1]`` pins the layer explicitly, and the
  post-LayerNorm is left out. (llama.cpp's older converter drops a layer *and* the graph drops another:
  ``hidden_states[-3]``. GGUF files made that way answer differently.)
* **GELU.** SigLIP's MLP uses the tanh approximation: ``clip.use_gelu = true`` (false means quick-GELU).
  llama.cpp's projector always uses the tanh GELU where ours is exact: a difference of about 1e-3.
* **RoPE's layout.** transformers rotates the two halves of each head's vector against each other;
  llama.cpp's ``llama`` architecture rotates adjacent pairs. The rows of ``q_proj`` and ``k_proj`` are
  reordered so that the same rotation happens (``interleave_rope_rows``).

Weights are written in float16 or float32 (norms, biases and position embeddings always float32, as
llama.cpp adds them to float32 activations). Quantisation is llama.cpp's job: run ``llama-quantize`` on
``model.gguf``. A model loaded in 4-bit is refused (its weights are no longer the checkpoint's).
"""

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import new_files

LLM_FILE, VISION_FILE = "model.gguf", "mmproj.gguf"
DTYPES = {"f32": np.float32, "f16": np.float16}

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 3's pre-tokenizer pattern, as its tokenizer.json writes it (llama.cpp's "llama-bpe")."""


def export_gguf(model, tokenizer, out, dtype="f16"):
    """Write ``out/model.gguf`` and ``out/mmproj.gguf``; returns their paths. Existing files are not
    overwritten; each file is written under a temporary name and renamed when both are complete."""
    import gguf  # noqa: F401 -- fail before anything is written when the package is missing

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_exportable(model)
    vocabulary = tokenizer_vocabulary(tokenizer, model.text_model.config.vocab_size)  # checked before writing
    out = Path(out)
    with new_files(out, (LLM_FILE, VISION_FILE)) as (llm_file, vision_file):  # both files, or neither
        write_llm(model.text_model, vocabulary, llm_file, DTYPES[dtype])
        write_vision(model, vision_file, DTYPES[dtype])
    return out / LLM_FILE, out / VISION_FILE


def check_exportable(model):
    """Refuse, with the reason, what these two files cannot express."""
    text, vision = model.text_model.config, model.vision_model.config
    if getattr(model.text_model, "is_quantized", False) or getattr(text, "quantization_config", None):
        raise ValueError("GGUF export needs the full-precision weights, but this model was loaded quantised "
                         "(4-bit or 8-bit): load it without load_in_4bit/load_in_8bit and quantise the "
                         "written model.gguf with llama.cpp's llama-quantize")
    if text.model_type != "llama" or getattr(text, "hidden_act", "silu") != "silu":
        raise ValueError(f"GGUF export writes a Llama LLM (silu), got {text.model_type!r}")
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        raise ValueError("GGUF export writes Llama without biases in attention and MLP, as Llama 3 is")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim * text.num_attention_heads != text.hidden_size:  # llama.cpp's Llama derives it so
        raise ValueError(f"GGUF export writes head_dim = hidden_size / num_attention_heads (llama.cpp "
                         f"refuses other values), got head_dim {head_dim} for {text.hidden_size} / "
                         f"{text.num_attention_heads}")
    if "siglip" not in vision.model_type or vision.hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"GGUF export writes a SigLIP tower with tanh-GELU, got {vision.model_type!r} "
                         f"({getattr(vision, 'hidden_act', None)})")
    _rope(text)  # refuses a rope type other than the default and Llama 3.1's


# -- the LLM ---------------------------------------------------------------------------------
def write_llm(text_model, vocabulary, path, dtype):
    """``model.gguf``: Llama's hyper-parameters, the tokenizer, and every weight under llama.cpp's names."""
    import gguf

    config = text_model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, factors = _rope(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llama-3-vision-alpha LLM (llama3vision-min)")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    vocabulary.write(writer)

    state = text_model.state_dict()

    def name(kind, layer=None):  # e.g. "blk.0.attn_q.weight"
        return gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"

    tensors = [(name(gguf.MODEL_TENSOR.TOKEN_EMBD), state["model.embed_tokens.weight"]),
               (name(gguf.MODEL_TENSOR.OUTPUT_NORM), state["model.norm.weight"])]
    if not getattr(config, "tie_word_embeddings", False):
        tensors.append((name(gguf.MODEL_TENSOR.OUTPUT), state["lm_head.weight"]))
    if factors is not None:  # Llama 3.1: each frequency divided by its factor, as llama.cpp applies it
        tensors.append((name(gguf.MODEL_TENSOR.ROPE_FREQS), factors))
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        parts = {
            gguf.MODEL_TENSOR.ATTN_NORM: state[layer + "input_layernorm.weight"],
            gguf.MODEL_TENSOR.ATTN_Q: interleave_rope_rows(state[layer + "self_attn.q_proj.weight"], heads),
            gguf.MODEL_TENSOR.ATTN_K: interleave_rope_rows(state[layer + "self_attn.k_proj.weight"],
                                                           kv_heads),
            gguf.MODEL_TENSOR.ATTN_V: state[layer + "self_attn.v_proj.weight"],
            gguf.MODEL_TENSOR.ATTN_OUT: state[layer + "self_attn.o_proj.weight"],
            gguf.MODEL_TENSOR.FFN_NORM: state[layer + "post_attention_layernorm.weight"],
            gguf.MODEL_TENSOR.FFN_GATE: state[layer + "mlp.gate_proj.weight"],
            gguf.MODEL_TENSOR.FFN_UP: state[layer + "mlp.up_proj.weight"],
            gguf.MODEL_TENSOR.FFN_DOWN: state[layer + "mlp.down_proj.weight"],
        }
        tensors += [(name(kind, i), tensor) for kind, tensor in parts.items()]
    _write(writer, tensors, dtype)


def interleave_rope_rows(weight, n_heads):
    """Reorder each head's rows from transformers' halves (0..d/2-1 | d/2..d-1) to llama.cpp's pairs.

    transformers' RoPE rotates component i with component i + d/2; llama.cpp's (for ``llama``) rotates
    2i with 2i + 1. Row i of a head moves to 2i and row i + d/2 to 2i + 1, so that q . k -- and with it
    attention -- is unchanged. (out_features, in_features) -> the same shape.
    """
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(out_features, -1)


def halve_rope_rows(weight, n_heads):
    """The inverse of ``interleave_rope_rows`` (to read a GGUF file back into transformers' layout)."""
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(out_features, -1)


def _rope(config):
    """``(theta, factors)``: RoPE's base, and for Llama 3.1's scaling the per-frequency divisors
    (else None)."""
    from ..scratch.llama import rope_frequencies, rope_settings

    theta, kind, _ = rope_settings(config)  # refuses rope types other than these two
    if kind == "default":
        return theta, None
    return theta, rope_frequencies(config, scaled=False) / rope_frequencies(config)  # (head_dim / 2,)


# -- the tokenizer ---------------------------------------------------------------------------
class Vocabulary:
    """What llama.cpp needs of a byte-level BPE tokenizer: tokens, their types, merges, special ids."""

    def __init__(self, tokens, types, merges, pre, bos, eos, add_bos, chat_template=None):
        self.tokens, self.types, self.merges, self.pre = tokens, types, merges, pre
        self.bos, self.eos, self.add_bos, self.chat_template = bos, eos, add_bos, chat_template

    def write(self, writer):
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos)
        writer.add_eos_token_id(self.eos)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def tokenizer_vocabulary(tokenizer, vocab_size):
    """The ``Vocabulary`` of a transformers fast tokenizer, for an embedding of ``vocab_size`` rows."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("GGUF export writes byte-level BPE tokenizers (as Llama 3's), got a "
                         f"{spec['model']['type']} model with a "
                         f"{(spec.get('decoder') or {}).get('type')} decoder")
    tokens = {index: text for text, index in spec["model"]["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        special[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(tokens)}, "
                         f"the LLM's embedding only {vocab_size} rows")
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [int(special.get(i, TokenType.NORMAL if i in tokens else TokenType.UNUSED))
             for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("GGUF export needs the tokenizer's bos and eos tokens (llama.cpp would guess id 11)")
    add_bos = tokenizer("a").input_ids[:1] == [bos]
    template = getattr(tokenizer, "chat_template", None)
    return Vocabulary(names, types, merges, _pre_tokenizer(spec), bos, eos, add_bos,
                      template if isinstance(template, str) else None)


def _pre_tokenizer(spec):
    """llama.cpp's name for the tokenizer's pre-tokenization: Llama 3's split, or GPT-2's byte-level regex."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT \
            and not steps[1].get("use_regex", True):
        return "llama-bpe"
    raise ValueError(f"GGUF export knows Llama 3's and GPT-2's pre-tokenizers, not {json.dumps(pre)[:200]}")


# -- the vision file -------------------------------------------------------------------------
def write_vision(model, path, dtype, feature_layer=-2):
    """``mmproj.gguf``: SigLIP's tower (all layers, no post-LayerNorm) and the projector, as llama.cpp's
    clip reads them.

    ``feature_layer``: the hidden state that feeds the projector, counted as transformers counts
    ``hidden_states`` (this model: -2; the tests write -3, the old converter's mistake, to see it matter).
    """
    import gguf

    config = model.vision_model.config
    text = model.text_model.config
    layers = config.num_hidden_layers
    keys = gguf.Keys
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("llama-3-vision-alpha vision tower and projector (llama3vision-min)")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool(keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_string(keys.Clip.PROJECTOR_TYPE, "mlp")  # Linear -> GELU -> Linear
    writer.add_bool(keys.ClipVision.USE_GELU, True)  # SigLIP's tanh GELU (false: quick-GELU)
    writer.add_uint32(keys.ClipVision.IMAGE_SIZE, config.image_size)
    writer.add_uint32(keys.ClipVision.PATCH_SIZE, config.patch_size)
    writer.add_uint32(keys.ClipVision.EMBEDDING_LENGTH, config.hidden_size)
    writer.add_uint32(keys.ClipVision.FEED_FORWARD_LENGTH, config.intermediate_size)
    writer.add_uint32(keys.ClipVision.BLOCK_COUNT, layers)  # all of them: the graph runs block_count - 1
    writer.add_uint32(keys.ClipVision.PROJECTION_DIM, text.hidden_size)
    writer.add_uint32(keys.ClipVision.Attention.HEAD_COUNT, config.num_attention_heads)
    writer.add_float32(keys.ClipVision.Attention.LAYERNORM_EPS, float(config.layer_norm_eps))
    writer.add_array(keys.ClipVision.IMAGE_MEAN, [float(v) for v in model.processor.image_mean])
    writer.add_array(keys.ClipVision.IMAGE_STD, [float(v) for v in model.processor.image_std])
    # hidden_states has N + 1 entries (the embeddings, then each layer): [-2] is layer N - 1's output
    writer.add_array("clip.vision.feature_layer", [layers + 1 + feature_layer])

    state = {key.removeprefix("vision_model."): tensor
             for key, tensor in model.vision_model.state_dict().items()}
    names, kinds = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    tensors = [(names[kinds.V_ENC_EMBD_PATCH] + ".weight", state["embeddings.patch_embedding.weight"]),  # 4-D
               (names[kinds.V_ENC_EMBD_PATCH] + ".bias", state["embeddings.patch_embedding.bias"]),
               (names[kinds.V_ENC_EMBD_POS] + ".weight", state["embeddings.position_embedding.weight"])]
    parts = {kinds.V_ENC_INPUT_NORM: "layer_norm1", kinds.V_ENC_ATTN_Q: "self_attn.q_proj",
             kinds.V_ENC_ATTN_K: "self_attn.k_proj", kinds.V_ENC_ATTN_V: "self_attn.v_proj",
             kinds.V_ENC_ATTN_O: "self_attn.out_proj", kinds.V_ENC_POST_ATTN_NORM: "layer_norm2",
             kinds.V_ENC_FFN_UP: "mlp.fc1", kinds.V_ENC_FFN_DOWN: "mlp.fc2"}
    for i in range(layers):
        for kind, ours in parts.items():
            for suffix in ("weight", "bias"):
                tensors.append((f"{names[kind].format(bid=i)}.{suffix}",
                                state[f"encoder.layers.{i}.{ours}.{suffix}"]))
    projector = model.mm_projector.state_dict()  # model.0.* and model.2.*: Linear, GELU, Linear
    for index in (0, 2):
        for suffix in ("weight", "bias"):
            tensors.append((f"{names[kinds.V_MMPROJ].format(bid=index)}.{suffix}",
                            projector[f"model.{index}.{suffix}"]))
    _write(writer, tensors, dtype, float32_names=(names[kinds.V_ENC_EMBD_POS] + ".weight",))


def _write(writer, tensors, dtype, float32_names=()):
    """Write the file: tensor infos first, then each tensor converted as it is written (1-D ones and
    ``float32_names`` in float32, the rest in ``dtype``), so an 8B model is never held twice."""
    def target(name, tensor):
        return np.dtype(np.float32 if tensor.dim() == 1 or name in float32_names else dtype)

    for name, tensor in tensors:
        kind = target(name, tensor)
        writer.add_tensor_info(name, tuple(tensor.shape), kind, tensor.numel() * kind.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in tensors:
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        writer.write_tensor_data(np.ascontiguousarray(array.astype(target(name, tensor), copy=False)))
    writer.close()
