"""``tokenizer_image_token`` and ``build_prompt`` against the reference facts (steps 1 and 2).

The expected ids are rebuilt here from the tokenizer itself, chunk by chunk, without the
package's code: split the text on ``<image>``, tokenize each chunk alone, keep the first
chunk whole and drop the BOS of every later one, with -200 between chunks.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3vision_min import build_prompt, tokenizer_image_token
from llama3vision_min.miniature.stand_ins import tiny_tokenizer

SENTINEL = -200
HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_PROMPT = (
    "<|start_header_id|>user<|end_header_id|>\n\n<image>{q}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

PROMPTS = [
    "what is this?",  # no image
    "",  # empty prompt
    "<image>",  # only an image
    "<image>what is this?",  # image first
    "what is this?<image>",  # image last
    "a red circle<image> and <image>a blue square",  # two images
    "<image><image>",  # two images side by side
    "one<image>two<image>three<image>four",  # three images
    LLAMA3_PROMPT.format(q="what is this?"),
    LLAMA3_PROMPT.format(q="Please describe this image in detail."),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def expected_ids(prompt, tokenizer):
    """Independent construction: chunk ids with the BOS of later chunks dropped, -200 between."""
    chunks = prompt.split("<image>")
    out = list(tokenizer(chunks[0]).input_ids)
    for chunk in chunks[1:]:
        ids = list(tokenizer(chunk).input_ids)
        assert ids[0] == tokenizer.bos_token_id  # the tiny tokenizer adds BOS, as Llama 3's does
        out += [SENTINEL] + ids[1:]
    return out


def split_at_sentinels(ids):
    chunks, current = [], []
    for token in ids:
        if token == SENTINEL:
            chunks.append(current)
            current = []
        else:
            current.append(token)
    chunks.append(current)
    return chunks


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_1d_long_tensor_with_exactly_one_bos_at_position_zero(prompt, tok):
    ids = tokenizer_image_token(prompt, tok)
    assert ids.dim() == 1 and ids.dtype == torch.long
    ids = ids.tolist()
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_one_sentinel_per_image_placeholder(prompt, tok):
    ids = tokenizer_image_token(prompt, tok).tolist()
    assert ids.count(SENTINEL) == prompt.count("<image>")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chunks_between_sentinels_are_each_chunk_tokenized_alone(prompt, tok):
    ids = tokenizer_image_token(prompt, tok).tolist()
    text_chunks = prompt.split("<image>")
    id_chunks = split_at_sentinels(ids)
    assert len(id_chunks) == len(text_chunks)
    assert id_chunks[0] == tok(text_chunks[0]).input_ids  # first chunk whole, BOS included
    for text, got in zip(text_chunks[1:], id_chunks[1:]):
        assert got == tok(text).input_ids[1:]  # later chunks: their BOS dropped
    assert ids == expected_ids(prompt, tok)


def test_no_image_equals_plain_tokenization(tok):
    prompt = "what colour is the shape? red."
    ids = tokenizer_image_token(prompt, tok)
    assert ids.tolist() == tok(prompt).input_ids
    assert SENTINEL not in ids.tolist()


def test_custom_image_token_index(tok):
    ids = tokenizer_image_token("a<image>b<image>c", tok, image_token_index=-7).tolist()
    assert ids.count(-7) == 2 and SENTINEL not in ids
    assert [SENTINEL if t == -7 else t for t in ids] == expected_ids("a<image>b<image>c", tok)


def test_return_tensors_pt_is_accepted_and_equal_to_default(tok):
    prompt = LLAMA3_PROMPT.format(q="what is this?")
    pt = tokenizer_image_token(prompt, tok, return_tensors="pt")
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.long and pt.dim() == 1
    assert torch.equal(pt, tokenizer_image_token(prompt, tok))


def test_llama3_prompt_sentinel_lands_right_after_the_header_newlines(tok):
    prompt = LLAMA3_PROMPT.format(q="what is this?")
    ids = tokenizer_image_token(prompt, tok).tolist()
    position = ids.index(SENTINEL)
    before = ids[:position]
    # Everything before the sentinel is BOS + the user header, ending with the "\n\n" after <|end_header_id|>.
    assert before == tok(HEADER).input_ids
    assert tok.decode(before) == "<|begin_of_text|>" + HEADER
    end_header = tok.convert_tokens_to_ids("<|end_header_id|>")
    newline_part = before[before.index(end_header) + 1:]
    assert tok.decode(newline_part) == "\n\n"
    assert before[-len(newline_part):] == newline_part  # the "\n\n" token(s) come last, right before -200
    # ... and the question starts right after the sentinel, with no BOS in between.
    after = ids[position + 1:]
    assert after[0] != tok.bos_token_id
    assert tok.decode(after).startswith("what is this?<|eot_id|>")


def test_chunkwise_split_can_differ_from_whole_prompt_tokenization(tok):
    # "what" is one learned token of the tiny BPE; split by <image> it cannot merge across the split.
    assert tok("what").input_ids[1:] == [tok.convert_tokens_to_ids("what")]
    prompt = "wh<image>at"
    chunked = [t for t in tokenizer_image_token(prompt, tok).tolist() if t != SENTINEL]
    whole = tok(prompt.replace("<image>", "")).input_ids
    assert chunked != whole
    assert len(chunked) > len(whole)
    assert chunked == tok("wh").input_ids + tok("at").input_ids[1:]
    # The decoded text is still the same: only the segmentation differs.
    assert tok.decode(chunked) == tok.decode(whole)


def test_tokenizer_without_bos_keeps_every_chunk_whole():
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok("what").input_ids[0] != tok.bos_token_id  # this tokenizer adds no BOS
    ids = tokenizer_image_token("what<image>is this", tok).tolist()
    assert ids == tok("what").input_ids + [SENTINEL] + tok("is this").input_ids


_WORDS = ["what", " is", " this", "?", " a", " red", " circle", ".", "\n\n", " ", "<|eot_id|>", "x", "Hello!"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_WORDS), st.just("<image>")), max_size=12))
def test_property_matches_independent_chunkwise_construction(tok, pieces):
    prompt = "".join(pieces)
    ids = tokenizer_image_token(prompt, tok).tolist()
    assert ids == expected_ids(prompt, tok)
    assert ids.count(SENTINEL) == prompt.count("<image>")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# -- the prompt --------------------------------------------------------------------------------
@pytest.mark.parametrize("question", ["what is this?", "Describe the picture.", "", "two\nlines"])
def test_build_prompt_is_exactly_the_llama3_format(question):
    assert build_prompt(question) == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>" + question
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("question", ["what is this?", "How many shapes are there?",
                                      "Please describe this image in detail."])
def test_build_prompt_matches_the_tokenizers_chat_template(tok, question):
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith(tok.bos_token)
    assert rendered == tok.bos_token + build_prompt(question).replace("<image>", "")
    # Same ids too: the template's text (BOS written out) tokenizes to BOS + the prompt's ids.
    template_ids = tok(rendered, add_special_tokens=False).input_ids
    assert template_ids == tokenizer_image_token(build_prompt(question).replace("<image>", ""), tok).tolist()
