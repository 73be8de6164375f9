"""Step 4 of the pipeline: the projector, the only trained part of the model.

It maps each SigLIP patch feature (1152 wide for so400m) into the LLM's embedding
space (4096 wide for Llama-3-8B)::

    (batch, 729, 1152) --Linear--> (batch, 729, 4096) --GELU--> --Linear--> (batch, 729, 4096)

The layers live in an ``nn.Sequential`` called ``model`` so the state-dict keys are
``model.0.weight``, ``model.0.bias``, ``model.2.weight``, ``model.2.bias`` -- the same
keys as the official checkpoints (index 1 is the GELU, which has no weights). Its file comes in four
key forms (LLaVA's trainer writes ``model.mm_projector.0.weight``; ``load_projector`` reads them all).

Sources: ``ProjectionModule`` in the official ``modeling_llamavision.py``
(https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py);
LLaVA's ``mlp2x_gelu`` in ``llava/model/multimodal_projector/builder.py``
(https://github.com/haotian-liu/LLaVA/blob/main/llava/model/multimodal_projector/builder.py) and its
key forms in ``llava/train/train.py`` (``get_mm_adapter_state_maybe_zero_3``); the two-layer
MLP that LLaVA-1.5 introduced in place of one linear layer (arXiv 2310.03744); transformers'
``LlavaMultiModalProjector`` in ``models/llava/modeling_llava.py`` is the same module.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
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


# -- its file: the trained weights, in any of the four key forms the checkpoints use ----------------
PROJECTOR_KEY = re.compile(r"^(?:model\.mm_projector|mm_projector\.model|mm_projector|model)"
                           r"\.([02])\.(weight|bias)$")
"""LLaVA's ``model.mm_projector.0.weight``, ``mm_projector.model.0.weight``, ``mm_projector.0.weight`` and the
stripped ``model.0.weight`` (layers 0 and 2: index 1 is the GELU)."""


def projector_key(key):
    """Any projector key form -> this module's name (``model.0.weight``); None: not a projector key."""
    match = PROJECTOR_KEY.match(key)
    return "model.{}.{}".format(*match.groups()) if match else None


def read_state_dict(path):
    """A projector file (``.safetensors``, ``.bin``, ``.pt``; or a folder holding ``mm_projector.safetensors``
    or ``.bin``) as a dict of CPU tensors, read without running code: the original reads ``mm_projector.bin``
    with plain ``torch.load``; ``weights_only=True`` refuses a pickle that would execute something."""
    path = Path(path)
    if path.is_dir():
        inside = [path / f"mm_projector{suffix}" for suffix in (".safetensors", ".bin")]
        if not any(file.is_file() for file in inside):
            raise ValueError(f"expected mm_projector.safetensors or mm_projector.bin in {path}")
        path = next(file for file in inside if file.is_file())
    if not path.is_file():
        raise ValueError(f"expected a checkpoint file, but {path} does not exist or is not a file")
    if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
        raise ValueError(f"expected a .safetensors or .bin projector file, got {path.name}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and the unpickler raise their own error types
        if path.suffix == ".safetensors":
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
        raise ValueError(f"refused to load {path}: it is not a plain tensor pickle that weights_only=True "
                         f"accepts ({type(error).__name__}); nothing in it was executed") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return state


def load_projector(path, mm_hidden_size=None, hidden_size=None):
    """The projector from a ``.bin`` or ``.safetensors`` file (or a folder holding ``mm_projector.*``), in
    any key form, in the file's dtype; its sizes
    come from the file (and must equal ``mm_hidden_size`` / ``hidden_size`` when those are given)."""
    found, state = read_state_dict(path), {}
    for key, tensor in found.items():
        name = projector_key(key)
        if name in state and name is not None:
            raise ValueError(f"{path}: {key} holds {name} a second time (two key forms in one file)")
        state[name] = tensor
    if len(found) != 4 or None in state:
        raise ValueError(f"{path}: expected projector keys like model.mm_projector.0.weight, model.0.weight "
                         f"or mm_projector.model.0.weight (layers 0 and 2, weight and bias); "
                         f"found {sorted(found)[:8]}")
    for key, tensor in sorted(state.items()):
        rank = 2 if key.endswith("weight") else 1
        if not tensor.is_floating_point() or tensor.dim() != rank:
            raise ValueError(f"{path}: expected {key} to be a {rank}-D floating-point tensor, found "
                             f"{tensor.dim()}-D {tensor.dtype} of shape {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():  # a diverged training run: every answer would be noise
            raise ValueError(f"{path}: {key} holds NaN or infinite values")
    hidden, mm = state["model.0.weight"].shape  # a Linear stores (out, in)
    expected = (hidden_size or hidden, mm_hidden_size or mm)
    if (hidden, mm) != expected:
        raise ValueError(f"{path}: expected a projector {expected[1]} -> {expected[0]} (model.0.weight of "
                         f"shape {expected}), found model.0.weight of shape {(hidden, mm)}")
    for key, shape in (("model.0.bias", (hidden,)), ("model.2.weight", (hidden, hidden)),
                       ("model.2.bias", (hidden,))):
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: expected {key} of shape {shape}, found {tuple(state[key].shape)}")
    projector = ProjectionModule(mm, hidden)
    projector.load_state_dict(state)
    return projector.to(state["model.0.weight"].dtype)
