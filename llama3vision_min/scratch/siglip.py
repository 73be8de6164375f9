"""SigLIP's vision tower, written out: pixels -> patches -> a stack of encoder layers -> every layer's output.

    pixel_values                       (n, 3, 384, 384)
      -> patch embedding (a convolution whose stride is its kernel: one vector per 14 x 14 patch)
                                       (n, 729, 1152)   27 x 27 patches, no CLS token
      + a learned position embedding, one per patch
      -> 27 encoder layers, each:  x + attention(LayerNorm(x)),  then  x + MLP(LayerNorm(x))
      -> hidden_states: the embeddings and each layer's output, 28 tensors of (n, 729, 1152)

llama-3-vision-alpha reads ``hidden_states[-2]``, the output of layer 26 of 27, before the final
LayerNorm: LLaVA found the last layer too shaped by SigLIP's contrastive training objective (it
feeds a pooling head that squeezes the picture into one vector to compare with a caption), the one
before it richer in per-patch detail. The final LayerNorm and the pooling head are kept only for
completeness: the LayerNorm gives ``last_hidden_state``; the head is not built (nothing reads it).

The parameters carry transformers' names (``embeddings.patch_embedding``,
``encoder.layers.N.self_attn.q_proj``, ...), so the same state dicts load into either. Written from the
SigLIP paper (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", arXiv 2303.15343), the ViT it
builds on (Dosovitskiy et al., arXiv 2010.11929) and the published configuration of
``google/siglip-so400m-patch14-384``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (n, patches, width): the last layer's output after the final LayerNorm
    # (embeddings, layer 1, ..., layer N): N + 1 tensors of (n, patches, width)
    hidden_states: tuple | None = None


class PatchEmbeddings(nn.Module):
    """Cut the picture into patches, turn each into a vector, add where it sits."""

    def __init__(self, config):
        super().__init__()
        self.n_patches = (config.image_size // config.patch_size) ** 2  # 27 * 27 = 729
        # A convolution with kernel = stride = patch size sees each patch exactly once: a linear map
        # of its 14 x 14 x 3 pixels to one vector. (A 384-pixel picture leaves 6 pixels that no patch covers.)
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        # Attention itself does not know where a patch was: a learned vector per position tells it.
        self.position_embedding = nn.Embedding(self.n_patches, config.hidden_size)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values)  # (n, width, 27, 27)
        patches = patches.flatten(2).transpose(1, 2)  # (n, 729, width): patches in reading order, row by row
        positions = torch.arange(self.n_patches, device=pixel_values.device)
        return patches + self.position_embedding(positions)  # (n, 729, width)


class Attention(nn.Module):
    """Multi-head self-attention over all patches (no mask: every patch sees every other)."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.num_attention_heads  # 16
        self.head_dim = config.hidden_size // self.n_heads  # 1152 / 16 = 72
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        n, length, width = x.shape

        def heads(t):  # (n, length, width) -> (n, heads, length, head_dim)
            return t.view(n, length, self.n_heads, self.head_dim).transpose(1, 2)

        # softmax(q k^T / sqrt(head_dim)) v, in every head at once
        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                             heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))  # heads side by side again


class MLP(nn.Module):
    """Widen, GELU, narrow: 1152 -> 4304 -> 1152, applied to each patch on its own."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        # SigLIP was trained with GELU's tanh approximation ("gelu_pytorch_tanh"); the exact GELU gives
        # slightly different numbers, and the tests show the difference breaks parity.
        self.approximate = "tanh" if config.hidden_act in ("gelu_pytorch_tanh", "gelu_new") else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: normalise, attend, add back; normalise, MLP, add back."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))  # the residual stream carries the input past each block
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipVisionTower(nn.Module):
    """The image half of SigLIP: ``tower(pixel_values, output_hidden_states=True).hidden_states[-2]``.

    ``config`` is transformers' ``SiglipVisionConfig`` (sizes only); ``vision_use_head`` is set to
    False because the pooling head is not built.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.config.vision_use_head = False
        self.embeddings = PatchEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def get_input_embeddings(self):
        return self.embeddings.patch_embedding

    @property
    def dtype(self):
        return self.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values, output_hidden_states=False, **kwargs):
        x = self.embeddings(pixel_values.to(self.dtype))  # (n, patches, width)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        return VisionOutput(last_hidden_state=self.post_layernorm(x),
                            hidden_states=tuple(hidden_states) if output_hidden_states else None)
