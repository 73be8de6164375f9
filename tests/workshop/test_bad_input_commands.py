"""Bad and edge input at the workshop's doors: the command lines (``ask``, ``export``, the miniature's) and
the trainers. A refusal is exactly one ``error:`` line and exit status 1 (usage errors as argparse reports
them: exit status 2); nothing is overwritten or half-written. The API's doors:
``tests/pipeline/test_bad_input.py``.
"""

import json
import shutil

import pytest
from PIL import Image

from conftest import make_image, one_error_line, refused, shard_checkpoint, spoil_config, usage_error

Q = "what is this?"


@pytest.fixture()
def folder(tiny_dir, tmp_path):
    """A copy of the tiny -hf checkpoint to spoil."""
    return shutil.copytree(tiny_dir, tmp_path / "model")


# == command lines =================================================================================
@pytest.fixture()
def ask(tiny_dir, tmp_path, capfd):
    """``ask`` with the tiny model: returns (exit status, captured output)."""
    from llama3vision_min.tools.cli import main

    def run(image, question=Q, *extra, model=None):
        code = main(["ask", question, "--image", str(image), "--model", str(model or tiny_dir), "--greedy",
                     "--max-new-tokens", "3", *extra])
        return code, capfd.readouterr()
    return run


def test_cli_a_decompression_bomb(ask, tmp_path, monkeypatch):
    make_image("RGB", (30, 30)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 pixels: over twice the limit, a bomb to PIL
    one_error_line(*ask(tmp_path / "bomb.png"), "refusing", "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # between once and twice: PIL only warns; refused too
    one_error_line(*ask(tmp_path / "bomb.png"), "refusing", "bomb.png")


def test_cli_a_question_that_is_not_utf_8(ask, tmp_path):
    make_image().save(tmp_path / "p.png")
    one_error_line(*ask(tmp_path / "p.png", "caf\udce9?"), "not valid UTF-8")


def test_cli_a_question_holding_the_image_placeholder_is_answered(ask, tmp_path):
    make_image().save(tmp_path / "p.png")
    code, captured = ask(tmp_path / "p.png", "what is <image> this?")
    assert code == 0 and captured.out.strip() and captured.err.count("error") == 0


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_cli_reads_a_photo_the_way_it_is_shown(ask, tiny, tmp_path, suffix):
    """EXIF orientation applied: the answer about the rotated file is the answer about the upright picture
    (lossless, so that the two are the same pixels: JPEG at its best quality, WebP lossless)."""
    model, tokenizer = tiny
    upright = make_image("RGB", (40, 20), seed=5) if suffix != ".jpg" else Image.new("RGB", (40, 20), "teal")
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to show"
    upright.transpose(Image.Transpose.ROTATE_270).save(tmp_path / f"photo{suffix}", exif=exif.tobytes(),
                                                       quality=100, lossless=True)
    if suffix == ".jpg":
        with Image.open(tmp_path / "photo.jpg") as photo:  # JPEG's own rounding, upright again
            upright = photo.transpose(Image.Transpose.ROTATE_90)
    code, captured = ask(tmp_path / f"photo{suffix}")
    expected = tokenizer.decode(model.answer_question(upright, Q, tokenizer, do_sample=False,
                                                      max_new_tokens=3),
                                skip_special_tokens=True).strip()
    assert code == 0 and captured.out.strip() == expected


def test_cli_never_opens_postscript(ask, tmp_path, monkeypatch):
    """Pillow renders PostScript by running Ghostscript, an interpreter of whatever the file says."""
    from PIL import EpsImagePlugin

    (tmp_path / "drawing.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
                                          "newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n")
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args))
    one_error_line(*ask(tmp_path / "drawing.eps"), "not a picture in a format this reads", "drawing.eps")
    assert ran == []


@pytest.fixture()
def llm_with_code(tiny, tmp_path):
    """An alpha form whose LLM folder carries its own code (``auto_map``, an unknown model type) that would
    leave a marker if it ran; returns (the ``--llm``/``--vision``/``--projector`` options, the marker)."""
    import torch

    model, tokenizer = tiny
    llm, marker = tmp_path / "llm", tmp_path / "the-folder's-code-ran"
    model.text_model.save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    config = json.loads((llm / "config.json").read_text())
    config.update(model_type="ownllama",
                  auto_map={"AutoConfig": "own.Config", "AutoModelForCausalLM": "own.Model"})
    (llm / "config.json").write_text(json.dumps(config))
    (llm / "own.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                "class Config(LlamaConfig):\n    model_type = 'ownllama'\n"
                                "class Model(LlamaForCausalLM):\n    config_class = Config\n")
    model.vision_model.save_pretrained(tmp_path / "siglip")
    torch.save({f"model.mm_projector.{key.removeprefix('model.')}": tensor.clone()
                for key, tensor in model.mm_projector.state_dict().items()}, tmp_path / "mm_projector.bin")
    return ["--llm", str(llm), "--vision", str(tmp_path / "siglip"), "--projector",
            str(tmp_path / "mm_projector.bin")], marker


def test_cli_never_runs_a_model_folders_own_code_even_when_the_user_says_yes(tmp_path, llm_with_code,
                                                                                 monkeypatch, capfd):
    """transformers would ask on the terminal whether to run the folder's code (answering y runs it):
    ``trust_remote_code=False`` is passed, so nothing asks and nothing runs."""
    import io

    from llama3vision_min.tools.cli import main

    options, marker = llm_with_code
    make_image().save(tmp_path / "p.png")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    code = main(["ask", Q, "--image", str(tmp_path / "p.png"), "--greedy", "--max-new-tokens", "2", *options])
    one_error_line(code, capfd.readouterr(), "could not load model", "custom code")
    assert not marker.exists()


@pytest.mark.parametrize("spoil, words", [
    (lambda f: (f / "config.json").write_text("[]"), ["could not load model", "must hold a JSON object"]),
    (lambda f: (shard_checkpoint(f), (f / "model.safetensors.index.json").write_text("{}")),
     ["must hold a 'weight_map'"]),
    (lambda f: spoil_config(f, lambda c: c["text_config"].update(num_hidden_layers=10**7)),
     ["num_hidden_layers = 10000000"]),
], ids=["config-list", "index-without-map", "absurd-layers"])
def test_cli_checkpoints_that_do_not_load(ask, folder, tmp_path, spoil, words):
    make_image().save(tmp_path / "p.png")
    spoil(folder)
    one_error_line(*ask(tmp_path / "p.png", model=folder), *words)


@pytest.fixture()
def export(tiny_dir, capfd):
    from llama3vision_min.tools.cli import main

    def run(out):
        return main(["export", "--out", str(out), "--model", str(tiny_dir)]), capfd.readouterr()
    return run


def test_cli_export_onto_an_existing_file_leaves_it_alone(export, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_error_line(*export(tmp_path / "notes.txt"), "notes.txt", "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_export_where_no_folder_can_be_made(export, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_error_line(*export(tmp_path / "notes.txt" / "llava"), "could not export", "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture()
def miniature(capfd):
    from llama3vision_min.miniature.__main__ import main

    def run(*argv):
        return main(list(argv)), capfd.readouterr()
    return run


@pytest.mark.parametrize("argv, words", [
    (["eval", "--n", "0"], ["--n: must be at least 1, got 0"]),
    (["eval", "--n", "-3"], ["--n: must be at least 1, got -3"]),
    (["eval", "--threads", "0"], ["--threads: must be at least 1"]),
    (["eval", "--n", "many"], ["invalid _positive_int value"]),
    (["train", "--stage", "E"], ["invalid choice: 'E'"]),
    (["sample"], ["seed"]),
], ids=["n-zero", "n-negative", "threads-zero", "n-text", "stage-E", "sample-no-seed"])
def test_miniature_usage_errors(argv, words, capfd):
    from llama3vision_min.miniature.__main__ import main

    usage_error(lambda: main(argv), capfd, *words)


@pytest.mark.parametrize("n", [0, -3, 2.5], ids=["zero", "negative", "fraction"])
def test_miniature_evaluate_needs_pictures(tiny, n):
    from llama3vision_min.miniature import evaluate

    refused(lambda: evaluate(*tiny, n=n, progress=False), "number of pictures >= 1", repr(n))


def test_miniature_sample_never_overwrites_a_file(miniature, tmp_path):
    (tmp_path / "mine.png").write_bytes(b"mine")
    one_error_line(*miniature("sample", "3", "--save", str(tmp_path / "mine.png")), "exists", "mine.png")
    assert (tmp_path / "mine.png").read_bytes() == b"mine"


@pytest.mark.parametrize("name, words", [("no-such-folder/p.png", ["could not save"]),
                                         ("picture.xyz", ["could not save", "picture.xyz"])],
                         ids=["missing-folder", "unknown-extension"])
def test_miniature_sample_cannot_save(miniature, tmp_path, name, words):
    one_error_line(*miniature("sample", "3", "--save", str(tmp_path / name)), *words)
    assert not (tmp_path / name).exists()


def test_miniature_eval_of_a_folder_without_a_model(miniature, tmp_path):
    one_error_line(*miniature("eval", "--model", str(tmp_path), "--n", "1"), "no miniature in", str(tmp_path))


def test_miniature_train_a_stage_without_its_inputs(miniature, tmp_path):
    one_error_line(*miniature("train", "--stage", "C", "--out", str(tmp_path / "run")), "stage C reads",
                   "run it first")
    assert not (tmp_path / "run").exists()


def test_miniature_train_into_a_file_and_a_partial_ship(miniature, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_error_line(*miniature("train", "--out", str(tmp_path / "notes.txt")), "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    one_error_line(*miniature("train", "--quick", "--ship"), "--ship needs a full run")


# == trainers ======================================================================================
@pytest.fixture()
def pretrain(tmp_path):
    """A LLaVA-Pretrain-shaped folder of three good examples; returns (json path, images folder, entries)."""
    (tmp_path / "images").mkdir()
    entries = []
    for i in range(3):
        make_image(size=(20, 20), seed=i).save(tmp_path / "images" / f"{i}.png")
        entries.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": f"picture {i}"}]})
    return tmp_path / "data.json", tmp_path / "images", entries


def _write(path, entries):
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("spoil, words", [
    (lambda e: e.append("just a string"), ["example 3", "an object with 'image' and 'conversations'"]),
    (lambda e: e.append({"image": "0.png"}), ["example 3", "'image' and 'conversations'"]),
    (lambda e: e[2].update(conversations="Describe it."), ["example 2", "a list of turns"]),
    (lambda e: e[1].update(conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]),
     ["example 1", "a human turn then a gpt turn"]),
    (lambda e: e[1]["conversations"][1].update(value=None), ["example 1", "'value' to be text"]),
    (lambda e: e[0].update(image="../secret.png"), ["example 0", "inside", "'../secret.png'"]),
    (lambda e: e[0].update(image="/etc/passwd"), ["example 0", "inside", "'/etc/passwd'"]),
    (lambda e: e[2].update(image=7), ["example 2", "picture path", "7"]),
    (lambda e: e[2].update(image="missing.png"), ["example 2", "'missing.png' not found"]),
    (lambda e: e.clear(), ["holds no examples"]),
], ids=["string-entry", "no-conversations", "conversation-text", "roles-swapped", "value-none",
        "path-escapes", "absolute-path", "path-number", "missing-picture", "no-examples"])
def test_every_entry_of_the_data_file_is_checked_up_front(pretrain, spoil, words):
    from llama3vision_min.training.data import LlavaPretrain

    data, images, entries = pretrain
    spoil(entries)
    message = refused(lambda: LlavaPretrain(_write(data, entries), images), *words)
    assert str(data) in message


@pytest.mark.parametrize("content, words", [(b"{\"a\": 1}", ["a JSON list of examples", "dict"]),
                                            (b"[{broken", ["not a readable JSON file"]),
                                            (b"\xff\xfe[]", ["not a readable JSON file"])],
                         ids=["object", "broken", "not-utf-8"])
def test_a_data_file_that_is_not_a_list_of_examples(pretrain, content, words):
    from llama3vision_min.training.data import LlavaPretrain

    data, images, _ = pretrain
    data.write_bytes(content)
    refused(lambda: LlavaPretrain(data, images), *words)


@pytest.fixture()
def stage1(pretrain, capfd):
    from llama3vision_min.training.stage1 import main

    data, images, entries = pretrain
    _write(data, entries)

    def run(*argv, out):
        return (main(["--data", str(data), "--images", str(images), "--out", str(out), *argv]),
                capfd.readouterr())
    return run


def test_stage1_a_bad_entry_late_in_the_file_stops_the_run_before_any_model_loads(stage1, pretrain, tmp_path):
    data, _, entries = pretrain
    entries += [dict(entries[0]) for _ in range(5)] + [{"image": "0.png", "conversations": "not a list"}]
    _write(data, entries)
    one_error_line(*stage1(out=tmp_path / "out"), "example 8", "a list of turns", str(data))
    assert not (tmp_path / "out").exists()


def test_stage1_never_overwrites_a_trained_projector(stage1, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mm_projector.safetensors").write_bytes(b"hours of training")
    one_error_line(*stage1(out=tmp_path / "out"), "already holds mm_projector.safetensors")
    assert (tmp_path / "out" / "mm_projector.safetensors").read_bytes() == b"hours of training"


def test_stage1_out_is_a_file(stage1, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_error_line(*stage1(out=tmp_path / "notes.txt"), "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_stage1_warmup_outside_zero_to_one(stage1, tmp_path):
    one_error_line(*stage1("--warmup-ratio", "1.5", out=tmp_path / "out"), "--warmup-ratio", "1.5")


@pytest.mark.parametrize("argv, words", [
    (["--per-device-batch", "0"], ["--per-device-batch: must be at least 1"]),
    (["--global-batch", "-8"], ["--global-batch: must be at least 1"]),
    (["--lr", "0"], ["--lr: must be above 0"]),
    (["--max-steps", "0"], ["--max-steps: must be at least 1"]),
    (["--limit", "-1"], ["--limit: must be at least 1"]),
], ids=["batch-zero", "global-negative", "lr-zero", "steps-zero", "limit-negative"])
def test_stage1_usage_errors(stage1, tmp_path, capfd, argv, words):
    usage_error(lambda: stage1(*argv, out=tmp_path / "out"), capfd, *words)
