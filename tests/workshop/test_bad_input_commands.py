"""Bad and edge input at the workshop's doors: the command lines (``ask``, ``export``, the miniature's) and
the trainers. A refusal is exactly one ``error:`` line and exit status 1 (usage errors as argparse reports
them: exit status 2); nothing is overwritten or half-written. The API's doors:
``tests/pipeline/test_bad_input.py``.
"""

import json
import shutil

import pytest
import torch
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


@pytest.mark.parametrize("device, words", [
    ("mps", ["--device must be cpu, cuda or cuda:N, got 'mps'"]),
    ("meta", ["--device must be cpu, cuda or cuda:N, got 'meta'"]),
    ("cuda:x", ["--device must be cpu, cuda or cuda:N"]),
    ("cuda:0", ["--device cuda:0"]),
], ids=["mps", "meta", "cuda-x", "cuda-without-a-gpu"])
def test_cli_devices_it_cannot_use(ask, tmp_path, device, words):
    import torch

    if device == "cuda:0" and torch.cuda.is_available():
        words = ["--device cuda:0"] if torch.cuda.device_count() == 0 else pytest.skip("a GPU is here")
    make_image().save(tmp_path / "p.png")
    one_error_line(*ask(tmp_path / "p.png", Q, "--device", device), *words)


def test_output_piped_into_a_reader_that_stops_ends_without_a_traceback(tiny_dir, tmp_path):
    """``... | head -c 0``: the reader is gone before the answer is written."""
    import os
    import subprocess
    import sys

    make_image().save(tmp_path / "p.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    commands = [["llama3vision_min", "ask", Q, "--image", str(tmp_path / "p.png"), "--model", str(tiny_dir),
                 "--greedy", "--max-new-tokens", "2"],
                ["llama3vision_min.miniature", "sample", "3"]]
    processes = [subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, text=True) for command in commands]
    for process in processes:
        process.stdout.close()  # the reader leaves at once
    for process in processes:
        stderr = process.stderr.read()
        assert process.wait(timeout=120) == 1 and "Traceback" not in stderr and "Broken" not in stderr, stderr


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
    (["sample", str(2**70)], ["seed: must lie in [0, 2**32)"]),
    (["train", "--seed", "-1"], ["--seed: must lie in [0, 2**32), got -1"]),
], ids=["n-zero", "n-negative", "threads-zero", "n-text", "stage-E", "sample-no-seed", "sample-seed-huge",
        "train-seed-negative"])
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


def test_miniature_sample_never_writes_through_a_dangling_link(miniature, tmp_path):
    (tmp_path / "link.png").symlink_to(tmp_path / "elsewhere" / "target.png")
    one_error_line(*miniature("sample", "3", "--save", str(tmp_path / "link.png")), "exists", "link.png")
    assert not (tmp_path / "elsewhere").exists()


def test_miniature_train_refuses_a_report_that_is_not_its_own(miniature, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text("[1, 2]")
    one_error_line(*miniature("train", "--stage", "A", "--quick", "--out", str(tmp_path / "run")),
                   "report.json", "a JSON list, not an object")
    assert (tmp_path / "run" / "report.json").read_text() == "[1, 2]"


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


def test_stage1_resume_needs_a_checkpoint_and_goes_without_overwrite(stage1, tmp_path):
    one_error_line(*stage1("--resume", out=tmp_path / "out"), "--resume: no checkpoint-STEP folder in")
    (tmp_path / "notes").mkdir()
    one_error_line(*stage1("--resume", str(tmp_path / "notes"), out=tmp_path / "out"),
                   "notes is not a checkpoint (no trainer_state.json")
    one_error_line(*stage1("--resume", "--overwrite", out=tmp_path / "out"),
                   "--resume and --overwrite go against each other")
    assert not (tmp_path / "out").exists()


def test_stage1_fewer_examples_than_one_global_batch(stage1, pretrain, tmp_path):
    size = len(pretrain[2])
    one_error_line(*stage1("--global-batch", str(16 * size), out=tmp_path / "out"),
                   f"a global batch of {16 * size} needs at least that many examples, got {size}")


def test_stage1_out_is_a_file(stage1, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_error_line(*stage1(out=tmp_path / "notes.txt"), "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_stage1_a_global_batch_that_is_not_a_multiple_stops_the_run_before_any_model_loads(stage1, tmp_path,
                                                                                           monkeypatch):
    from llama3vision_min.model import LlamaVision

    monkeypatch.setattr(LlamaVision, "from_alpha", lambda *a, **k: pytest.fail("a model was loaded"))
    one_error_line(*stage1("--global-batch", "10", "--per-device-batch", "4", out=tmp_path / "out"),
                   "global_batch (10) must be a multiple of per_device_batch x processes (4 x 1)")


@pytest.mark.parametrize("make, words", [
    (lambda path: path.write_text("not a picture"), ["'0.png' cannot be read as a picture"]),
    (lambda path: path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
     ["'0.png' cannot be read as a picture", "PNG, JPEG"]),
], ids=["text-named-png", "postscript"])
def test_a_file_that_is_not_a_picture_is_found_up_front(pretrain, make, words):
    """Before: a text file named .png crashed the run mid-training, in a data-loading worker."""
    from llama3vision_min.training.data import LlavaPretrain

    data, images, entries = pretrain
    make(images / "0.png")
    refused(lambda: LlavaPretrain(_write(data, entries), images), "example 0", *words)


def test_a_link_out_of_the_images_folder_is_refused_but_a_hub_caches_links_are_read(pretrain, tmp_path):
    """A symbolic link may not read a file outside the folder -- except inside the Hugging Face cache
    repository the folder is a snapshot of, where huggingface_hub keeps every file as a link into blobs/."""
    from llama3vision_min.training.data import LlavaPretrain

    data, images, entries = pretrain
    make_image(size=(20, 20)).save(tmp_path / "secret.png")
    (images / "0.png").unlink()
    (images / "0.png").symlink_to(tmp_path / "secret.png")
    refused(lambda: LlavaPretrain(_write(data, entries), images), "example 0", "a link to", "outside")
    repo = tmp_path / "hub" / "datasets--liuhaotian--LLaVA-Pretrain"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "images").mkdir(parents=True)
    for i in range(3):
        make_image(size=(20, 20), seed=i).save(repo / "blobs" / f"{i}hash", format="PNG")
        (repo / "snapshots" / "abc123" / "images" / f"{i}.png").symlink_to(f"../../../blobs/{i}hash")
    assert len(LlavaPretrain(_write(data, entries), repo / "snapshots" / "abc123" / "images")) == 3


def test_stage1_a_loss_that_turns_nan_saves_nothing(pretrain, tiny_dir, tmp_path):
    """Before: --lr inf exited 0 with a non-finite projector saved."""
    from llama3vision_min import LlamaVision
    from llama3vision_min.loading import load_tokenizer
    from llama3vision_min.training.data import LlavaPretrain
    from llama3vision_min.training.stage1 import train_stage1

    data, images, entries = pretrain
    model, tokenizer = LlamaVision.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    with torch.no_grad():
        model.mm_projector.model[0].bias[0] = float("nan")
    dataset = LlavaPretrain(_write(data, entries), images)
    refused(lambda: train_stage1(model, dataset, tokenizer, tmp_path / "out", global_batch=2,
                                 per_device_batch=2, mixed_precision="no", progress=False),
            "the loss became nan after 0 updates", "nothing was saved")
    refused(lambda: train_stage1(model, dataset, tokenizer, tmp_path / "out", lr=float("inf")),
            "lr must be a finite number above 0, got inf")
    assert not (tmp_path / "out" / "mm_projector.safetensors").exists()


def test_stage1_warmup_outside_zero_to_one(stage1, tmp_path):
    one_error_line(*stage1("--warmup-ratio", "1.5", out=tmp_path / "out"), "--warmup-ratio", "1.5")


@pytest.mark.parametrize("argv, words", [
    (["--per-device-batch", "0"], ["--per-device-batch: must be at least 1"]),
    (["--global-batch", "-8"], ["--global-batch: must be at least 1"]),
    (["--lr", "0"], ["--lr: must be a finite number above 0"]),
    (["--lr", "inf"], ["--lr: must be a finite number above 0, got inf"]),
    (["--lr", "nan"], ["--lr: must be a finite number above 0, got nan"]),
    (["--max-steps", "0"], ["--max-steps: must be at least 1"]),
    (["--limit", "-1"], ["--limit: must be at least 1"]),
    (["--num-workers", "-2"], ["--num-workers: must be at least 0, got -2"]),
    (["--seed", str(2**64)], ["--seed: must lie in [0, 2**32)"]),
    (["--save-every", "0"], ["--save-every: must be at least 1"]),
    (["--keep-last", "0"], ["--keep-last: must be at least 1"]),
], ids=["batch-zero", "global-negative", "lr-zero", "lr-inf", "lr-nan", "steps-zero", "limit-negative",
        "workers-negative", "seed-huge", "save-every-zero", "keep-none"])
def test_stage1_usage_errors(stage1, tmp_path, capfd, argv, words):
    usage_error(lambda: stage1(*argv, out=tmp_path / "out"), capfd, *words)


# == several at once ===============================================================================
def test_the_tiny_stand_ins_cache_is_private_and_checked(tmp_path, monkeypatch, capfd):
    """It lived in the shared temp folder, under a name anyone could guess -- and ``--model tiny`` loaded
    whatever sat there. Now: this user's cache, refused when others could write into it."""
    from llama3vision_min.miniature.stand_ins import private_cache
    from llama3vision_min.tools.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = private_cache()
    assert cache == tmp_path / "llama3vision_min" and cache.stat().st_mode & 0o077 == 0
    cache.chmod(0o777)
    make_image().save(tmp_path / "p.png")
    code = main(["ask", Q, "--image", str(tmp_path / "p.png"), "--model", "tiny"])
    one_error_line(code, capfd.readouterr(), "must belong to you and be writable by you alone")


def test_processes_building_the_tiny_stand_in_at_once_each_get_a_whole_one(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    script = ("from llama3vision_min.miniature.stand_ins import load_tiny\n"
              "model, tokenizer = load_tiny()\n"
              "print(float(model.mm_projector.model[0].weight.sum()))")
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, text=True) for _ in range(3)]
    results = [(process.wait(timeout=300), *process.communicate()) for process in processes]
    assert all(code == 0 for code, _, _ in results), results
    assert len({out for _, out, _ in results}) == 1  # the same model for each
    names = [path.name for path in (tmp_path / "llama3vision_min").iterdir()]
    assert len(names) == 1 and not names[0].startswith("."), names  # one whole model, no partial copy

