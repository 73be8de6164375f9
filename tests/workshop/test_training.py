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

from conftest import make_image, refused

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
                 "--out", str(tmp_path / "out"), "--llm", str(tmp_path / "no-such-llm"),
                 "--global-batch", "8", "--per-device-batch", "4"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "no-such-llm" in err and not (tmp_path / "out").exists()


def test_the_default_llm_is_the_ungated_llama_3():
    from llama3vision_min.training.stage1 import parse_args

    args = parse_args(["--data", "d.json", "--images", "i", "--out", "o"])
    assert args.llm == "unsloth/llama-3-8b-Instruct" and args.vision == "google/siglip-so400m-patch14-384"


# -- checkpoints (in this process; across processes and through the command line: test_stage1_processes.py) --
def _train(model, tokenizer, dataset, out, **settings):
    defaults = {"lr": 1e-3, "global_batch": 2, "per_device_batch": 2, "warmup_ratio": 0.0,
                "mixed_precision": "no", "progress": False}
    return train_stage1(model, dataset, tokenizer, out, **defaults | settings)


def test_checkpoints_keep_the_last_few_and_say_where_the_run_stands(pretrain_dir, fresh_tiny, tmp_path):
    from llama3vision_min.training.checkpoints import checkpoints, read_state

    model, tokenizer = fresh_tiny
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images")
    losses = _train(model, tokenizer, dataset, tmp_path, save_every=1, keep=2)  # 4 updates
    assert sorted(checkpoints(tmp_path)) == [2, 3]  # none after the last update: the projector is there
    state = read_state(tmp_path / "checkpoint-3")
    assert state["update"] == 3 and [entry["loss"] for entry in state["history"]] == losses[:3]
    assert state["scheduler"]["last_epoch"] == 3 and state["settings"]["global_batch"] == 2
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_a_checkpoint_is_resumed_only_with_the_settings_it_was_written_with(pretrain_dir, fresh_tiny,
                                                                             tmp_path):
    model, tokenizer = fresh_tiny
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images")
    _train(model, tokenizer, dataset, tmp_path / "run", save_every=1, max_steps=2)
    before = model.mm_projector.state_dict()["model.0.weight"].clone()
    refused(lambda: _train(model, tokenizer, dataset, tmp_path / "other", global_batch=4, max_steps=2,
                           resume=tmp_path / "run" / "checkpoint-1"),
            "checkpoint-1 was written with other settings", "global_batch 2 there, 4 now")
    fewer = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images", limit=6)
    refused(lambda: _train(model, tokenizer, fewer, tmp_path / "other", max_steps=2,
                           resume=tmp_path / "run" / "checkpoint-1"), "examples 8 there, 6 now", "data ")
    refused(lambda: _train(model, tokenizer, dataset, tmp_path / "other", resume=tmp_path / "run"),
            "run is not a checkpoint", "expected OUT/checkpoint-STEP")
    assert torch.equal(model.mm_projector.state_dict()["model.0.weight"], before)
    assert not (tmp_path / "other").exists()


def test_a_run_killed_while_saving_leaves_the_last_checkpoint_whole(pretrain_dir, fresh_tiny, tmp_path,
                                                                     monkeypatch):
    from accelerate import Accelerator

    from llama3vision_min.training.checkpoints import checkpoints

    model, tokenizer = fresh_tiny
    dataset = LlavaPretrain(pretrain_dir / "data.json", pretrain_dir / "images")
    save_state, saves = Accelerator.save_state, []

    def dies_in_the_second_save(self, folder, **kwargs):
        saves.append(folder)
        result = save_state(self, folder, **kwargs)
        if len(saves) == 2:
            raise KeyboardInterrupt("killed while saving")
        return result

    monkeypatch.setattr(Accelerator, "save_state", dies_in_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        _train(model, tokenizer, dataset, tmp_path, save_every=1)
    assert sorted(checkpoints(tmp_path)) == [1] and (tmp_path / ".checkpoint-2.partial").is_dir()
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    losses = _train(model, tokenizer, dataset, tmp_path, save_every=1, resume=tmp_path / "checkpoint-1")
    assert len(losses) == 4 and sorted(checkpoints(tmp_path)) == [1, 2, 3]
    assert not list(tmp_path.glob(".checkpoint-*"))  # the half-written one was replaced
