"""Llama 3's decoder, written out: token embeddings -> layers of attention and MLP -> next-token logits.

    inputs_embeds                       (batch, T, 4096)   word embeddings, with the picture's rows spliced in
      -> 32 decoder layers, each:  x + attention(RMSNorm(x)),  then  x + SwiGLU(RMSNorm(x))
      -> RMSNorm -> lm_head             (batch, T, 128256) a score for every vocabulary token

Three ideas differ from the original transformer, each explained where it is used: RMSNorm, rotary position
embeddings (RoPE) and grouped-query attention (8 key/value heads for 32 query heads). The KV cache keeps each
layer's keys and values, so that generation runs only the new token through the model.

The parameters carry transformers' names (``model.layers.N.self_attn.q_proj``, ``lm_head``, ...), so the same
state dicts load into either, and any module with a ``forward(x)`` serves as a projection (a 4-bit
``Linear4bit`` too). ``LlamaLM`` is a ``PreTrainedModel`` so that transformers' ``generate`` can drive it
too (our own loop: ``generate.py``). From the Llama 3 paper (arXiv 2407.21783), RoFormer (2104.09864), GQA
(2305.13245), GLU variants (2002.05202), RMSNorm (1910.07467) and Meta's configurations."""

import dataclasses
import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import DynamicCache, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..constants import IGNORE_INDEX

CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
               else "past_key_values")
"""transformers 5 renamed the outputs' (and generate's) ``past_key_values`` to ``cache``; both are served."""


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned weight (no mean, no bias).

    Cheaper than LayerNorm and as good for LLMs: re-centering turned out unnecessary, only the scale
    matters. Computed in float32 so that a half-precision model normalises exactly."""

    def __init__(self, width, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_settings(config):
    """``(theta, rope type, its parameters)``, read from the field transformers itself reads (5.x
    ``rope_parameters``, 4.x ``rope_scaling``: a config saved by one may carry a stale copy of the other)."""
    field = "rope_parameters" if int(transformers.__version__.split(".")[0]) >= 5 else "rope_scaling"
    rope = dict(getattr(config, field, None) or {})
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope type {kind!r} is not written out here (default and Llama 3.1's llama3 are)")
    return theta, kind, rope


def rope_frequencies(config, scaled=True):
    """One rotation frequency per pair of dimensions of a head: theta ** (-2i / head_dim).

    Llama 3 uses theta = 500000 (Llama 2: 10000): slower rotations, so far-apart positions stay distinct
    over a long context. Llama 3.1 (``rope_type`` "llama3") slows the low frequencies further by ``factor``,
    blending between ``low_freq_factor`` and ``high_freq_factor``: an 8192-token context stretched to 128k
    (``scaled=False``: the frequencies before that)."""
    theta, kind, rope = rope_settings(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
    if kind == "llama3" and scaled:
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        context = rope["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        slowed = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)  # long waves slowed
        blend = (context / wavelength - low) / (high - low)  # 0 .. 1 between the two thresholds
        middle = (wavelength >= context / high) & (wavelength <= context / low)
        inv_freq = torch.where(middle, (1 - blend) * slowed / factor + blend * slowed, slowed)
    return inv_freq


def rotate(x, cos, sin):
    """Rotate each pair (x[i], x[i + head_dim/2]) by its position's angle: RoPE.

    After rotation, the dot product of a query at position m and a key at position n depends only
    on m - n: attention sees relative positions, at no cost in parameters."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: 32 query heads share 8 key/value heads.

    Sharing keys and values between groups of 4 query heads cuts the KV cache (and its memory
    traffic while generating) by 4, at almost no loss in quality."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads  # d = 128
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache=None, output_attentions=False):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (b, 32, T, d)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (b, 8, T, d)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:  # the keys and values of every earlier position, then these
            k, v = cache.update(k, v, self.layer_index)  # (b, 8, past + T, 128)
        group = self.n_heads // self.n_kv_heads  # query head h reads key/value head h // group (4 per group)
        if output_attentions:  # the same, written out, to return the weights (llama3vision_min.lens)
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (b, 32, past + T, 128)
            scores = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)  # (b, 32, T, past + T)
            return self.o_proj((weights @ v).transpose(1, 2).reshape(batch, length, -1)), weights
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)  # (b, 32, T, 128)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP, 4096 -> 14336 -> 4096. The gate decides, per hidden
    unit, how much of the ``up`` projection passes; better than a plain MLP of the same cost."""

    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask, cache=None, output_attentions=False):
        attended, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, output_attentions)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), weights


def causal_mask(attention_mask, length, past, device):
    """(batch, 1, length, past + length) booleans: a position sees itself, earlier positions, no padding
    (``attention_mask``: (batch, past + length), 0 on padding, or None). A padding row that would see
    nothing sees everything instead: its output is never read, and an all-masked row would give NaN."""
    total = past + length
    query = torch.arange(past, total, device=device)[:, None]  # (length, 1): the new positions
    allowed = (torch.arange(total, device=device)[None, :] <= query)[None, None]  # (1, 1, length, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -total:].bool()
    return allowed | ~allowed.any(-1, keepdim=True)


class Decoder(nn.Module):
    """The layers between the token embeddings and the output head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None,
                output_attentions=False, output_hidden_states=False, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, T, width)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:  # 0, 1, 2, ... after what the cache holds
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        angles = position_ids[..., None].float() * self.inv_freq.float()  # (b, T, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (b, 1, T, head_dim): each angle twice
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = causal_mask(attention_mask, x.shape[1], past, x.device)
        states, attentions = [x], []  # as transformers returns them: the input, each layer's output, ...
        for layer in self.layers:
            x, weights = layer(x, cos, sin, mask, cache, output_attentions)
            states, attentions = states + [x], attentions + [weights]
        x = self.norm(x)  # ... and the last one after the final norm
        return BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_FIELD: cache},
                                       hidden_states=(*states[:-1], x) if output_hidden_states else None,
                                       attentions=tuple(attentions) if output_attentions else None)


class LlamaLM(PreTrainedModel, GenerationMixin):
    """Llama 3 for next-token prediction: ``Decoder`` + ``lm_head``, driven by transformers' ``generate``."""

    config_class = LlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True  # its attention is torch's scaled_dot_product_attention

    def __init__(self, config):
        super().__init__(config)
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):  # only for a model built from a config alone (random weights)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self, *args, **kwargs):
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, cache=None, past_key_values=None, logits_to_keep=0, output_attentions=False,
                output_hidden_states=False, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state  # (b, T, width)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (b, T, vocab)
        loss = None  # position t predicts token t + 1; IGNORE_INDEX marks positions without a target
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      attentions=out.attentions, **{CACHE_FIELD: cache})
