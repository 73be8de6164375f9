"""The benchmark entry point: its table has the expected rows, and its KV-cache chat is exact.

No wall-clock assertions: timings depend on the machine and on whatever else runs on it.
"""

import sys

import pytest
import torch

from llama3vision_min import build_prompt, splice_batch, tokenizer_image_token
from llama3vision_min.bench import PeakMemory, main, original_follow_up
from llama3vision_min.cached_chat import CachedChat
from llama3vision_min.export import n_patches
from llama3vision_min.prompt import ASSISTANT_HEADER, user_turn
from llama3vision_min.token_split import continuation_ids

from conftest import make_image

EXPECTED_ROWS = [
    ("forward (full logits)", "ours", "LLaVA"),
    ("forward (full logits)", "ours", "original"),
    ("greedy generation, 8 tokens", "ours", "LLaVA"),
    ("greedy generation, 8 tokens", "ours", "original"),
    ("4 pictures x 8 tokens", "batched", "sequential"),
    ("chat follow-up turn, 8 tokens", "cached", "original"),
    ("chat follow-up turn, 8 tokens", "cached", "re-encode all"),
    ("chat follow-up, first token", "cached", "original"),
    ("chat follow-up, first token", "cached", "re-encode all"),
    ("projector training step, batch 2", "cached features", "recomputed"),
]


def test_quick_bench_prints_the_expected_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["--sizes", "tiny", "--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| tiny |")]
    cells = [[cell.strip() for cell in row] for row in rows]
    assert [tuple(c[1:4]) for c in cells] == EXPECTED_ROWS
    for c in cells:
        assert float(c[6]) > 0  # a ratio
        assert c[4].endswith(("ms", " s")) and c[5].endswith(("ms", " s"))
        if sys.platform == "linux":
            assert c[9] != "n/a" and c[10] != "n/a"  # peak memory measured


def test_unknown_size_is_refused():
    with pytest.raises(SystemExit):
        main(["--sizes", "huge"])


def test_cached_follow_up_equals_a_fresh_run_over_the_whole_conversation(tiny):
    """KV-cache reuse changes nothing: turn 2 from the cache = turn 2 from scratch, picture included."""
    model, tokenizer = tiny
    image = make_image("RGB", (37, 23), seed=4)
    fixed = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    chat = CachedChat(model, image, tokenizer, **fixed)
    chat.ask("what is this?")
    n_turn1 = len(chat.sequence)  # prompt (image rows as pad ids) + answer + closing <|eot_id|>
    turn2 = continuation_ids(user_turn("what colour is the shape?") + ASSISTANT_HEADER, tokenizer)
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
        fresh = model.text_model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                          eos_token_id=stops, pad_token_id=stops[0], **fixed)[0]
    assert torch.equal(fresh, answer2), (fresh.tolist(), answer2.tolist())


def test_original_follow_up_sees_no_picture(tiny):
    model, tokenizer = tiny
    ids = original_follow_up(model.text_model, tokenizer, [("what is this?", "a red circle.")], "what colour?",
                             do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert ids.shape == (4,)


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc")
def test_peak_memory_sees_an_allocation():
    with PeakMemory() as memory:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB, touched
        del block
    assert memory.mb is not None and memory.mb >= 48
