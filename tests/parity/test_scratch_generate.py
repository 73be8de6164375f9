"""The from-scratch towers' own decoding loop (``scratch/generate.py``) against transformers' ``generate``
driving the very same towers: the same ids.

Both run on one model loaded with ``implementation="scratch"``: ours through the public
``answer_question(s)`` and ``chat`` (which use the loop for those towers), theirs by handing the same
spliced prompt and the same keywords to ``text_model.generate``. Greedy on every held-out miniature
picture x question, at the tiny and medium random sizes with left-padded batches, in 4-bit; sampled with
the same seed under every warper setting the original's defaults need; the streamer's calls; the keywords
the loop does not take (they go to ``generate``).
"""

import importlib.util

import pytest
import torch

from llama3vision_min import LlamaVision, load_mini
from llama3vision_min.generation import cut_at_stop, generation_kwargs
from llama3vision_min.miniature.stand_ins import random_parts
from llama3vision_min.miniature.world import HELD_OUT_START, QUESTIONS, render, scene
from llama3vision_min.scratch.generate import KVCache
from llama3vision_min.scratch.llama import LlamaLM
from llama3vision_min.scratch.weights import take_over

from conftest import make_image

QUESTIONS_OF_SEVERAL_LENGTHS = ["what is this?", "how many shapes are there? describe the picture.", "red?",
                                "what colour is the shape?"]


def theirs(model, tokenizer, images, questions, **overrides):
    """transformers' ``generate`` on the same spliced prompts, cut as ``answer_questions`` cuts."""
    kwargs = generation_kwargs(tokenizer, overrides)
    _, batch = model.prepare([[(question, None)] for question in questions], images, tokenizer)
    with torch.inference_mode():
        new = model.text_model.generate(inputs_embeds=batch.inputs_embeds,
                                        attention_mask=batch.attention_mask, **kwargs)
    return [cut_at_stop(row, kwargs["eos_token_id"]) for row in new]


def same(ours, expected):
    assert len(ours) == len(expected)
    for got, want in zip(ours, expected):
        assert torch.equal(got, want), (got.tolist(), want.tolist())


@pytest.fixture(scope="module")
def mini():
    model, tokenizer = load_mini(implementation="scratch")
    assert isinstance(model.text_model, LlamaLM)
    return model, tokenizer


def _random(size):
    vision_model, text_model, projector, tokenizer = random_parts(size, seed=1, dtype=torch.float32)
    return take_over(LlamaVision(vision_model, text_model, projector).eval(), "scratch"), tokenizer


@pytest.fixture(scope="module", params=["tiny", "medium"])
def random_model(request):
    return _random(request.param)


@pytest.fixture(scope="module")
def tiny_model():
    return _random("tiny")


def test_greedy_ids_equal_generates_on_every_held_out_miniature_picture_and_question(mini):
    """The model card's 500 held-out pictures x 4 questions, in batches of 125, as its evaluation asks."""
    model, tokenizer = mini
    images = [render(scene(seed)) for seed in range(HELD_OUT_START, HELD_OUT_START + 500)]
    compared = 0
    for question in QUESTIONS.values():
        for start in range(0, 500, 125):
            chunk = images[start: start + 125]
            ours = model.answer_questions(chunk, [question] * len(chunk), tokenizer, do_sample=False,
                                          max_new_tokens=8)
            same(ours, theirs(model, tokenizer, chunk, [question] * len(chunk), do_sample=False,
                              max_new_tokens=8))
            compared += len(chunk)
    assert compared == 2000


@pytest.mark.parametrize("settings", [dict(max_new_tokens=12), dict(max_new_tokens=10, min_new_tokens=10)],
                         ids=["until-a-stop", "min-new-tokens"])
def test_greedy_left_padded_batches_equal_generate(random_model, settings):
    model, tokenizer = random_model
    images = [make_image("RGB", (30 + 9 * i, 25 + 4 * i), seed=i) for i in range(4)]
    questions = QUESTIONS_OF_SEVERAL_LENGTHS
    ours = model.answer_questions(images, questions, tokenizer, do_sample=False, **settings)
    same(ours, theirs(model, tokenizer, images, questions, do_sample=False, **settings))
    alone = model.answer_question(images[1], QUESTIONS_OF_SEVERAL_LENGTHS[1], tokenizer, do_sample=False,
                                  **settings)
    same([alone], theirs(model, tokenizer, images[1:2], QUESTIONS_OF_SEVERAL_LENGTHS[1:2], do_sample=False,
                         **settings))


@pytest.mark.parametrize("settings", [
    {},  # the original's: temperature 0.2, and generate's top-k 50
    dict(temperature=1.0),
    dict(temperature=1.5, top_k=5),
    dict(temperature=1.0, top_p=0.9, top_k=0),
    dict(temperature=0.7, top_p=0.5, min_new_tokens=6),
], ids=["original", "t1", "t1.5-k5", "p0.9", "t0.7-p0.5-min6"])
def test_seeded_sampling_draws_what_generate_draws(tiny_model, settings):
    model, tokenizer = tiny_model
    images = [make_image("RGB", (40, 30 + 5 * i), seed=10 + i) for i in range(3)]
    questions = QUESTIONS_OF_SEVERAL_LENGTHS[:3]
    torch.manual_seed(7)
    ours = model.answer_questions(images, questions, tokenizer, max_new_tokens=12, **settings)
    torch.manual_seed(7)
    same(ours, theirs(model, tokenizer, images, questions, max_new_tokens=12, **settings))
    if settings.get("temperature", 0) >= 1.0:  # negative control: another seed, other draws
        torch.manual_seed(8)
        other = model.answer_questions(images, questions, tokenizer, max_new_tokens=12, **settings)
        assert any(not torch.equal(a, b) for a, b in zip(ours, other))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_in_4bit_too(fake_hub):
    from llama3vision_min.loading import load_tokenizer

    llm, vision = "unsloth/llama-3-8b-Instruct", "google/siglip-so400m-patch14-384"
    model = LlamaVision.from_alpha(llm, vision, "qresearch/llama-3-vision-alpha", load_in_4bit=True,
                                   implementation="scratch", dtype=torch.float32)
    tokenizer = load_tokenizer(llm)
    assert isinstance(model.text_model, LlamaLM)
    assert "Linear4bit" in type(model.text_model.model.layers[0].self_attn.q_proj).__name__
    images = [make_image("RGB", (33, 21 + 6 * i), seed=i) for i in range(2)]
    ours = model.answer_questions(images, QUESTIONS_OF_SEVERAL_LENGTHS[:2], tokenizer, do_sample=False,
                                  max_new_tokens=8)
    same(ours, theirs(model, tokenizer, images, QUESTIONS_OF_SEVERAL_LENGTHS[:2], do_sample=False,
                      max_new_tokens=8))


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.tolist()))

    def end(self):
        self.calls.append(("end",))


def test_the_streamer_is_called_as_generate_calls_it(mini):
    model, tokenizer = mini
    image = render(scene(HELD_OUT_START))
    ours, expected = Recorder(), Recorder()
    ids = model.answer_question(image, "what is this?", tokenizer, do_sample=False, streamer=ours)
    theirs(model, tokenizer, [image], ["what is this?"], do_sample=False, streamer=expected)
    assert ours.calls == expected.calls and len(ours.calls) == len(ids) + 2  # the prompt, each id, the end


def test_a_chat_keeps_its_cache_growing_turn_after_turn(mini):
    """The loop's cache is allocated for turn 1 (prompt + 8 tokens); later turns grow it, and the answers
    are those of a chat on transformers' generate, which re-feeds nothing either."""
    model, tokenizer = mini
    image = render(scene(HELD_OUT_START + 1))
    ours = model.chat(image, tokenizer, reuse_cache=True, do_sample=False, max_new_tokens=8)
    answers = [ours.ask(question) for question in QUESTIONS.values()]
    assert isinstance(ours.cache, KVCache) and ours.cache.length == len(ours.sequence) - 1
    reference = model.chat(image, tokenizer, reuse_cache=True, do_sample=False, max_new_tokens=8,
                           repetition_penalty=1.0)  # a keyword the loop does not take: generate runs
    assert [reference.ask(question) for question in QUESTIONS.values()] == answers
    assert not isinstance(reference.cache, KVCache)
    with pytest.raises(ValueError, match="this chat runs the from-scratch loop, which takes only"):
        ours.ask("what is this?", repetition_penalty=1.2)


def test_keywords_the_loop_does_not_take_go_to_generate(random_model):
    model, tokenizer = random_model
    images = [make_image(seed=3)]
    ours = model.answer_questions(images, ["what is this?"], tokenizer, do_sample=False, max_new_tokens=10,
                                  repetition_penalty=1.5)
    same(ours, theirs(model, tokenizer, images, ["what is this?"], do_sample=False, max_new_tokens=10,
                      repetition_penalty=1.5))


def test_the_kv_cache_grows_and_keeps_what_it_held():
    from llama3vision_min.miniature.stand_ins import make_configs

    _, config = make_configs("tiny", vocab_size=400)
    cache = KVCache(config, batch=1, capacity=3, dtype=torch.float32, device="cpu")
    shape = (1, config.num_key_value_heads, 2, config.hidden_size // config.num_attention_heads)
    first = [(torch.randn(shape), torch.randn(shape)) for _ in range(config.num_hidden_layers)]
    for layer, (k, v) in enumerate(first):
        cache.update(k, v, layer)
    assert cache.length == 2
    for layer, (k, v) in enumerate(first):  # two more: past the capacity of 3
        keys, values = cache.update(k + 1, v + 1, layer)
        assert torch.equal(keys, torch.cat([k, k + 1], 2)) and torch.equal(values, torch.cat([v, v + 1], 2))
    assert cache.length == 4 and cache.keys[0].shape[2] == 6


def test_an_answer_longer_than_the_first_allocation_grows_the_cache(tiny_model):
    """The cache starts with room for 128 new tokens (2000 is the default limit: allocating for all of it
    would hold 360 MB per picture at Llama-3-8B's size); 200 forced tokens grow it mid-answer."""
    model, tokenizer = tiny_model
    images, settings = [make_image(seed=5)], dict(do_sample=False, max_new_tokens=200, min_new_tokens=200)
    ours = model.answer_questions(images, ["what is this?"], tokenizer, **settings)
    assert len(ours[0]) == 200
    same(ours, theirs(model, tokenizer, images, ["what is this?"], **settings))
