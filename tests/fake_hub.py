"""A fake Hugging Face Hub on disk: tiny random checkpoints under the real repository ids.

    python tests/fake_hub.py DIR
    HF_HOME=DIR HF_HUB_OFFLINE=1 LLAMA3VISION_BACKEND=real python ...     # the real path, offline, in seconds

The repositories are laid out exactly as ``huggingface_hub`` caches a download
(``DIR/hub/models--ORG--NAME/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> blob}``), so with
``HF_HOME=DIR`` and ``HF_HUB_OFFLINE=1`` every loader that goes through ``huggingface_hub`` --
``snapshot_download``, ``hf_hub_download``, transformers' ``from_pretrained`` -- finds them as if
they had been downloaded. They hold the files the real repositories hold, as far as is publicly known:

    google/siglip-so400m-patch14-384     a full SiglipModel (image and text towers, logit scale and bias):
                                         config.json, model.safetensors (float32), preprocessor_config.json
    unsloth/llama-3-8b-Instruct          Llama 3: config.json, generation_config.json like Meta's (temperature
                                         0.6, top_p 0.9, max_length 4096, both end ids), bfloat16 safetensors in
                                         shards with model.safetensors.index.json, tokenizer with Llama 3's special
                                         tokens and chat template
    failspy/Meta-Llama-3-8B-Instruct-abliterated-v3
                                         the same LLM fine-tuned a little (every weight moved by about 1 %)
    qresearch/llama-3-vision-alpha       mm_projector.bin: a torch pickle with the LLaVA trainer's keys
                                         (model.mm_projector.0.weight, ...)
    qresearch/llama-3-vision-alpha-hf    config.json (model_type llamavision, text_config, vision_config, auto_map),
                                         float16 safetensors under text_model. / vision_model. / mm_projector.,
                                         tokenizer -- the layout our loader expects; the real one is unverified
                                         beyond its public API, and its remote .py files are not written

The towers are the tests' tiny stand-ins (SigLIP 32 px / patch 8, Llama 64 wide); the -hf repository
holds the same weights as the other three (in float16), so both forms are the same model. ``DIR`` also
gets a LLaVA-Pretrain-shaped folder (``DIR/LLaVA-Pretrain``: the JSON and a few pictures) for the
stage-1 trainer's trial run.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llama3vision_min import LlamaVision
from llama3vision_min.miniature.stand_ins import make_configs, tiny_tokenizer
from llama3vision_min.projector import ProjectionModule
from llama3vision_min.tools.backend import REAL_LLM, REAL_PROJECTOR, REAL_VISION

REAL_HF = "qresearch/llama-3-vision-alpha-hf"
OTHER_LLM = "failspy/Meta-Llama-3-8B-Instruct-abliterated-v3"
"""The Llama 3 fine-tune notebook 06 swaps in."""

FORMAT = 1
"""Bumped when the fake Hub's contents change."""


def _publish(cache, repo_id, staged):
    """Move the files of ``staged`` into the cache as ``repo_id``'s snapshot at a fixed commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(path for path in Path(staged).rglob("*") if path.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(staged)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _towers(seed):
    """A full SiglipModel, a Llama 3 LLM, a projector and the tokenizer: random, seeded, the tiny sizes."""
    from transformers import LlamaForCausalLM, SiglipConfig, SiglipModel

    tokenizer = tiny_tokenizer()
    vision_config, text_config = make_configs("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                              eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    siglip_text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        siglip = SiglipModel(SiglipConfig(text_config=siglip_text, vision_config=vision_config.to_dict())).eval()
        llm = LlamaForCausalLM(text_config).eval()
        projector = ProjectionModule(vision_config.hidden_size, text_config.hidden_size).eval()
    return siglip, llm, projector, tokenizer


def _fine_tune(llm, seed):
    """A copy of ``llm`` whose weights moved by about 1 % (a stand-in for a community fine-tune)."""
    import copy

    other = copy.deepcopy(llm)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    return other


def _llm_repo(folder, llm, tokenizer):
    """A Llama 3 repository: bfloat16 shards with an index, Meta's kind of generation config, the tokenizer."""
    llm.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    llm.float()
    tokenizer.save_pretrained(folder)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [tokenizer.eos_token_id, eot],
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096}
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _vision_tower(siglip):
    """The image half of ``siglip`` as a SiglipVisionModel (transformers 4.x nests it under ``vision_model``)."""
    from transformers import SiglipVisionModel

    tower = SiglipVisionModel(siglip.config.vision_config).eval()
    getattr(tower, "vision_model", tower).load_state_dict(siglip.vision_model.state_dict())
    return tower


def _pretrain_data(folder, n=16):
    """A LLaVA-Pretrain-shaped folder: ``blip_laion_cc_sbu_558k.json`` and ``images/00000/*.jpg``."""
    from PIL import Image

    (folder / "images" / "00000").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    entries = []
    for i in range(n):
        name = f"00000/{i:09d}.jpg"
        pixels = torch.randint(0, 256, (30 + i, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "images" / name)
        entries.append({"id": f"{i:09d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": f"a picture of coloured noise number {i}"}]})
    (folder / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(entries))


def build_fake_hub(home, seed=0):
    """Write the fake Hub into ``home`` (an ``HF_HOME``) unless it is there already; returns ``home``."""
    home = Path(home)
    done = home / f".fake-hub-v{FORMAT}"
    if done.is_file():
        return home
    cache = home / "hub"
    siglip, llm, projector, tokenizer = _towers(seed)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch)

        siglip.save_pretrained(staged / "siglip")
        preprocessor = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                        "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
                        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 1 / 255,
                        "size": {"height": siglip.config.vision_config.image_size,
                                 "width": siglip.config.vision_config.image_size}}
        (staged / "siglip" / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        _publish(cache, REAL_VISION, staged / "siglip")

        _llm_repo(staged / "llm", llm, tokenizer)
        _publish(cache, REAL_LLM, staged / "llm")
        _llm_repo(staged / "other", _fine_tune(llm, seed), tokenizer)
        _publish(cache, OTHER_LLM, staged / "other")

        (staged / "alpha").mkdir()
        state = {f"model.mm_projector.{key.removeprefix('model.')}": tensor.to(torch.bfloat16)
                 for key, tensor in projector.state_dict().items()}  # as LLaVA's trainer writes it
        torch.save(state, staged / "alpha" / "mm_projector.bin")
        _publish(cache, REAL_PROJECTOR, staged / "alpha")

        model = LlamaVision(vision_model=_vision_tower(siglip), text_model=llm, mm_projector=projector)
        model.to(torch.float16).save_pretrained(staged / "hf")
        config = json.loads((staged / "hf" / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "configuration_llamavision.LlamavisionConfig",
                              "AutoModelForCausalLM": "modeling_llamavision.Llamavision"}
        (staged / "hf" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(staged / "hf")
        _publish(cache, REAL_HF, staged / "hf")

    data = home / "LLaVA-Pretrain"
    shutil.rmtree(data, ignore_errors=True)
    _pretrain_data(data)
    done.write_text("complete\n")
    return home


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tests/fake_hub.py DIR   (then HF_HOME=DIR HF_HUB_OFFLINE=1 ...)", file=sys.stderr)
        raise SystemExit(2)
    print(build_fake_hub(sys.argv[1]))
