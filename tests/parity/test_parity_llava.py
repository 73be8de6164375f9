"""Parity: the package against transformers' own ``LlavaForConditionalGeneration``.

LLaVA expresses llama-3-vision-alpha exactly with ``vision_feature_layer=-2``,
``vision_feature_select_strategy="full"`` (SigLIP has no CLS token to drop), an exact-GELU
projector with biases, and one real vocabulary id repeated once per patch where the
package puts its single ``-200`` sentinel. The same weights are copied into a LLaVA
model here (the mapping is written out below) and both must give the same logits and
the same greedy tokens. Runs on the tiny towers, in float32.
"""

import pytest
import torch
import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration

from llama3vision_min import IMAGE_TOKEN_INDEX, build_prompt, tokenizer_image_token
# finds LLaVA's sub-modules on transformers 4.57 and 5.x
from llama3vision_min.tools.llava_export import _child
from llama3vision_min.generation import stop_token_ids

from conftest import make_image

IMAGE_TOKEN = "<|reserved_special_token_0|>"
LOGIT_TOLERANCE = 1e-5
MAX_LOGIT_DIFF = {}
"""Max |logit difference| per tiny size, filled by the logits test (printed; run with -s to see it)."""


def _n_patches(model):
    return (model.image_size // model.vision_model.config.patch_size) ** 2


def llava_parts(llava):
    return {
        "vision": _child(llava, "model.vision_tower", "vision_tower"),
        "projector": _child(llava, "model.multi_modal_projector", "multi_modal_projector"),
        "decoder": _child(llava, "model.language_model", "language_model.model", "language_model"),
        "lm_head": llava.get_output_embeddings(),
    }


def build_llava(model, tokenizer):
    """A LLaVA model holding exactly the weights of ``model`` (a ``LlamaVision``)."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=model.vision_model.config,
        text_config=model.text_model.config,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        image_token_index=image_token_id,
        image_seq_length=_n_patches(model),
        tie_word_embeddings=False,
    )
    torch.manual_seed(123)  # LLaVA's own random init, overwritten below
    llava = LlavaForConditionalGeneration(config).eval()
    parts = llava_parts(llava)

    projector = model.mm_projector.state_dict()
    mapping = {"linear_1.weight": "model.0.weight", "linear_1.bias": "model.0.bias",
               "linear_2.weight": "model.2.weight", "linear_2.bias": "model.2.bias"}
    # Strict loads: every LLaVA tensor gets a value and no tensor of ours is left over.
    parts["vision"].load_state_dict(model.vision_model.state_dict())
    parts["projector"].load_state_dict({theirs: projector[ours] for theirs, ours in mapping.items()})
    parts["decoder"].load_state_dict(model.text_model.get_decoder().state_dict())
    parts["lm_head"].load_state_dict(model.text_model.get_output_embeddings().state_dict())
    return llava, image_token_id


def llava_input_ids(input_ids, image_token_id, n_patches):
    """Our 1-D ids with one -200 -> LLaVA's ids with the image token repeated ``n_patches`` times."""
    out = []
    for token_id in input_ids.tolist():
        out.extend([image_token_id] * n_patches if token_id == IMAGE_TOKEN_INDEX else [token_id])
    return torch.tensor([out], dtype=torch.long)


@pytest.fixture(scope="module", params=["tiny", "small"])
def pair(request):
    """(LlamaVision, tokenizer, LLaVA copy, image token id) for each tiny size."""
    model, tokenizer = request.getfixturevalue(request.param)
    llava, image_token_id = build_llava(model, tokenizer)
    return request.param, model, tokenizer, llava, image_token_id


def _inputs(model, tokenizer, image_token_id, question="what is this?", image=None):
    image = image if image is not None else make_image("RGB", (37, 23), seed=2)
    ids = tokenizer_image_token(build_prompt(question), tokenizer)  # (L,) with one -200
    pixel_values = model.preprocess([image])
    return ids, llava_input_ids(ids, image_token_id, _n_patches(model)), pixel_values


def test_weights_are_copied_exactly(pair):
    _, model, tokenizer, llava, _ = pair
    assert llava.config.vision_feature_select_strategy == "full" and llava.config.vision_feature_layer == -2
    ours = list(model.vision_model.state_dict().values()) + list(model.mm_projector.state_dict().values()) + \
        list(model.text_model.state_dict().values())
    theirs = list(llava.state_dict().values())
    assert len(theirs) == len(ours)
    assert torch.equal(llava.get_input_embeddings().weight, model.text_model.get_input_embeddings().weight)
    assert torch.equal(llava.get_output_embeddings().weight, model.text_model.get_output_embeddings().weight)
    # untied, as in Llama 3 8B: the head is not the embedding matrix
    assert llava.get_output_embeddings().weight.data_ptr() != llava.get_input_embeddings().weight.data_ptr()
    assert torch.equal(llava_parts(llava)["projector"].linear_2.weight, model.mm_projector.model[2].weight)


def test_image_token_is_a_real_vocabulary_id(pair):
    _, model, tokenizer, _, image_token_id = pair
    assert 0 <= image_token_id < model.text_model.config.vocab_size
    assert image_token_id != tokenizer.unk_token_id
    ids = tokenizer_image_token(build_prompt("what is this?"), tokenizer)
    assert image_token_id not in ids.tolist()  # the prompt text never produces it by itself


def test_logits_match_llava(pair):
    size, model, tokenizer, llava, image_token_id = pair
    ids, llava_ids, pixel_values = _inputs(model, tokenizer, image_token_id)
    with torch.no_grad():
        ours = model(input_ids=ids.unsqueeze(0), pixel_values=pixel_values).logits
        theirs = llava(input_ids=llava_ids, pixel_values=pixel_values,
                       attention_mask=torch.ones_like(llava_ids)).logits
    length = len(ids) - 1 + _n_patches(model)
    assert ours.shape == theirs.shape == (1, length, model.text_model.config.vocab_size)
    assert ours.dtype == theirs.dtype == torch.float32
    diff = (ours - theirs).abs().max().item()
    MAX_LOGIT_DIFF[size] = diff
    print(f"\n[llava parity] {size}: max |logit difference| = {diff:.3e} "
          f"(transformers {transformers.__version__})")
    assert diff <= LOGIT_TOLERANCE, f"{size}: max logit difference {diff:.3e} > {LOGIT_TOLERANCE}"
    # the tolerance is meaningful: the logits span a range far wider than it
    assert (ours.max() - ours.min()).item() > 1.0


def test_logits_differ_from_llava_on_the_last_layer(pair):
    """Negative control: features from the last layer (hidden_states[-1]) would be caught by the test
    above."""
    _, model, tokenizer, llava, image_token_id = pair
    ids, llava_ids, pixel_values = _inputs(model, tokenizer, image_token_id)
    with torch.no_grad():
        ours = model(input_ids=ids.unsqueeze(0), pixel_values=pixel_values).logits
        theirs = llava(input_ids=llava_ids, pixel_values=pixel_values,
                       attention_mask=torch.ones_like(llava_ids), vision_feature_layer=-1).logits
    assert (ours - theirs).abs().max().item() > 100 * LOGIT_TOLERANCE


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_greedy_tokens_match_llava(pair, mode):
    _, model, tokenizer, llava, image_token_id = pair
    image = make_image(mode, (41, 29), seed=9)
    ids, llava_ids, pixel_values = _inputs(model, tokenizer, image_token_id, image=image)
    stops = stop_token_ids(tokenizer)
    ours = model.answer_question(image, "what is this?", tokenizer, do_sample=False,
                                 max_new_tokens=16, min_new_tokens=16)
    with torch.no_grad():
        out = llava.generate(input_ids=llava_ids, pixel_values=pixel_values,
                             attention_mask=torch.ones_like(llava_ids),
                             do_sample=False, max_new_tokens=16, min_new_tokens=16,
                             eos_token_id=stops, pad_token_id=stops[0])
    theirs = out[0, llava_ids.shape[1]:]
    assert torch.equal(out[0, : llava_ids.shape[1]], llava_ids[0])  # LLaVA returns prompt + new tokens
    assert len(ours) == len(theirs) == 16
    assert torch.equal(ours, theirs), (ours.tolist(), theirs.tolist())
