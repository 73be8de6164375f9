"""Step 4 of the pipeline: the projector, the only trained part of the model.

It maps each SigLIP patch feature (1152 wide for so400m) into the LLM's embedding
space (4096 wide for Llama-3-8B)::

    (batch, 729, 1152) --Linear--> (batch, 729, 4096) --GELU--> --Linear--> (batch, 729, 4096)

The layers live in an ``nn.Sequential`` called ``model`` so the state-dict keys are
``model.0.weight``, ``model.0.bias``, ``model.2.weight``, ``model.2.bias`` -- the same
keys as the official checkpoints (index 1 is the GELU, which has no weights).

Sources: ``ProjectionModule`` in the official ``modeling_llamavision.py``
(https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py);
LLaVA's ``mlp2x_gelu`` in ``llava/model/multimodal_projector/builder.py``
(https://github.com/haotian-liu/LLaVA/blob/main/llava/model/multimodal_projector/builder.py), the two-layer
MLP that LLaVA-1.5 introduced in place of one linear layer (arXiv 2310.03744); transformers'
``LlavaMultiModalProjector`` in ``models/llava/modeling_llava.py`` is the same module.
"""

from torch import nn


class ProjectionModule(nn.Module):
    """Linear -> GELU (exact, not tanh) -> Linear, with biases."""

    def __init__(self, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.mm_hidden_size = mm_hidden_size
        self.hidden_size = hidden_size
        self.model = nn.Sequential(
            nn.Linear(mm_hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, image_features):
        # (n_images, n_patches, mm_hidden_size) -> (n_images, n_patches, hidden_size)
        return self.model(image_features)
