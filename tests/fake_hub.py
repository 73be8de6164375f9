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
                                         0.6, top_p 0.9, max_length 4096, both end ids), bfloat16
                                         safetensors in shards with model.safetensors.index.json, tokenizer
                                         with Llama 3's special tokens and chat template
    failspy/Meta-Llama-3-8B-Instruct-abliterated-v3
                                         the same LLM fine-tuned a little (every weight moved by about 1 %)
    qresearch/llama-3-vision-alpha       mm_projector.bin: a torch pickle with the LLaVA trainer's keys
                                         (model.mm_projector.0.weight, ...)
    qresearch/llama-3-vision-alpha-hf    the real repository's files (see "The real -hf repository" in
                                         the project's reference): config.json with the real keys and
                                         nesting (architectures Llamavision, auto_map, text_config and
                                         vision_config holding the real file's keys with the tiny values,
                                         plus the three text sizes the real file leaves to LlamaConfig's
                                         defaults: ``ADDED_TEXT_KEYS``); float16 safetensors keyed by the
                                         official module tree (text_model.model.*, text_model.lm_head.weight,
                                         vision_model.vision_model.{embeddings,encoder,post_layernorm,head}.*,
                                         mm_projector.model.{0,2}.*) in four shards model-0000K-of-00004
                                         with model.safetensors.index.json; tokenizer.json,
                                         tokenizer_config.json, special_tokens_map.json (bos
                                         <|begin_of_text|>, eos and pad <|end_of_text|>); README.md; and
                                         configuration_llamavision.py / modeling_llamavision.py: our own
                                         stand-ins, NOT the official code, which append to a marker in
                                         HF_HOME (``REMOTE_CODE_MARKER``) and raise if anything imports them

The towers are the tests' tiny stand-ins (SigLIP 32 px / patch 8, Llama 64 wide); the -hf repository
holds the same weights as the other three (in float16: the bfloat16 LLM and projector converted exactly,
SigLIP's float32 rounded), so both forms are the same model. Not reproduced: the real repository's
``assets/`` folder, and what was never seen of it (the index's exact contents, tokenizer_config.json,
how the weights were split into the four shards: here, consecutively in the real shards' proportions).
``DIR`` also gets a LLaVA-Pretrain-shaped folder (``DIR/LLaVA-Pretrain``: the JSON and a few pictures)
for the stage-1 trainer's trial run.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama3vision_min.miniature.stand_ins import make_configs, tiny_tokenizer
from llama3vision_min.projector import ProjectionModule
from llama3vision_min.tools.backend import REAL_LLM, REAL_PROJECTOR, REAL_VISION

REAL_HF = "qresearch/llama-3-vision-alpha-hf"
OTHER_LLM = "failspy/Meta-Llama-3-8B-Instruct-abliterated-v3"
"""The Llama 3 fine-tune notebook 06 swaps in."""

FORMAT = 2
"""Bumped when the fake Hub's contents change."""

REMOTE_CODE_MARKER = "fake-hub-remote-code-ran"
"""The file (in ``HF_HOME``) that the stand-in remote-code modules append their name to if they ever run."""

ADDED_TEXT_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers")
"""The keys the fake -hf ``text_config`` holds beyond the real file's. The real one leaves these three sizes
to LlamaConfig's defaults (4096, 32, 32), which are not the tiny model's. Nothing else is added: every other
setting of the tiny LLM (head_dim 64 / 4, untied head, silu, no biases, no rope_scaling) is LlamaConfig's
default, and every tiny SigLIP setting beyond the real vision_config keys is SiglipVisionConfig's default."""

REAL_SHARD_GB = (4.98, 5.00, 4.92, 2.07)
"""The sizes of the real -hf shards model-00001..4-of-00004: the fake's four shards keep their proportions."""


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
    vision_config, text_config = make_configs("tiny", vocab_size=len(tokenizer),
                                              bos_token_id=tokenizer.bos_token_id,
                                              eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    siglip_text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        siglip_config = SiglipConfig(text_config=siglip_text, vision_config=vision_config.to_dict())
        siglip = SiglipModel(siglip_config).eval()
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
    """A Llama 3 repository: bfloat16 shards with an index, Meta's kind of generation config, the tokenizer.
    ``llm`` itself is left holding the bfloat16-rounded weights (in float32)."""
    llm.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    llm.float()
    tokenizer.save_pretrained(folder)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [tokenizer.eos_token_id, eot],
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096}
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


_REMOTE_CODE = """\"\"\"Written by tests/fake_hub.py: a stand-in for the real repository's {name}.

It is NOT the official code.

The fake snapshot holds it because the real one holds a file of this name. Nothing may import it: the project
loads qresearch/llama-3-vision-alpha-hf without trust_remote_code. If it runs all the same, it appends its
name to HF_HOME/{marker} and raises.
\"\"\"

import os
import pathlib

_HOME = pathlib.Path(os.environ.get("HF_HOME") or pathlib.Path.home() / ".cache" / "huggingface")
_HOME.mkdir(parents=True, exist_ok=True)
with open(_HOME / "{marker}", "a", encoding="utf-8") as _marker:
    _marker.write(__name__ + "\\n")
raise RuntimeError("{name} of the FAKE qresearch/llama-3-vision-alpha-hf ran: "
                   "remote code must never run here")
"""


def _hf_state(siglip, llm, projector):
    """The -hf checkpoint's tensors, keyed by the official module tree and in its order (text_model,
    vision_model, mm_projector), in float16: the LLM and the projector cast from the bfloat16 the alpha form
    stores (bfloat16 -> float16 is exact but for float16 subnormals), SigLIP rounded from float32."""
    def half(tensor, via_bfloat16):
        return (tensor.to(torch.bfloat16) if via_bfloat16 else tensor).to(torch.float16).contiguous()

    state = {f"text_model.{key}": half(tensor, True) for key, tensor in llm.state_dict().items()}
    # SiglipVisionModel (transformers 4.40) nests the tower under vision_model. and always has the head
    tower = siglip.vision_model.state_dict()
    assert any(key.startswith("head.") for key in tower), "the fake SigLIP lacks its pooling head"
    state.update({f"vision_model.vision_model.{key}": half(tensor, False) for key, tensor in tower.items()})
    state.update({f"mm_projector.{key}": half(tensor, True)
                  for key, tensor in projector.state_dict().items()})
    return state


def _save_shards(folder, state):
    """Four consecutive shards ``model-0000K-of-00004.safetensors`` in the real shards' proportions, and the
    index (``metadata.total_size``: the tensors' bytes; ``weight_map``: tensor name -> shard)."""
    sizes = {key: tensor.numel() * tensor.element_size() for key, tensor in state.items()}
    total, bounds, running = sum(sizes.values()), [], 0.0
    for gigabytes in REAL_SHARD_GB:
        running += gigabytes
        bounds.append(total * running / sum(REAL_SHARD_GB))
    count = len(REAL_SHARD_GB)
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map, offset = {}, 0
    for key in state:  # each tensor goes to the shard in which its first byte falls
        weight_map[key] = names[next(i for i, bound in enumerate(bounds) if offset < bound)]
        offset += sizes[key]
    for name in names:
        shard = {key: state[key] for key in state if weight_map[key] == name}
        assert shard, f"{name} would be empty"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _hf_config(siglip, llm, tokenizer):
    """config.json with the real file's keys and nesting, the tiny values (and ``ADDED_TEXT_KEYS``)."""
    text, vision = llm.config, siglip.config.vision_config
    rope = getattr(text, "rope_parameters", None) or {}
    text_config = {
        "_name_or_path": REAL_LLM, "architectures": ["LlamaForCausalLM"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,  # <|end_of_text|>, as the real file's 128001
        "intermediate_size": text.intermediate_size, "max_length": text.max_position_embeddings,
        "max_position_embeddings": text.max_position_embeddings, "model_type": "llama",
        "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": float(getattr(text, "rope_theta", None) or rope["rope_theta"]),
        "torch_dtype": "bfloat16", "vocab_size": text.vocab_size,
    }
    text_config.update({key: getattr(text, key) for key in ADDED_TEXT_KEYS})  # additions: the tiny sizes
    sizes = ("hidden_size", "image_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "patch_size")
    vision_config = {"_name_or_path": REAL_VISION, "model_type": "siglip_vision_model",
                     **{key: getattr(vision, key) for key in sizes}}  # nothing added: the rest is the default
    return {"architectures": ["Llamavision"],
            "auto_map": {"AutoConfig": "configuration_llamavision.LlamavisionConfig",
                         "AutoModelForCausalLM": "modeling_llamavision.Llamavision"},
            "model_type": "llamavision", "text_config": text_config, "torch_dtype": "float16",
            "transformers_version": "4.40.1", "vision_config": vision_config}


def _hf_tokenizer(folder, tokenizer):
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in the shape transformers 4.x writes
    them: bos <|begin_of_text|>, eos and pad <|end_of_text|> (as the real special_tokens_map.json). Written
    by hand so that no transformers version adds files the real repository lacks (chat_template.jinja);
    what the real tokenizer_config.json holds beyond these tokens was never seen: the tiny tokenizer's
    settings."""
    bos, end = "<|begin_of_text|>", "<|end_of_text|>"
    (folder / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str(pretty=True))
    added = {str(index): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                          "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
             for index, token in sorted(tokenizer.added_tokens_decoder.items())}
    config = {"added_tokens_decoder": added, "bos_token": bos, "chat_template": tokenizer.chat_template,
              "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces), "eos_token": end,
              "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": tokenizer.model_max_length, "pad_token": end,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special = {name: {"content": content, **token} for name, content in
               (("bos_token", bos), ("eos_token", end), ("pad_token", end))}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _hf_repo(folder, siglip, llm, projector, tokenizer):
    """qresearch/llama-3-vision-alpha-hf as the real repository holds it (but ``assets/``)."""
    folder.mkdir()
    config = _hf_config(siglip, llm, tokenizer)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save_shards(folder, _hf_state(siglip, llm, projector))
    _hf_tokenizer(folder, tokenizer)
    for name in ("configuration_llamavision.py", "modeling_llamavision.py"):
        (folder / name).write_text(_REMOTE_CODE.format(name=name, marker=REMOTE_CODE_MARKER))
    (folder / "README.md").write_text("# llama-3-vision-alpha-hf (FAKE)\n\nTiny random weights written by "
                                      "tests/fake_hub.py under the real repository id, for offline tests.\n")


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
        preprocessor = {"do_normalize": True, "do_rescale": True, "do_resize": True,
                        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                        "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
                        "resample": 3, "rescale_factor": 1 / 255,
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

        _hf_repo(staged / "hf", siglip, llm, projector, tokenizer)
        _publish(cache, REAL_HF, staged / "hf")

    data = home / "LLaVA-Pretrain"
    shutil.rmtree(data, ignore_errors=True)
    _pretrain_data(data)
    done.write_text("complete\n")
    return home


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tests/fake_hub.py DIR   (then HF_HOME=DIR HF_HUB_OFFLINE=1 ...)",
              file=sys.stderr)
        raise SystemExit(2)
    print(build_fake_hub(sys.argv[1]))
