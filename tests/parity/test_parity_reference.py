"""Parity: the package against ``llama3vision_original.py``, a transcription of the ORIGINAL algorithm.

The reference shares no code with the package, so every equality here is between two
independent implementations of the same steps: token split, splice, generation
(greedy and sampled) and the projector loader. Everything runs on the tiny towers.
"""

import ast

import numpy as np
import pytest
import torch
import transformers

import llama3vision_min
import llama3vision_original as ref
from llama3vision_min import (
    IMAGE_TOKEN_INDEX,
    build_prompt,
    load_projector,
    process_tensors,
    splice_batch,
    tokenizer_image_token,
)
from llama3vision_min.image import to_rgb

from conftest import make_image

MODES = ["RGB", "RGBA", "L", "P", "CMYK", "I;16"]

TF4 = int(transformers.__version__.split(".")[0]) < 5
# transformers 4.x's SiglipImageProcessor guesses the channel axis of an (H, W, 3) array and takes H in (1, 3)
# for channels-first: a picture 1 pixel high crashes (ValueError), one 3 pixels high is silently misread.
# The original does not pass input_data_format="channels_last", so on 4.x it crashes on a 1-pixel-high
# picture; the package passes it (see test_pictures_one_or_three_pixels_high_are_read_channels_last).
CHANNELS_GUESS = "on transformers 4.x the original crashes on a 1-pixel-high picture (no input_data_format)"
SIZES = [
    # strict: the reference side raises on 4.x; if it stops raising, this XPASSes and the mark must go.
    pytest.param((1, 1), marks=pytest.mark.xfail(TF4, raises=ValueError, strict=True, reason=CHANNELS_GUESS)),
    (37, 23),
    (300, 7),
]

PROMPTS = {
    "start": "<image>what is this?",
    "middle": build_prompt("what is this?"),
    "end": "describe the picture.<image>",
    "several": "<image>a red circle<image> and\n\n<image>a blue square.<image>",
    "adjacent": "how many shapes are there?<image><image>",
    "only": "<image>",
    "none": "<|start_header_id|>user<|end_header_id|>\n\nHello! How are you?<|eot_id|>",
    "empty": "",
}


def _reference_answer(model, image, question, tokenizer, **kwargs):
    return ref.answer_question(
        image, question, tokenizer,
        vision_model=model.vision_model, text_model=model.text_model, mm_projector=model.mm_projector,
        processor=model.processor, image_size=model.image_size, **kwargs,
    )


# -- prompt and token split --------------------------------------------------------------
def test_reference_does_not_import_the_package():
    tree = ast.parse(open(ref.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and not any(name.startswith("llama3vision_min") for name in imported), imported


@pytest.mark.parametrize("question", ["what is this?", "", "Please describe this image in detail."])
def test_prompt_matches_original_template(question):
    assert build_prompt(question) == ref.build_prompt(question)


@pytest.mark.parametrize("where", sorted(PROMPTS))
def test_token_ids_match_reference(tiny, where):
    _, tokenizer = tiny
    prompt = PROMPTS[where]
    ours = tokenizer_image_token(prompt, tokenizer)
    theirs = ref.tokenizer_image_token(prompt, tokenizer)  # a list, like the original without return_tensors
    assert ours.dtype == torch.long and ours.dim() == 1
    assert ours.tolist() == theirs
    assert torch.equal(tokenizer_image_token(prompt, tokenizer, return_tensors="pt"),
                       ref.tokenizer_image_token(prompt, tokenizer, return_tensors="pt"))
    # the sentinel count is the placeholder count, and exactly one BOS opens the sequence
    assert theirs.count(IMAGE_TOKEN_INDEX) == prompt.count("<image>")
    assert theirs[0] == tokenizer.bos_token_id and theirs.count(tokenizer.bos_token_id) == 1


def test_token_ids_match_reference_with_a_custom_sentinel(tiny):
    _, tokenizer = tiny
    prompt = PROMPTS["several"]
    ours = tokenizer_image_token(prompt, tokenizer, image_token_index=-7)
    assert ours.tolist() == ref.tokenizer_image_token(prompt, tokenizer, image_token_index=-7)
    assert IMAGE_TOKEN_INDEX not in ours.tolist() and ours.tolist().count(-7) == 4


def test_model_exposes_the_same_token_split(tiny):
    model, tokenizer = tiny
    prompt = PROMPTS["middle"]
    assert model.tokenizer_image_token(prompt, tokenizer, -200, return_tensors="pt").tolist() == \
        ref.tokenizer_image_token(prompt, tokenizer, -200)


# -- splice --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["start", "middle", "end", "only"])
def test_splice_matches_reference(both_sizes, where):
    model, tokenizer = both_sizes
    embedding_layer = model.text_model.get_input_embeddings()
    input_ids = ref.tokenizer_image_token(PROMPTS[where], tokenizer,
                                          return_tensors="pt").unsqueeze(0)  # (1, L)
    n_patches = (model.image_size // model.vision_model.config.patch_size) ** 2
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, n_patches, embedding_layer.embedding_dim, generator=generator)

    with torch.no_grad():
        ref_embeds, ref_mask = ref.process_tensors(input_ids, features, embedding_layer)
        our_embeds, our_mask = process_tensors(input_ids, features, embedding_layer)
        batch = splice_batch(input_ids, features, embedding_layer)

    length = input_ids.shape[1] - 1 + n_patches
    assert ref_embeds.shape == (1, length, embedding_layer.embedding_dim)
    assert torch.equal(our_embeds, ref_embeds)
    assert torch.equal(our_mask, ref_mask) and our_mask.dtype == ref_mask.dtype == torch.long
    assert torch.equal(batch.inputs_embeds, ref_embeds)
    assert torch.equal(batch.attention_mask, ref_mask) and batch.attention_mask.dtype == torch.long
    assert torch.equal(batch.position_ids, torch.arange(length).unsqueeze(0))
    # the model's own method is the same splice
    with torch.no_grad():
        assert torch.equal(model.process_tensors(input_ids, features, embedding_layer)[0], ref_embeds)


def test_splice_of_real_image_features_matches_reference(both_sizes):
    """Image side too: pixel values -> hidden_states[-2] -> projector, spliced, as the reference does it."""
    model, tokenizer = both_sizes
    image = make_image("RGB", (37, 23), seed=5)
    embedding_layer = model.text_model.get_input_embeddings()
    input_ids = ref.tokenizer_image_token(build_prompt("what is this?"), tokenizer,
                                          return_tensors="pt").unsqueeze(0)
    with torch.no_grad():
        pixel_values = model.processor(images=image.convert("RGB"), return_tensors="pt", do_resize=True,
                                       size={"height": model.image_size,
                                             "width": model.image_size})["pixel_values"]
        features = model.vision_model(pixel_values, output_hidden_states=True).hidden_states[-2]
        ref_embeds, _ = ref.process_tensors(input_ids, model.mm_projector(features), embedding_layer)
        ours = splice_batch(input_ids, model.encode_images(model.preprocess([image])), embedding_layer)
    assert torch.equal(model.preprocess([image]), pixel_values)
    assert torch.equal(ours.inputs_embeds, ref_embeds)


@pytest.mark.parametrize("size", [(1, 1), (37, 1), (37, 3), (3, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pictures_one_or_three_pixels_high_are_read_channels_last(tiny, size):
    """Not parity (the original has the flaw on 4.x): the pixels must be read as (H, W, C) whatever H is."""
    model, _ = tiny
    image = make_image("RGB", size, seed=1)
    expected = model.processor(images=image, return_tensors="pt", do_resize=True,
                               input_data_format="channels_last",
                               size={"height": model.image_size, "width": model.image_size})["pixel_values"]
    assert torch.equal(model.preprocess([image]), expected)


# -- answers -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_greedy_answers_match_reference(both_sizes, mode, size):
    """Same answers from every picture mode. A 16-bit picture is the one we read differently on purpose
    (scaled to 8 bits, where the original saturates it: see the next test), so the original gets our
    8-bit reading of it and everything after the conversion must agree."""
    model, tokenizer = both_sizes
    image = make_image(mode, size, seed=len(mode) + size[0])
    assert image.mode == mode
    question = "what is this?"
    ours = model.answer_question(image, question, tokenizer, do_sample=False, max_new_tokens=12)
    original_input = to_rgb(image) if mode == "I;16" else image
    theirs = _reference_answer(model, original_input, question, tokenizer, do_sample=False, max_new_tokens=12)
    assert ours.dim() == 1 and 0 < len(ours) <= 12
    assert torch.equal(ours, theirs), (ours.tolist(), theirs.tolist())


def test_16_bit_pictures_are_scaled_where_the_original_saturates_them():
    """The documented difference: ``convert("RGB")`` clips 16-bit values at 255 (this picture turns almost
    white), ``to_rgb`` maps 0..65535 onto 0..255 and keeps its contrast."""
    image = make_image("I;16", (37, 23), seed=3)
    values = np.asarray(image, dtype=np.float64)
    original = np.asarray(image.convert("RGB"))
    ours = np.asarray(to_rgb(image))
    assert (original == 255).mean() > 0.9 and (ours == 255).mean() < 0.1
    assert np.abs(ours[..., 0] - np.round(values / 257)).max() <= 1


def test_greedy_answers_depend_on_the_image(tiny):
    """Guards the parity above: the image reaches the answer, so matching answers mean matching image
    paths."""
    model, tokenizer = tiny
    answers = {tuple(model.answer_question(make_image("RGB", (37, 23), seed=seed), "what is this?", tokenizer,
                                           do_sample=False, max_new_tokens=12).tolist()) for seed in range(4)}
    assert len(answers) > 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_answers_match_reference_with_same_seed(both_sizes, seed):
    model, tokenizer = both_sizes
    image = make_image("RGB", (37, 23), seed=seed)
    torch.manual_seed(seed)
    ours = model.answer_question(image, "what is this?", tokenizer, max_new_tokens=12)
    torch.manual_seed(seed)
    theirs = _reference_answer(model, image, "what is this?", tokenizer, max_new_tokens=12)
    assert torch.equal(ours, theirs), (ours.tolist(), theirs.tolist())


def test_default_answers_sample(tiny):
    """By default answers are sampled (the original's do_sample=True): different seeds, different answers."""
    model, tokenizer = tiny
    image = make_image("RGB", (37, 23), seed=0)
    answers = set()
    for seed in range(6):
        torch.manual_seed(seed)
        answers.add(tuple(model.answer_question(image, "what is this?", tokenizer,
                                                max_new_tokens=12).tolist()))
    assert len(answers) > 1


class _RecordGenerate:
    """Stands in for ``text_model.generate``: records the call, returns one new token."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros((kwargs["inputs_embeds"].shape[0], 1), dtype=torch.long)


def test_default_generation_settings_follow_the_original(tiny, monkeypatch):
    model, tokenizer = tiny
    record = _RecordGenerate()
    monkeypatch.setattr(model.text_model, "generate", record)
    image = make_image("RGB", (37, 23))
    model.answer_question(image, "what is this?", tokenizer)
    _reference_answer(model, image, "what is this?", tokenizer)
    ours, theirs = record.calls
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert theirs["do_sample"] is True and theirs["temperature"] == 0.2 and theirs["max_new_tokens"] == 2000
    for name in ("do_sample", "temperature", "max_new_tokens", "pad_token_id"):
        assert ours.get(name) == theirs[name], name
    assert set(ours["eos_token_id"]) == set(theirs["eos_token_id"]) == {tokenizer.eos_token_id, eot}
    assert torch.equal(ours["inputs_embeds"], theirs["inputs_embeds"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    # nothing else that changes decoding (top_p, top_k, repetition_penalty, ...) is added
    decoding = {"top_p", "top_k", "repetition_penalty", "num_beams", "min_new_tokens", "typical_p"}
    assert not (set(ours) & decoding)


def test_tokenizer_is_left_alone(tiny):
    model, tokenizer = tiny
    eos, pad = tokenizer.eos_token, tokenizer.pad_token
    model.answer_question(make_image(), "what is this?", tokenizer, do_sample=False, max_new_tokens=2)
    assert (tokenizer.eos_token, tokenizer.pad_token) == (eos, pad)


# -- projector loader ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_projector_loader_matches_reference(tmp_path, dtype):
    mm_hidden, hidden = 24, 40
    generator = torch.Generator().manual_seed(7)
    shapes = {"0.weight": (hidden, mm_hidden), "0.bias": (hidden,),
              "2.weight": (hidden, hidden), "2.bias": (hidden,)}
    state = {f"model.mm_projector.{name}": torch.randn(shape, generator=generator).to(dtype)
             for name, shape in shapes.items()}
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)

    ref_state = ref.load_alpha_projector_state(path)
    ours = load_projector(path)
    assert set(ours.state_dict()) == set(ref_state) == {f"model.{name}" for name in shapes}
    for key, tensor in ref_state.items():
        assert ours.state_dict()[key].dtype == tensor.dtype == dtype
        assert torch.equal(ours.state_dict()[key], tensor), key
    assert (ours.mm_hidden_size, ours.hidden_size) == (mm_hidden, hidden)
    assert isinstance(ours, llama3vision_min.ProjectionModule)

    reference = ref.ReferenceProjector(mm_hidden, hidden)
    reference.load_state_dict(ref_state)
    x = torch.randn(1, 5, mm_hidden, generator=generator)
    with torch.no_grad():
        expected = reference(x)  # float32 weights (loaded from the file's values)
        got = ours.float()(x)
    assert torch.equal(got, expected)


def test_original_follow_up_is_the_text_history_without_the_picture(tiny, monkeypatch):
    """The reference's follow-up turn feeds the Llama 3 chat rendering of the text history alone."""
    model, tokenizer = tiny
    seen = []
    generate = model.text_model.generate
    monkeypatch.setattr(model.text_model, "generate", lambda **kw: seen.append(kw) or generate(**kw))
    history = [("what is this?", "a red circle.")]
    ids = ref.follow_up_turn(model.text_model, tokenizer, history, "what colour?",
                             do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert ids.shape == (4,)
    (kwargs,) = seen
    assert "inputs_embeds" not in kwargs and IMAGE_TOKEN_INDEX not in kwargs["input_ids"][0].tolist()
    messages = [{"role": "user", "content": "what is this?"},
                {"role": "assistant", "content": "a red circle."},
                {"role": "user", "content": "what colour?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(kwargs["input_ids"][0]) == rendered
