"""Shared fixtures: tiny stand-in checkpoints written to disk, loaded through the real loader."""

import pytest
import torch
from PIL import Image

from llama3vision_min import LlamaVision
from llama3vision_min.loading import load_tokenizer
from llama3vision_min.miniature.stand_ins import build_tiny

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny checkpoint in the -hf layout (tokenizer included)."""
    return build_tiny(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    """A second, slightly larger tiny checkpoint (other widths, layers and patch grid)."""
    return build_tiny(tmp_path_factory.mktemp("small"), size="small", seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """``(LlamaVision, tokenizer)`` loaded from ``tiny_dir``."""
    return LlamaVision.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def small(small_dir):
    return LlamaVision.from_pretrained(small_dir), load_tokenizer(small_dir)


@pytest.fixture(params=["tiny", "small"])
def both_sizes(request, tiny, small):
    """Each tiny size in turn: ``(LlamaVision, tokenizer)``."""
    return {"tiny": tiny, "small": small}[request.param]


def make_image(mode="RGB", size=(37, 23), seed=0):
    """A random picture in any PIL mode (odd sizes by default)."""
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    image = Image.fromarray(rgb, mode="RGB")
    if mode == "I;16":
        return image.convert("L").convert("I").point(lambda v: v * 200).convert("I;16")
    return image.convert(mode)
