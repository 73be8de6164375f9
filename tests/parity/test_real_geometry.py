"""The real model's shapes end to end, with random weights.

SigLIP so400m-patch14-384 at full size (27 layers) and a Llama 3 8B at full width
(hidden 4096, vocab 128256, GQA 32/8 heads, rope_theta 500000) cut to 2 layers. The
weights are random, so only shapes, lengths, dtypes and finiteness are checked: 729
image tokens from ``hidden_states[-2]``, a (1, 729, 4096) projection, a splice of
length L - 1 + 729 and one forward step over it.

Built fast by the stand-ins (``random_parts`` at a ``Geometry``): parameters are created on the
meta device (buffers such as the rotary frequencies and SigLIP's position ids stay real), then
materialised in bfloat16 and filled by tiling one small random pool -- random init of ~1.9 B
parameters would take longer than everything else together. About 4 GB of memory.
"""

import dataclasses

import pytest
import torch

from llama3vision_min import (IMAGE_TOKEN_INDEX, LlamaVision, build_prompt, process_tensors,
                              tokenizer_image_token)
from llama3vision_min.image import vision_features
from llama3vision_min.miniature.stand_ins import SIZES, random_parts

from conftest import make_image

pytestmark = pytest.mark.slow

N_PATCHES = 729  # (384 // 14) ** 2, no CLS token
VISION_HIDDEN, TEXT_HIDDEN, VOCAB = 1152, 4096, 128256
DTYPE = torch.bfloat16
REAL = dataclasses.replace(SIZES["real"], vision_layers=27)  # the whole so400m tower, Llama 3 cut to 2 layers


@pytest.fixture(scope="module")
def real():
    vision_model, text_model, projector, tokenizer = random_parts(REAL, seed=0, dtype=DTYPE)
    model = LlamaVision(vision_model=vision_model, text_model=text_model, mm_projector=projector)
    # the tiny tokenizer's ids are valid in a 128256-id vocabulary
    return model.requires_grad_(False), tokenizer


@pytest.fixture(scope="module")
def pixel_values(real):
    model, _ = real
    return model.preprocess([make_image("RGB", (500, 333), seed=4)])


class Capture:
    """Forward hook that keeps the last output of a module (the tower runs once per test module, not
    twice)."""

    def __init__(self, module):
        self.output = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.output = output


@pytest.fixture(scope="module")
def vision_run(real, pixel_values):
    """The package's ``vision_features`` once, with the tower's full output captured beside it."""
    model, _ = real
    capture = Capture(model.vision_model)
    try:
        with torch.inference_mode():
            features = vision_features(model.vision_model, pixel_values)
    finally:
        capture.handle.remove()
    return features, capture.output.hidden_states


def test_geometry_is_the_real_one(real):
    model, _ = real
    assert model.image_size == 384 and model.vision_model.config.patch_size == 14
    assert model.vision_model.config.num_hidden_layers == 27
    assert all(p.device.type == "cpu" and p.dtype == DTYPE for p in model.parameters())
    assert model.text_model.get_input_embeddings().weight.shape == (VOCAB, TEXT_HIDDEN)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.8e9 < n_params < 2.1e9  # so400m (~0.43 B) + two 128256 x 4096 matrices + 2 layers + projector


def test_pixel_values_are_384_square(pixel_values):
    assert pixel_values.shape == (1, 3, 384, 384)
    assert -1.0 <= pixel_values.min() and pixel_values.max() <= 1.0  # mean/std 0.5


def test_729_image_tokens_from_the_second_to_last_layer(vision_run):
    features, hidden_states = vision_run
    assert len(hidden_states) == 27 + 1  # embeddings, then one per layer
    assert features.shape == (1, N_PATCHES, VISION_HIDDEN) and features.dtype == DTYPE
    assert torch.equal(features, hidden_states[-2])
    assert not torch.equal(features, hidden_states[-1])
    assert torch.isfinite(features).all()


def test_projector_output(real, vision_run):
    model, _ = real
    with torch.inference_mode():
        projected = model.project(vision_run[0])
    assert projected.shape == (1, N_PATCHES, TEXT_HIDDEN) and projected.dtype == DTYPE
    assert torch.isfinite(projected).all()


def test_splice_length_and_mask(real, vision_run):
    model, tokenizer = real
    ids = tokenizer_image_token(build_prompt("what is this?"), tokenizer).unsqueeze(0)  # (1, L)
    with torch.inference_mode():
        projected = model.project(vision_run[0])
        embeds, mask = process_tensors(ids, projected, model.text_model.get_input_embeddings())
    length = ids.shape[1] - 1 + N_PATCHES
    assert embeds.shape == (1, length, TEXT_HIDDEN)
    assert mask.shape == (1, length) and mask.dtype == torch.long and bool((mask == 1).all())
    start = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])  # the image rows begin where the sentinel stood
    assert torch.equal(embeds[:, start : start + N_PATCHES], projected)


def test_one_forward_step(real, pixel_values):
    model, tokenizer = real
    ids = tokenizer_image_token(build_prompt("what is this?"), tokenizer).unsqueeze(0)
    length = ids.shape[1] - 1 + N_PATCHES
    capture = Capture(model.mm_projector)
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, pixel_values=pixel_values).logits
    finally:
        capture.handle.remove()
    assert logits.shape == (1, length, VOCAB)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].float().std() > 0  # not a constant row

    # The last row is what generation reads: the original's splice + the LLM alone give the same row.
    with torch.inference_mode():
        embeds, mask = process_tensors(ids, capture.output, model.text_model.get_input_embeddings())
        last = model.text_model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1).logits
    assert last.shape == (1, 1, VOCAB)
    difference = (last[0, -1].float() - logits[0, -1].float()).abs().max().item()
    scale = logits[0, -1].float().abs().max().item()
    assert difference <= 0.02 * scale, (difference, scale)
