"""The real-scale stage-1 recipe (``llama3vision_min.training``) run on the tiny stand-ins.

The real run needs a GPU and the Hub; here the same data reading, collation, masking,
gradient accumulation and optimizer steps run on a LLaVA-Pretrain-shaped folder of
random pictures and the tiny checkpoint.
"""

import json

import pytest
import torch

from llama3vision_min import LlamaVision
from llama3vision_min.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llama3vision_min.loading import load_tokenizer
from llama3vision_min.projector import load_projector
from llama3vision_min.training.data import Collator, LlavaPretrain, caption_example
from llama3vision_min.training.stage1 import main, train_stage1

from conftest import make_image

CAPTIONS = ["a dog on a red sofa", "two cups of coffee", "mountains at dawn", "a yellow bus in the rain",
            "a cat asleep", "boats in a harbour", "a bowl of soup", "an empty street"]


@pytest.fixture()
def pretrain_dir(tmp_path):
    """A miniature LLaVA-Pretrain: ``data.json`` and ``images/000/*.png``."""
    (tmp_path / "images" / "000").mkdir(parents=True)
    entries = []
    for i, caption in enumerate(CAPTIONS):
        name = f"000/{i:04d}.png"
        make_image(size=(40 + i, 30), seed=i).save(tmp_path / "images" / name)
        human = ("<image>\nRender a clear and concise summary of the photo." if i % 2
                 else "Describe it.\n<image>")
        entries.append({"id": str(i), "image": name,
                        "conversations": [{"from": "human", "value": human},
                                          {"from": "gpt", "value": caption}]})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    return tmp_path


@pytest.fixture()
def fresh_tiny(tiny_dir):
    """A tiny model of its own (training changes it) and its tokenizer."""
    return LlamaVision.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)


def test_caption_example_moves_the_picture_first_and_checks_roles():
    turns = [{"from": "human", "value": "<image>\nRender a summary."}, {"from": "gpt", "value": " a dog "}]
    assert caption_example(turns) == ("Render a summary.", "a dog")
    with pytest.raises(ValueError, match="human turn then a gpt turn"):
        caption_example(list(reversed(turns)))


def test_dataset_reads_pictures_and_fails_loudly_on_a_missing_one(pretrain_dir):
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images")
    assert len(dataset) == len(CAPTIONS)
    item = dataset[3]
    assert item["answer"] == CAPTIONS[3] and item["image"].mode == "RGB" and item["image"].size == (43, 30)
    with pytest.raises(ValueError, match="not found"):
        LlavaPretrain(pretrain_dir / "data.json", pretrain_dir)  # wrong picture folder


def test_collation_masks_everything_but_the_answer(pretrain_dir, tiny):
    model, tokenizer = tiny
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images")
    examples = [dataset[0], dataset[3]]
    batch = Collator(tokenizer, model.preprocess)(examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 2
    assert batch["pixel_values"].shape == (2, 3, model.image_size, model.image_size)
    for b, example in enumerate(examples):
        assert int((ids[b] == IMAGE_TOKEN_INDEX).sum()) == 1
        kept = labels[b][labels[b] != IGNORE_INDEX]
        answer = tokenizer(example["answer"] + "<|eot_id|>", add_special_tokens=False).input_ids
        assert kept.tolist() == answer  # the loss sees the caption and its end of turn, nothing else
        n = int(mask[b].sum())
        assert mask[b, :n].all() and not mask[b, n:].any()  # right padding
        assert (labels[b, n:] == IGNORE_INDEX).all()
        assert ids[b, n - len(answer): n].tolist() == answer  # the answer ends the real tokens
        assert tokenizer.decode(ids[b, : n - len(answer)][ids[b, : n - len(answer)] >= 0]).endswith(
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_one_update_trains_only_the_projector_and_saves_it(pretrain_dir, fresh_tiny, tmp_path):
    model, tokenizer = fresh_tiny
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images")
    # global batch 8 = 4 per step x 2 accumulation steps: one optimizer update for the 8 examples
    losses = train_stage1(model, dataset, tokenizer, tmp_path / "out", lr=1e-3, global_batch=8,
                          per_device_batch=4, epochs=1, warmup_ratio=0.0, mixed_precision="no",
                          progress=False)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith("mm_projector.")}
    saved = load_projector(tmp_path / "out" / "mm_projector.safetensors")
    for key, value in saved.state_dict().items():
        assert torch.equal(value, model.mm_projector.state_dict()[key])


def test_loss_falls_over_a_few_updates(pretrain_dir, fresh_tiny, tmp_path):
    model, tokenizer = fresh_tiny
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images", limit=4)
    losses = train_stage1(model, dataset, tokenizer, tmp_path / "out", lr=3e-3, global_batch=4,
                          per_device_batch=4, epochs=25, warmup_ratio=0.0, mixed_precision="no",
                          progress=False)
    assert len(losses) == 25
    assert losses[-1] < 0.8 * losses[0]  # the same four captions: the projector learns to prompt them


def test_global_batch_must_divide(pretrain_dir, fresh_tiny, tmp_path):
    model, tokenizer = fresh_tiny
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images")
    with pytest.raises(ValueError, match="multiple of per_device_batch"):
        train_stage1(model, dataset, tokenizer, tmp_path, global_batch=6, per_device_batch=4,
                     mixed_precision="no")


def test_command_line_reports_a_model_it_cannot_load_in_one_line(pretrain_dir, tmp_path, capsys):
    """The default LLM is the ungated Llama 3 copy; offline and not cached, it fails in one line, naming
    it."""
    code = main(["--data", str(pretrain_dir / "data.json"), "--images", str(pretrain_dir / "images"),
                 "--out", str(tmp_path / "out"), "--llm", str(tmp_path / "no-such-llm")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "no-such-llm" in err and not (tmp_path / "out").exists()


def test_the_default_llm_is_the_ungated_llama_3():
    from llama3vision_min.training.stage1 import parse_args

    args = parse_args(["--data", "d.json", "--images", "i", "--out", "o"])
    assert args.llm == "unsloth/llama-3-8b-Instruct" and args.vision == "google/siglip-so400m-patch14-384"
