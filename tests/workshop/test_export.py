"""Export to transformers' native LLaVA format: parity with ``LlamaVision``, vLLM key names, no resized
vocabulary.

The exported folders are loaded in a *separate Python process* where importing
``llama3vision_min`` is impossible (``sys.modules["llama3vision_min"] = None``), purely with
``AutoProcessor`` / ``AutoModelForImageTextToText``. That process goes through
``processor.apply_chat_template`` with the picture and the question, runs ``generate``
(greedy) and a forward pass, and hands back ids, pixel values, logits and tokens, which are
compared here with ``LlamaVision`` on the same picture and question: same prompt ids (with
the -200 sentinel expanded to the image token), same pixels, logits within 1e-5 (fp32),
same greedy tokens. Runs on both tiny stand-ins, and on the miniature when one is shipped.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llama3vision_min import IMAGE_TOKEN_INDEX, build_prompt, tokenizer_image_token
from llama3vision_min.tools.llava_export import IMAGE_TOKEN, export_llava, n_patches
from llama3vision_min.prompt import build_chat_prompt

from conftest import make_image

LOGIT_TOLERANCE = 1e-5
QUESTION = "what is this?"
N_TOKENS = 16
REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: stock transformers only, the project made unimportable.
LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["llama3vision_min"] = None  # any import of the project now fails
    import torch, transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(2)
    jobs, out_file = json.loads(sys.argv[1]), sys.argv[2]
    results = {}
    for job in jobs:
        processor = AutoProcessor.from_pretrained(job["dir"])
        model = AutoModelForImageTextToText.from_pretrained(job["dir"], dtype=torch.float32).eval()
        image = Image.open(job["image"])
        image.load()
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": job["question"]}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": job["question"]}]}],
            add_generation_prompt=True, tokenize=False)
        card = processor(images=image, text=text, return_tensors="pt")  # the way LLaVA's model cards do it
        with torch.no_grad():
            logits = model(**inputs).logits
            natural = model.generate(**inputs, do_sample=False, max_new_tokens=job["n_tokens"])
            forced = model.generate(**inputs, do_sample=False, max_new_tokens=job["n_tokens"],
                                    min_new_tokens=job["n_tokens"])
            card_natural = model.generate(**card, do_sample=False, max_new_tokens=job["n_tokens"])
        n_prompt = inputs["input_ids"].shape[1]
        results[job["dir"]] = {
            "transformers": transformers.__version__,
            "model_class": type(model).__name__,
            "processor_class": type(processor).__name__,
            "text": text,
            "input_ids": inputs["input_ids"][0],
            "pixel_values": inputs["pixel_values"],
            "logits": logits,
            "natural": natural[0, n_prompt:],
            "forced": forced[0, n_prompt:],
            "card_input_ids": card["input_ids"][0],
            "card_natural": card_natural[0, card["input_ids"].shape[1]:],
            "image_token_id": model.config.image_token_index,
            "n_embeddings": model.get_input_embeddings().weight.shape[0],
            "project_imported": sys.modules.get("llama3vision_min") is not None,
        }
    torch.save(results, out_file)
    """
)


def load_in_subprocess(jobs, out_file, python=sys.executable, cwd=None):
    """Run ``LOADER`` on ``jobs`` with ``python``; returns its results (a dict keyed by folder)."""
    done = subprocess.run([python, "-c", LOADER, json.dumps(jobs), str(out_file)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_file, weights_only=False)


def _models(tiny, small):
    models = {"tiny": tiny, "small": small}
    try:
        from llama3vision_min.miniature import load_mini

        models["mini"] = load_mini()
    except (ImportError, ValueError, OSError):
        pass  # no miniature shipped (yet): the tiny stand-ins still run
    return models


@pytest.fixture(scope="module")
def exported(tiny, small, tmp_path_factory):
    """Every model exported twice (stock names, vLLM names) and loaded in one stock-transformers process."""
    root = tmp_path_factory.mktemp("export")
    image_file = root / "picture.png"
    make_image("RGB", (37, 23), seed=2).save(image_file)  # PNG: lossless, both sides read the same pixels
    cases, jobs = {}, []
    for name, (model, tokenizer) in _models(tiny, small).items():
        for vllm_names in (False, True):
            folder = export_llava(model, tokenizer, root / f"{name}-vllm{int(vllm_names)}",
                                  vllm_names=vllm_names)
            cases[(name, vllm_names)] = (model, tokenizer, folder)
            jobs.append({"dir": str(folder), "image": str(image_file), "question": QUESTION,
                         "n_tokens": N_TOKENS})
    results = load_in_subprocess(jobs, root / "results.pt", cwd=root)
    return cases, results, image_file, jobs


def _ours(model, tokenizer, image_file):
    """Our ids (with -200), the expected LLaVA ids, our pixels, logits and greedy tokens."""
    from PIL import Image

    image = Image.open(image_file)
    image.load()
    ids = tokenizer_image_token(build_prompt(QUESTION), tokenizer)  # (L,) with one -200
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    expanded = []
    for token_id in ids.tolist():
        expanded.extend([image_id] * n_patches(model) if token_id == IMAGE_TOKEN_INDEX else [token_id])
    pixel_values = model.preprocess([image])
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0), pixel_values=pixel_values).logits
    natural = model.answer_question(image, QUESTION, tokenizer, do_sample=False, max_new_tokens=N_TOKENS)
    forced = model.answer_question(image, QUESTION, tokenizer, do_sample=False, max_new_tokens=N_TOKENS,
                                   min_new_tokens=N_TOKENS)
    return torch.tensor(expanded), pixel_values, logits, natural, forced


def _case_ids(exported):
    return [f"{name}-{'vllm' if vllm else 'stock'}" for name, vllm in exported[0]]


def test_exported_model_matches_llamavision(exported):
    """Same prompt ids, pixels, logits (<= 1e-5) and greedy tokens, loaded with stock transformers only."""
    cases, results, image_file, _ = exported
    assert {"tiny", "small"} <= {name for name, _ in cases}
    for (name, vllm_names), (model, tokenizer, folder) in cases.items():
        label = f"{name} (vllm_names={vllm_names})"
        theirs = results[str(folder)]
        assert not theirs["project_imported"]
        assert (theirs["model_class"] == "LlavaForConditionalGeneration"
                and theirs["processor_class"] == "LlavaProcessor")
        expanded, pixel_values, logits, natural, forced = _ours(model, tokenizer, image_file)

        assert (theirs["text"]
                == tokenizer.bos_token + build_prompt(QUESTION).replace("<image>", IMAGE_TOKEN)), label
        assert torch.equal(theirs["input_ids"], expanded), label
        assert torch.equal(theirs["pixel_values"], pixel_values), label

        assert (theirs["logits"].shape == logits.shape
                and theirs["logits"].dtype == logits.dtype == torch.float32)
        diff = (theirs["logits"] - logits).abs().max().item()
        print(f"\n[export parity] {label}: max |logit difference| = {diff:.3e}")
        assert diff <= LOGIT_TOLERANCE, f"{label}: max logit difference {diff:.3e}"
        assert (logits.max() - logits.min()).item() > 1.0  # the tolerance is small next to the logits' range

        # generation_config.json carries both stop ids: a natural stop lands where ours does
        assert torch.equal(theirs["natural"], natural), (label, theirs["natural"].tolist(), natural.tolist())
        # the model cards' way (template text, then the processor with its special tokens): still one BOS
        assert torch.equal(theirs["card_input_ids"], expanded), (label, theirs["card_input_ids"][:3].tolist())
        assert torch.equal(theirs["card_natural"], natural), label
        assert len(forced) == N_TOKENS and torch.equal(theirs["forced"], forced), (label,
                                                                                   theirs["forced"].tolist(),
                                                                                   forced.tolist())


def test_image_token_is_an_existing_reserved_token(exported):
    cases, results, _, _ = exported
    for (name, _), (model, tokenizer, folder) in cases.items():
        config = json.loads((folder / "config.json").read_text())
        vocab_size = model.text_model.get_input_embeddings().weight.shape[0]
        token_id = config["image_token_index"]
        assert (token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
                == results[str(folder)]["image_token_id"])
        assert token_id in tokenizer.all_special_ids or IMAGE_TOKEN in tokenizer.get_added_vocab()
        assert 0 <= token_id < vocab_size and token_id != tokenizer.unk_token_id
        # not resized: the exported embedding matrix has exactly the rows of ours, and the vocabulary is
        # unchanged
        assert results[str(folder)]["n_embeddings"] == vocab_size == config["text_config"]["vocab_size"]
        assert len(json.loads((folder / "tokenizer.json").read_text())["added_tokens"]) == \
            len(tokenizer.get_added_vocab())
        # LLaVA settings that express the original exactly
        assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "full"
        assert config["projector_hidden_act"] == "gelu" and config["multimodal_projector_bias"] is True
        assert config["image_seq_length"] == n_patches(model)
        processor = json.loads((folder / "processor_config.json").read_text())
        assert (processor["num_additional_image_tokens"] == 0
                and processor["vision_feature_select_strategy"] == "full")
        assert processor["patch_size"] == model.vision_model.config.patch_size
        assert processor["image_token"] == IMAGE_TOKEN


def _file_keys(folder):
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state


def test_vllm_key_names(exported):
    """The names vLLM's llava loader reads, each holding exactly our tensor."""
    cases, _, _, _ = exported
    for (name, vllm_names), (model, _, folder) in cases.items():
        if not vllm_names:
            continue
        state = _file_keys(folder)
        vision = {k: v for k, v in state.items() if k.startswith("vision_tower.")}
        projector = {k: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
        language = {k: v for k, v in state.items() if k.startswith("language_model.")}
        assert len(vision) + len(projector) + len(language) == len(state), sorted(state)[:5]
        assert all(k.startswith("vision_tower.vision_model.") for k in vision)
        assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in vision
        assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in vision
        assert set(projector) == {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2)
                                  for p in ("weight", "bias")}
        assert all(k.startswith(("language_model.model.", "language_model.lm_head.")) for k in language)
        assert ("language_model.model.embed_tokens.weight" in language
                and "language_model.lm_head.weight" in language)
        assert "language_model.model.layers.0.self_attn.q_proj.weight" in language
        # transformers 5.x in-memory names
        assert not any(k.startswith(("model.", "lm_head.")) for k in state)

        # every tensor is ours, under its new name
        assert torch.equal(projector["multi_modal_projector.linear_1.weight"],
                           model.mm_projector.model[0].weight)
        assert torch.equal(projector["multi_modal_projector.linear_2.bias"], model.mm_projector.model[2].bias)
        assert torch.equal(state["language_model.lm_head.weight"],
                           model.text_model.get_output_embeddings().weight)
        for key, tensor in model.text_model.get_decoder().state_dict().items():
            assert torch.equal(state["language_model.model." + key], tensor), key
        for key, tensor in model.vision_model.state_dict().items():
            assert torch.equal(state["vision_tower.vision_model." + key.removeprefix("vision_model.")],
                               tensor), key
        n_ours = sum(len(m.state_dict()) for m in (model.vision_model, model.mm_projector, model.text_model))
        assert len(state) == n_ours


@pytest.mark.parametrize("vllm_names", [False, True], ids=["transformers-names", "vllm-names"])
def test_an_export_that_fails_half_way_leaves_no_folder_and_the_retry_works(tiny, tmp_path, monkeypatch,
                                                                           vllm_names):
    """A failure after the weights (here: the processor) must not leave config.json and weights without a
    tokenizer: a folder that looks usable and is not."""
    from llama3vision_min.tools import llava_export

    model, tokenizer = tiny

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(llava_export, "llava_processor", fail)
    with pytest.raises(OSError, match="No space left"):
        export_llava(model, tokenizer, tmp_path / "out", vllm_names=vllm_names)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
    monkeypatch.undo()
    folder = export_llava(model, tokenizer, tmp_path / "out", vllm_names=vllm_names)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("token", ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>"])
def test_an_image_token_that_already_has_a_job_is_refused(tiny, tmp_path, token):
    """Before: accepted, and the export broken (every <|eot_id|> read as a picture)."""
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="already has a job in the prompt"):
        export_llava(model, tokenizer, tmp_path / "out", image_token=token)
    assert not (tmp_path / "out").exists()


def test_exporting_over_an_export_is_refused_and_leaves_it_whole(tiny, tmp_path):
    """Over a sharded export a new one would leave an index naming deleted shards: refused instead."""
    model, tokenizer = tiny
    folder = export_llava(model, tokenizer, tmp_path / "out", max_shard_size="100KB")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert "model.safetensors.index.json" in before
    with pytest.raises(ValueError, match="will not overwrite"):
        export_llava(model, tokenizer, folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_chat_template_renders_our_multi_turn_prompt(tiny, tmp_path):
    """History with answers renders as ``build_chat_prompt`` (image in the first user turn only)."""
    from transformers import AutoProcessor

    model, tokenizer = tiny
    folder = export_llava(model, tokenizer, tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(folder)
    turns = [("what is this?", "a red circle."), ("what colour is the shape?", "red."), ("how many?", None)]
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer.bos_token + build_chat_prompt(turns).replace("<image>", IMAGE_TOKEN)
    assert tokenizer.chat_template != processor.chat_template  # the caller's tokenizer was left alone


def _other_environments():
    """Interpreters of the project's other virtual environments (.venv / .venv-tf4), when present."""
    here = Path(sys.prefix).resolve()
    found = []
    for name in (".venv", ".venv-tf4"):
        python = REPO / name / "bin" / "python"
        if python.is_file() and (REPO / name).resolve() != here:
            found.append(python)
    return found


@pytest.mark.parametrize("python", _other_environments() or [None], ids=lambda p: p and p.parent.parent.name)
def test_vllm_export_loads_in_the_other_transformers_major(exported, python, tmp_path):
    """An export written with vLLM's names by one transformers major gives the same tokens in the other
    one."""
    if python is None:
        pytest.skip("no second virtual environment (.venv / .venv-tf4) next to this one")
    cases, results, _, jobs = exported
    vllm_jobs = [job for job in jobs if job["dir"].endswith("-vllm1")]
    other = load_in_subprocess(vllm_jobs, tmp_path / "other.pt", python=str(python), cwd=tmp_path)
    for job in vllm_jobs:
        mine, theirs = results[job["dir"]], other[job["dir"]]
        assert theirs["transformers"].split(".")[0] != mine["transformers"].split(".")[0]
        assert torch.equal(theirs["input_ids"], mine["input_ids"])
        assert torch.equal(theirs["forced"], mine["forced"]), job["dir"]
        assert (theirs["logits"] - mine["logits"]).abs().max().item() <= LOGIT_TOLERANCE
