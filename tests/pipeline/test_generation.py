"""Generation (step 6): ``answer_question``, ``answer_questions`` and ``chat``.

``text_model.generate`` is wrapped (and the wrapper removed afterwards) to see what the
model passes to it; greedy results are compared with a greedy loop written here.
"""

import threading
from contextlib import contextmanager

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from llama3vision_min import build_prompt, splice_batch, tokenizer_image_token
from llama3vision_min.constants import EOT_TOKEN
from llama3vision_min.prompt import ASSISTANT_HEADER, USER_HEADER
from llama3vision_min.token_split import continuation_ids
from llama3vision_min.tools.llava_export import n_patches

from conftest import make_image

SENTINEL = -200
HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def eot_id(tok):
    return tok.convert_tokens_to_ids("<|eot_id|>")


@contextmanager
def wrapped_generate(model, replacement=None):
    """Record the kwargs (and outputs) of every ``model.text_model.generate`` call, then restore it."""
    text_model = model.text_model
    assert "generate" not in vars(text_model)
    original = text_model.generate
    calls = []

    def generate(*args, **kwargs):
        call = {"args": args, "kwargs": kwargs}
        calls.append(call)
        call["output"] = (replacement or original)(*args, **kwargs)
        return call["output"]

    text_model.generate = generate
    try:
        yield calls
    finally:
        del text_model.generate
    assert "generate" not in vars(text_model)


def own_prompt_ids(tok, chunks):
    """Chunk-wise tokenization by hand: first chunk with BOS, later chunks without, -200 between."""
    ids = tok(chunks[0]).input_ids
    for chunk in chunks[1:]:
        ids = ids + [SENTINEL] + tok(chunk, add_special_tokens=False).input_ids
    return ids


def own_embeds(model, image, ids):
    """Pixel values -> SigLIP hidden_states[-2] -> projector -> spliced embeddings (1, T, H)."""
    with torch.no_grad():
        pixel_values = model.preprocess([image])
        hidden = model.vision_model(pixel_values, output_hidden_states=True).hidden_states[-2]
        features = model.mm_projector(hidden)[0]
        weight = model.text_model.get_input_embeddings().weight
        rows = []
        for token in ids:
            if token == SENTINEL:
                rows.extend(features)
            else:
                rows.append(weight[token])
        return torch.stack(rows)[None], features


def greedy_loop(model, embeds, n_tokens, stops):
    """Greedy decoding without cache: argmax of the last position, append its embedding."""
    weight = model.text_model.get_input_embeddings().weight
    out = []
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model.text_model(inputs_embeds=embeds).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            if token in stops:
                break
            embeds = torch.cat([embeds, weight[token][None, None]], dim=1)
    return out


def tokenizer_snapshot(tok):
    return {
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "special_tokens_map": dict(tok.special_tokens_map),
        "all_special_tokens": list(tok.all_special_tokens),
        "all_special_ids": list(tok.all_special_ids),
        "len": len(tok),
        "vocab_size": tok.vocab_size,
        "vocab": dict(tok.get_vocab()),
        "chat_template": tok.chat_template,
    }


class ForceEotAfter(LogitsProcessor):
    """Forbid ``forbid`` for the first ``n`` steps, then allow only ``eot``."""

    def __init__(self, n, eot, forbid):
        self.n, self.eot, self.forbid, self.calls = n, eot, list(forbid), 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        scores = scores.clone()
        if self.calls > self.n:
            keep = scores[:, self.eot].clone()
            scores[:] = -float("inf")
            scores[:, self.eot] = keep
        else:
            scores[:, self.forbid] = -float("inf")
        return scores


# -- answer_question: what it passes to generate ----------------------------------------------------
def test_answer_question_returns_1d_ids(tiny):
    model, tok = tiny
    ids = model.answer_question(make_image(), "what is this?", tok, do_sample=False, max_new_tokens=5)
    assert isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.dtype == torch.long
    assert 1 <= len(ids) <= 5
    assert all(0 <= t < len(tok) for t in ids.tolist())
    assert isinstance(tok.decode(ids, skip_special_tokens=True), str)


def test_defaults_sample_at_temperature_0_2_and_stop_on_eos_and_eot(tiny):
    model, tok = tiny
    fake = lambda *args, **kwargs: torch.tensor([[eot_id(tok)]])  # noqa: E731
    with wrapped_generate(model, fake) as calls:
        ids = model.answer_question(make_image(), "what is this?", tok)
    assert ids.tolist() == [eot_id(tok)]
    assert len(calls) == 1
    kwargs = calls[0]["kwargs"]
    assert kwargs["do_sample"] is True
    assert kwargs["temperature"] == pytest.approx(0.2)
    stops = kwargs["eos_token_id"]
    stops = [stops] if isinstance(stops, int) else list(stops)
    assert tok.eos_token_id in stops and eot_id(tok) in stops
    assert eot_id(tok) != tok.eos_token_id
    # No pad token in the tokenizer: the eos id is used as pad id, as the original scripts do.
    assert tok.pad_token_id is None and kwargs["pad_token_id"] == tok.eos_token_id
    # The prompt goes in as embeddings only, with an all-ones mask of the same length.
    assert "input_ids" not in kwargs and not calls[0]["args"]
    embeds, mask = kwargs["inputs_embeds"], kwargs["attention_mask"]
    assert embeds.dim() == 3 and embeds.shape[0] == 1
    assert mask.shape == embeds.shape[:2] and bool((mask == 1).all())


def test_inputs_embeds_equal_hand_built_prompt_and_image(tiny):
    model, tok = tiny
    image = make_image("RGBA", (40, 30), seed=4)
    with wrapped_generate(model, lambda *a, **k: torch.tensor([[eot_id(tok)]])) as calls:
        model.answer_question(image, "what colour is the shape?", tok)
    ids = own_prompt_ids(tok, [HEADER, "what colour is the shape?<|eot_id|>" + ASSISTANT])
    want, _ = own_embeds(model, image, ids)
    torch.testing.assert_close(calls[0]["kwargs"]["inputs_embeds"], want, rtol=1e-6, atol=1e-6)


def test_caller_overrides_win(tiny):
    model, tok = tiny
    with wrapped_generate(model, lambda *a, **k: torch.tensor([[5, 6]])) as calls:
        model.answer_question(make_image(), "what?", tok, temperature=0.7, top_p=0.5, eos_token_id=[5],
                              max_new_tokens=3, pad_token_id=7)
        model.answer_question(make_image(), "what?", tok, do_sample=False, max_new_tokens=2)
    first, second = calls[0]["kwargs"], calls[1]["kwargs"]
    assert first["temperature"] == 0.7 and first["top_p"] == 0.5 and first["do_sample"] is True
    assert first["eos_token_id"] == [5] and first["max_new_tokens"] == 3 and first["pad_token_id"] == 7
    assert second["do_sample"] is False and second["max_new_tokens"] == 2


def test_greedy_override_equals_hand_written_argmax_loop(both_sizes):
    model, tok = both_sizes
    image = make_image("L", (29, 41), seed=2)
    question = "how many shapes are there?"
    n = 6
    got = model.answer_question(image, question, tok, do_sample=False, max_new_tokens=n)
    embeds, _ = own_embeds(model, image, own_prompt_ids(tok, [HEADER, question + "<|eot_id|>" + ASSISTANT]))
    want = greedy_loop(model, embeds, n, stops={tok.eos_token_id, eot_id(tok)})
    assert got.tolist() == want


def test_sampling_default_depends_on_the_seed_only(tiny):
    """The default samples: the same seed gives the same ids; generation actually runs."""
    model, tok = tiny
    image = make_image(seed=6)
    torch.manual_seed(0)
    a = model.answer_question(image, "describe the picture.", tok, max_new_tokens=4)
    torch.manual_seed(0)
    b = model.answer_question(image, "describe the picture.", tok, max_new_tokens=4)
    assert a.tolist() == b.tolist() and 1 <= len(a) <= 4


def test_tokenizer_is_not_mutated(tiny):
    model, tok = tiny
    before = tokenizer_snapshot(tok)
    model.answer_question(make_image(), "what is this?", tok, max_new_tokens=3)
    model.answer_question(make_image(), "what is this?", tok, do_sample=False, max_new_tokens=3)
    model.answer_questions([make_image(), make_image(seed=1)], ["a?", "b?"], tok, do_sample=False,
                           max_new_tokens=2)
    model.chat(make_image(), tok, do_sample=False, max_new_tokens=2).ask("what?")
    assert tokenizer_snapshot(tok) == before
    assert tok.eos_token == "<|end_of_text|>"


# -- stopping -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 2, 5])
def test_generation_stops_at_eot(tiny, n):
    model, tok = tiny
    eot = eot_id(tok)
    force = ForceEotAfter(n, eot, forbid=[eot, tok.eos_token_id])
    ids = model.answer_question(make_image(), "what is this?", tok, do_sample=False, max_new_tokens=20,
                                logits_processor=LogitsProcessorList([force]))
    assert len(ids) == n + 1
    assert ids[-1].item() == eot
    assert eot not in ids[:-1].tolist()


def test_without_eot_as_stop_generation_runs_on(tiny):
    """Contrast: with only <|end_of_text|> as end token, an emitted <|eot_id|> does not stop it."""
    model, tok = tiny
    eot = eot_id(tok)
    force = ForceEotAfter(2, eot, forbid=[eot, tok.eos_token_id])
    ids = model.answer_question(make_image(), "what is this?", tok, do_sample=False, max_new_tokens=6,
                                eos_token_id=[tok.eos_token_id],
                                logits_processor=LogitsProcessorList([force]))
    assert len(ids) == 6 and ids[2:].tolist() == [eot] * 4


# -- streaming ----------------------------------------------------------------------------------
def test_text_iterator_streamer_yields_the_decoded_answer(tiny):
    model, tok = tiny
    eot = eot_id(tok)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}
    force = ForceEotAfter(8, eot, forbid=[eot, tok.eos_token_id])

    def run():
        result["ids"] = model.answer_question(make_image(seed=3), "describe the picture.", tok,
                                              do_sample=False, max_new_tokens=12, streamer=streamer,
                                              logits_processor=LogitsProcessorList([force]))

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join(timeout=60)
    assert not thread.is_alive()
    text = "".join(pieces)
    assert len(result["ids"]) == 9
    assert text == tok.decode(result["ids"], skip_special_tokens=True)
    assert text  # eight real tokens were generated before <|eot_id|>


# -- batches --------------------------------------------------------------------------------------
def test_answer_questions_equals_sequential_greedy_calls(tiny):
    model, tok = tiny
    images = [make_image("RGB", (37, 23), seed=0), make_image("L", (20, 50), seed=1),
              make_image("P", (64, 64), seed=2)]
    questions = ["what is this?", "how many shapes are there? describe the picture.", "red?"]
    kwargs = {"do_sample": False, "max_new_tokens": 6}
    batched = model.answer_questions(images, questions, tok, **kwargs)
    sequential = [model.answer_question(i, q, tok, **kwargs) for i, q in zip(images, questions)]
    assert len(batched) == 3
    for got, want in zip(batched, sequential):
        assert got.dim() == 1
        assert got.tolist() == want.tolist()


class ForceEotPerRow(LogitsProcessor):
    """Row ``b`` may not stop for ``steps[b]`` steps, then may only emit ``<|eot_id|>``."""

    def __init__(self, steps, eot, forbid):
        self.steps, self.eot, self.forbid, self.calls = list(steps), eot, list(forbid), 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        scores = scores.clone()
        for b, n in enumerate(self.steps):
            if self.calls > n:
                keep = scores[b, self.eot].clone()
                scores[b] = -float("inf")
                scores[b, self.eot] = keep
            else:
                scores[b, self.forbid] = -float("inf")
        return scores


def test_answer_questions_rows_end_at_their_own_stop(tiny):
    """Rows that stop early come back without the batch's trailing padding, as the single calls do."""
    model, tok = tiny
    eot = eot_id(tok)
    steps = [1, 5, 3]
    images = [make_image(seed=10 + i) for i in range(3)]
    questions = ["what is this?", "describe the picture.", "how many shapes are there?"]
    forbid = [eot, tok.eos_token_id]
    batched = model.answer_questions(
        images, questions, tok, do_sample=False, max_new_tokens=10,
        logits_processor=LogitsProcessorList([ForceEotPerRow(steps, eot, forbid)]))
    for b, n in enumerate(steps):
        single = model.answer_question(
            images[b], questions[b], tok, do_sample=False, max_new_tokens=10,
            logits_processor=LogitsProcessorList([ForceEotPerRow([n], eot, forbid)]))
        assert len(single) == n + 1 and single[-1].item() == eot
        assert batched[b].tolist() == single.tolist()


# -- chat -----------------------------------------------------------------------------------------
def test_chat_keeps_image_and_history_on_every_turn(tiny):
    model, tok = tiny
    image = make_image("RGB", (33, 27), seed=8)
    session = model.chat(image, tok, do_sample=False, max_new_tokens=4)
    q1, q2, q3 = "what is this?", "what colour is the shape?", "how many?"
    with wrapped_generate(model) as calls:
        a1 = session.ask(q1)
        a2 = session.ask(q2)
        a3 = session.ask(q3, max_new_tokens=2)  # per-turn override
    assert all(isinstance(a, str) for a in (a1, a2, a3))
    assert session.history == [(q1, a1), (q2, a2), (q3, a3)]
    assert len(calls) == 3
    assert calls[2]["kwargs"]["max_new_tokens"] == 2 and calls[1]["kwargs"]["max_new_tokens"] == 4
    for call, answer in zip(calls, (a1, a2, a3)):
        assert tok.decode(call["output"][0], skip_special_tokens=True) == answer

    # Turn 2: image in the first user turn, then q1, a1, then q2 -- built by hand.
    turn2 = [HEADER,
             q1 + "<|eot_id|>" + ASSISTANT + a1 + "<|eot_id|>" + HEADER + q2 + "<|eot_id|>" + ASSISTANT]
    want, features = own_embeds(model, image, own_prompt_ids(tok, turn2))
    got = calls[1]["kwargs"]["inputs_embeds"]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The projected image features sit right after BOS + the first user header, in every turn.
    start = len(tok(HEADER).input_ids)
    for call in calls:
        embeds = call["kwargs"]["inputs_embeds"][0]
        torch.testing.assert_close(embeds[start:start + len(features)], features, rtol=1e-6, atol=1e-6)
    lengths = [call["kwargs"]["inputs_embeds"].shape[1] for call in calls]
    assert lengths[0] < lengths[1] < lengths[2]


def test_batched_rows_are_cut_at_the_callers_stop_ids_not_the_tokenizers(tiny):
    """With an ``eos_token_id`` override, a batched row ends where the single call ends."""
    model, tok = tiny

    class EmitStopAt(LogitsProcessor):
        """Row b emits id 5 at step ``steps[b]`` and id 7 otherwise."""

        def __init__(self, steps):
            self.steps, self.calls = steps, 0

        def __call__(self, ids, scores):
            self.calls += 1
            out = torch.full_like(scores, -float("inf"))
            for b, n in enumerate(self.steps):
                out[b, 5 if self.calls == n else 7] = 0
            return out

    images = [make_image(seed=1), make_image(seed=2)]
    questions = ["what is this?", "describe the picture."]
    kw = dict(do_sample=False, max_new_tokens=6, eos_token_id=[5])
    batched = model.answer_questions(images, questions, tok,
                                     logits_processor=LogitsProcessorList([EmitStopAt([2, 4])]), **kw)
    single = [model.answer_question(i, q, tok, logits_processor=LogitsProcessorList([EmitStopAt([n])]), **kw)
              for i, q, n in zip(images, questions, [2, 4])]
    assert [r.tolist() for r in batched] == [r.tolist() for r in single] == [[7, 5], [7, 7, 7, 5]]


def test_cached_follow_up_equals_a_fresh_run_over_the_whole_conversation(tiny):
    """KV-cache reuse changes nothing: turn 2 from the cache = turn 2 from scratch, picture included."""
    model, tokenizer = tiny
    image = make_image("RGB", (37, 23), seed=4)
    fixed = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    chat = model.chat(image, tokenizer, reuse_cache=True, **fixed)
    chat.ask("what is this?")
    n_turn1 = len(chat.sequence)  # prompt (image rows as pad ids) + answer + closing <|eot_id|>
    turn2 = continuation_ids(USER_HEADER + "what colour is the shape?" + EOT_TOKEN + ASSISTANT_HEADER,
                             tokenizer)
    fork = chat.fork()
    chat.ask("what colour is the shape?")
    answer2 = torch.tensor(chat.sequence[n_turn1 + len(turn2): -1])  # the appended <|eot_id|> dropped
    assert len(answer2) == 8
    assert len(fork.sequence) == n_turn1 and len(fork.history) == 1  # forks are independent

    # from scratch: the -200 sentinel where the image rows are, then everything said since
    prompt = tokenizer_image_token(build_prompt("what is this?"), tokenizer)  # (L,)
    n_prompt_rows = len(prompt) - 1 + n_patches(model)
    ids = torch.cat([prompt, torch.tensor(chat.sequence[n_prompt_rows: n_turn1 + len(turn2)])])
    features = model.encode_images(model.preprocess([image]))
    batch = splice_batch([ids], features, model.text_model.get_input_embeddings())
    assert batch.inputs_embeds.shape[1] == n_turn1 + len(turn2)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    with torch.no_grad():
        fresh = model.text_model.generate(inputs_embeds=batch.inputs_embeds,
                                          attention_mask=batch.attention_mask,
                                          eos_token_id=stops, pad_token_id=stops[0], **fixed)[0]
    assert torch.equal(fresh, answer2), (fresh.tolist(), answer2.tolist())
