"""The from-scratch towers (``llama3vision_min.scratch``) against transformers' on the same weights.

Logits, every layer's hidden state, greedy answers, the KV cache, batching, chat, streaming, the loss and
the export, at the tests' two tiny sizes, on the miniature and at the real geometry; negative controls
(exact GELU in SigLIP's MLP, RoPE theta 10000) show the comparison would see a wrong step.
"""

import dataclasses
import importlib.util
import threading
import types

import pytest
import torch
from transformers import TextIteratorStreamer

from llama3vision_min import LlamaVision, build_prompt, load_mini, tokenizer_image_token
from llama3vision_min.loading import load_tokenizer
from llama3vision_min.miniature.stand_ins import SIZES, make_configs, random_parts
from llama3vision_min.scratch.llama import LlamaLM, rope_frequencies
from llama3vision_min.scratch.siglip import SiglipVisionTower
from llama3vision_min.scratch.weights import llm_from_transformers, vision_from_transformers

from conftest import make_image

TOLERANCE = 1e-5  # float32
QUESTION = "what is this?"


def _pair(name, tiny_dir, small_dir):
    if name == "mini":
        (ours, tokenizer), (theirs, _) = load_mini(implementation="scratch"), load_mini()
        return theirs, ours, tokenizer
    folder = {"tiny": tiny_dir, "small": small_dir}[name]
    return (LlamaVision.from_pretrained(folder),
            LlamaVision.from_pretrained(folder, implementation="scratch"),
            load_tokenizer(folder))


@pytest.fixture(scope="module", params=["tiny", "small", "mini"])
def pair(request, tiny_dir, small_dir):
    """``(transformers model, scratch model, tokenizer)`` loaded from the same checkpoint."""
    return _pair(request.param, tiny_dir, small_dir)


def _inputs(model, tokenizer, seed=0, question=QUESTION):
    ids = tokenizer_image_token(build_prompt(question), tokenizer)[None]  # (1, L)
    return ids, model.preprocess([make_image("RGB", (37, 23), seed=seed)])


def test_the_towers_are_the_scratch_ones(pair):
    theirs, ours, _ = pair
    assert isinstance(ours.text_model, LlamaLM) and isinstance(ours.vision_model, SiglipVisionTower)
    assert not isinstance(theirs.text_model, LlamaLM)


def test_logits_are_equal(pair):
    theirs, ours, tokenizer = pair
    ids, pixels = _inputs(theirs, tokenizer)
    with torch.no_grad():
        expected, got = (theirs(input_ids=ids, pixel_values=pixels).logits,
                         ours(input_ids=ids, pixel_values=pixels).logits)
    difference = (got - expected).abs().max().item()
    print(f"\n[scratch parity] max |logit difference| = {difference:.2e} over {tuple(got.shape)}")
    assert got.shape == expected.shape and difference <= TOLERANCE
    assert (expected.max() - expected.min()).item() > 1.0  # the tolerance is small next to the logits' range


def first_difference(a_states, b_states, tolerance=TOLERANCE):
    """The index of the first pair of hidden states further apart than ``tolerance``, or None."""
    for index, (a, b) in enumerate(zip(a_states, b_states, strict=True)):
        if (a - b).abs().max().item() > tolerance:
            return index
    return None


def llm_layer_outputs(text_model, embeds):
    """Each decoder layer's output for ``embeds`` (forward hooks on ``model.layers``)."""
    outputs, hooks = [], []
    for layer in text_model.model.layers:
        hooks.append(layer.register_forward_hook(lambda module, args, out: outputs.append(
            out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            text_model(inputs_embeds=embeds)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def test_every_layer_is_equal_one_by_one(pair):
    theirs, ours, tokenizer = pair
    _, pixels = _inputs(theirs, tokenizer)
    with torch.no_grad():
        expected = theirs.vision_model(pixels, output_hidden_states=True).hidden_states
        got = ours.vision_model(pixels, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == theirs.vision_model.config.num_hidden_layers + 1
    assert first_difference(expected, got) is None
    embeds = torch.randn(1, 9, theirs.text_model.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    expected, got = llm_layer_outputs(theirs.text_model, embeds), llm_layer_outputs(ours.text_model, embeds)
    assert len(got) == len(expected) == theirs.text_model.config.num_hidden_layers
    assert first_difference(expected, got) is None


def test_attention_weights_and_hidden_states_are_returned_as_transformers_returns_them(pair):
    """``output_attentions`` / ``output_hidden_states`` (what ``llama3vision_min.lens`` reads): our
    weights are written out by hand, transformers' come from its eager attention."""
    from llama3vision_min.lens.attention import eager_attention

    theirs, ours, tokenizer = pair
    ids, pixels = _inputs(theirs, tokenizer)
    batch = theirs.splice(ids, theirs.encode_images(pixels))
    outputs = []
    for model in (theirs, ours):
        with eager_attention(model.text_model), torch.no_grad():
            outputs.append(model.text_model(inputs_embeds=batch.inputs_embeds,
                                            attention_mask=batch.attention_mask,
                                            output_attentions=True, output_hidden_states=True))
    expected, got = outputs
    layers = theirs.text_model.config.num_hidden_layers
    assert len(got.attentions) == len(expected.attentions) == layers
    assert len(got.hidden_states) == len(expected.hidden_states) == layers + 1
    assert first_difference(expected.attentions, got.attentions) is None
    assert first_difference(expected.hidden_states, got.hidden_states) is None
    assert torch.allclose(got.attentions[0].sum(-1), torch.ones(1))  # rows of weights


def test_the_layer_comparison_names_the_first_layer_that_differs(tiny_dir, small_dir):
    theirs, ours, _ = _pair("small", tiny_dir, small_dir)
    with torch.no_grad():
        ours.text_model.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # spoil layer 1 only
    embeds = torch.randn(1, 9, theirs.text_model.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    assert first_difference(llm_layer_outputs(theirs.text_model, embeds),
                            llm_layer_outputs(ours.text_model, embeds)) == 1


def test_greedy_answers_are_identical(pair):
    theirs, ours, tokenizer = pair
    for seed in range(3):
        image = make_image("RGB", (45, 31), seed=seed)
        expected = theirs.answer_question(image, QUESTION, tokenizer, do_sample=False, max_new_tokens=12)
        got = ours.answer_question(image, QUESTION, tokenizer, do_sample=False, max_new_tokens=12)
        assert torch.equal(got, expected), (got.tolist(), expected.tolist())


def test_sampled_answers_are_identical_with_the_same_seed(pair):
    theirs, ours, tokenizer = pair
    image = make_image()
    torch.manual_seed(3)
    expected = theirs.answer_question(image, QUESTION, tokenizer, max_new_tokens=12)
    torch.manual_seed(3)
    assert torch.equal(ours.answer_question(image, QUESTION, tokenizer, max_new_tokens=12), expected)


def test_kv_cache_decoding_equals_decoding_without_it(pair):
    _, ours, tokenizer = pair
    settings = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10, output_scores=True,
                    return_dict_in_generate=True)
    ids, pixels = _inputs(ours, tokenizer, seed=4)
    batch = ours.splice(ids, ours.encode_images(pixels))
    with torch.no_grad():
        cached = ours.text_model.generate(inputs_embeds=batch.inputs_embeds,
                                          attention_mask=batch.attention_mask,
                                          use_cache=True, pad_token_id=0, **settings)
        uncached = ours.text_model.generate(inputs_embeds=batch.inputs_embeds,
                                            attention_mask=batch.attention_mask,
                                            use_cache=False, pad_token_id=0, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    # -inf where a token is barred
    for with_cache, without in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(with_cache, without, rtol=0, atol=TOLERANCE)


def test_batched_answers_equal_one_at_a_time(pair):
    _, ours, tokenizer = pair
    images = [make_image("RGB", (30 + 7 * i, 25), seed=i) for i in range(3)]
    questions = [QUESTION, "how many shapes are there? describe the picture.", "red?"]
    batched = ours.answer_questions(images, questions, tokenizer, do_sample=False, max_new_tokens=8)
    for image, question, row in zip(images, questions, batched):
        assert torch.equal(row, ours.answer_question(image, question, tokenizer, do_sample=False,
                                                     max_new_tokens=8))


@pytest.mark.parametrize("reuse_cache", [False, True], ids=["re-run", "kept-cache"])
def test_chat_with_and_without_the_kept_cache(pair, reuse_cache):
    """Each chat the same on both implementations. (The two kinds of chat agree with each other only where
    decoding and re-tokenizing an answer gives its tokens back: on the miniature, not on random noise.)"""
    theirs, ours, tokenizer = pair
    image = make_image(seed=7)
    questions = [QUESTION, "what colour is the shape?", "how many shapes are there?"]
    answers = []
    for model in (theirs, ours):
        chat = model.chat(image, tokenizer, reuse_cache=reuse_cache, do_sample=False, max_new_tokens=6)
        answers.append([chat.ask(question) for question in questions])
    assert answers[0] == answers[1]


def test_streaming(tiny_dir, small_dir):
    _, ours, tokenizer = _pair("tiny", tiny_dir, small_dir)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(target=lambda: result.update(ids=ours.answer_question(
        make_image(), QUESTION, tokenizer, do_sample=False, max_new_tokens=8, streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tokenizer.decode(result["ids"], skip_special_tokens=True)


def test_the_loss_is_equal(pair):
    theirs, ours, tokenizer = pair
    ids, pixels = _inputs(theirs, tokenizer)
    answer = torch.tensor([tokenizer("a red circle").input_ids[1:]])
    ids = torch.cat([ids, answer], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -answer.shape[1]:] = answer
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels, labels=labels).loss
        got = ours(input_ids=ids, pixel_values=pixels, labels=labels).loss
    assert abs(got.item() - expected.item()) <= TOLERANCE


def test_the_export_of_a_scratch_model(pair):
    from llama3vision_min.tools.llava_export import llava_processor, to_llava

    _, ours, tokenizer = pair
    llava, processor = to_llava(ours, tokenizer), llava_processor(ours, tokenizer)
    image = make_image()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    ids, pixels = _inputs(ours, tokenizer)
    pixels = ours.preprocess([image])
    with torch.no_grad():
        difference = (llava(**inputs).logits
                      - ours(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
    assert difference <= TOLERANCE


# -- negative controls: a wrong step would be seen -----------------------------------------------
def test_exact_gelu_in_the_vision_mlp_breaks_parity(tiny_dir, small_dir):
    theirs, ours, tokenizer = _pair("small", tiny_dir, small_dir)
    for layer in ours.vision_model.encoder.layers:
        layer.mlp.approximate = "none"  # SigLIP was trained with the tanh approximation
    ids, pixels = _inputs(theirs, tokenizer)
    with torch.no_grad():
        states = [m.vision_model(pixels, output_hidden_states=True).hidden_states for m in (theirs, ours)]
        logits = [m(input_ids=ids, pixel_values=pixels).logits for m in (theirs, ours)]
    assert first_difference(*states) == 1  # the first encoder layer's output already differs
    assert (logits[0] - logits[1]).abs().max().item() > 100 * TOLERANCE


def test_rope_theta_10000_breaks_parity(tiny_dir, small_dir):
    theirs, ours, tokenizer = _pair("small", tiny_dir, small_dir)
    config = ours.text_model.config
    llama_2_like = types.SimpleNamespace(rope_theta=10000.0, hidden_size=config.hidden_size,
                                         num_attention_heads=config.num_attention_heads)  # the same sizes
    ours.text_model.model.inv_freq = rope_frequencies(llama_2_like)
    assert not torch.allclose(ours.text_model.model.inv_freq, rope_frequencies(theirs.text_model.config))
    ids, pixels = _inputs(theirs, tokenizer)
    with torch.no_grad():
        difference = (theirs(input_ids=ids, pixel_values=pixels).logits
                      - ours(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
    assert difference > 100 * TOLERANCE


def test_llama_3_1_rope_scaling():
    """Llama 3.1's ``rope_scaling`` (type llama3): the frequencies and the logits at long positions agree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, small = make_configs("small", vocab_size=409)
    config = LlamaConfig(**{**small.to_dict(), "rope_scaling": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    ours = llm_from_transformers(hf)
    assert not torch.allclose(ours.model.inv_freq, 1.0 / 500000 ** (torch.arange(0, 16, 2) / 16))  # scaled
    ids = torch.randint(0, config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item() <= TOLERANCE


# -- loading: every entry point takes the argument -------------------------------------------------
def test_an_unknown_implementation_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="implementation must be one of"):
        LlamaVision.from_pretrained(tiny_dir, implementation="jax")


def test_alpha_form_scratch_equals_transformers(fake_hub):
    from llama3vision_min.tools.backend import REAL_LLM, REAL_PROJECTOR, REAL_VISION

    theirs = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, dtype=torch.float32)
    ours = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, dtype=torch.float32,
                                  implementation="scratch")
    tokenizer = load_tokenizer(REAL_LLM)
    ids, pixels = _inputs(theirs, tokenizer)
    with torch.no_grad():
        assert (theirs(input_ids=ids, pixel_values=pixels).logits
                - ours(input_ids=ids, pixel_values=pixels).logits).abs().max().item() <= TOLERANCE


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install 'llama3vision-min[quant]')")
def test_the_scratch_forward_runs_over_4bit_projections(fake_hub):
    """On a T4 the real model fits only in 4-bit: the scratch LLM takes bitsandbytes' Linear4bit modules
    as its projections and computes what transformers' 4-bit model computes."""
    from llama3vision_min.tools.backend import REAL_LLM, REAL_PROJECTOR, REAL_VISION

    theirs = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, load_in_4bit=True,
                                    dtype=torch.float32)
    ours = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, load_in_4bit=True,
                                  dtype=torch.float32, implementation="scratch")
    assert type(ours.text_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    tokenizer = load_tokenizer(REAL_LLM)
    ids, pixels = _inputs(theirs, tokenizer)
    with torch.no_grad():
        assert (theirs(input_ids=ids, pixel_values=pixels).logits
                - ours(input_ids=ids, pixel_values=pixels).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_real_geometry(tmp_path):
    """SigLIP so400m's geometry with 2 layers, Llama 3 at 4096 wide with 2 layers (GQA 32/8), random
    float32 weights: logits within 1e-5, every layer of both towers compared."""
    geometry = dataclasses.replace(SIZES["real"], vision_layers=2, text_layers=2, vocab_size=None)
    vision, text, projector, tokenizer = random_parts(geometry, seed=0, dtype=torch.float32)
    theirs = LlamaVision(vision_model=vision, text_model=text, mm_projector=projector).eval()
    ours = LlamaVision(vision_model=vision_from_transformers(vision), text_model=llm_from_transformers(text),
                       mm_projector=projector).eval()
    ids, pixels = _inputs(theirs, tokenizer)
    with torch.no_grad():
        states = [m.vision_model(pixels, output_hidden_states=True).hidden_states for m in (theirs, ours)]
        logits = [m(input_ids=ids, pixel_values=pixels).logits for m in (theirs, ours)]
    assert states[0][-2].shape == (1, 729, 1152) and first_difference(*states) is None
    embeds = torch.randn(1, 9, 4096, generator=torch.Generator().manual_seed(0))
    layers = [llm_layer_outputs(m.text_model, embeds) for m in (theirs, ours)]
    assert len(layers[1]) == 2 and first_difference(*layers) is None
    difference = (logits[0] - logits[1]).abs().max().item()
    print(f"\n[scratch parity, real geometry] max |logit difference| = {difference:.2e}")
    assert logits[0].shape[1] == ids.shape[1] - 1 + 729 and difference <= TOLERANCE
