"""GGUF export (``tools/gguf_export.py``): both files read back with gguf's own reader and checked against
the torch weights, key by key and tensor by tensor; and, where llama-cpp-python is installed
(``make test-llama-cpp``), the files run in llama.cpp and answer as we do -- a third implementation of the
model, next to the transcribed original and transformers' LLaVA.

Measured on the shipped miniature with f32 files (this repository's CPU): 200 of 200 greedy answers the
same token for token, image embeddings within 3.5e-3 (values up to about 9), first-token logits within
1.5e-3. The tolerances below leave room for another CPU: ggml computes the patch convolution in float16
and GELU through a float16 table, and its projector uses the tanh GELU where ours is exact.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from llama3vision_min import LlamaVision, load_mini
from llama3vision_min.lens.attention import question_ids
from llama3vision_min.loading import load_tokenizer
from llama3vision_min.miniature import CHECKPOINT_DIR
from llama3vision_min.miniature.world import QUESTIONS, render, scene
from llama3vision_min.tools.gguf_export import (LLAMA3_SPLIT, LLM_FILE, VISION_FILE, _pre_tokenizer,
                                                export_gguf, halve_rope_rows, interleave_rope_rows,
                                                write_vision)

from conftest import make_image

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed "
                                          "(pip install 'llama3vision-min[gguf]')")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP,
                                     reason="llama-cpp-python is not installed: make test-llama-cpp "
                                            "installs it (it builds llama.cpp, ~20 min once)")
SEEDS = range(10_000_000, 10_000_050)  # 50 held-out pictures x 4 questions = 200 pairs


def read(path):
    """``(fields, tensors)`` of a GGUF file: {key: value}, {name: (numpy array in torch order, type name)}."""
    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: (np.array(t.data), t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


@pytest.fixture(scope="module")
def mini():
    return load_mini()


@pytest.fixture(scope="module")
def mini_f32(mini, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-mini-f32")
    export_gguf(*mini, folder, dtype="f32")
    return folder


# -- the LLM file ------------------------------------------------------------------------------
def test_the_llm_files_keys(mini, mini_f32):
    config = mini[0].text_model.config
    fields, _ = read(mini_f32 / LLM_FILE)
    expected = {"general.architecture": "llama", "general.file_type": 0,
                "llama.vocab_size": config.vocab_size,
                "llama.block_count": 3, "llama.embedding_length": 96, "llama.feed_forward_length": 256,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 24,
                "llama.context_length": config.max_position_embeddings, "llama.rope.freq_base": 500000.0,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)


def test_every_llm_tensor_is_the_weight(mini, mini_f32):
    """Every tensor equals its torch weight (q and k after undoing llama.cpp's row order), and nothing else
    is there."""
    text_model = mini[0].text_model
    state, config = text_model.state_dict(), text_model.config
    _, tensors = read(mini_f32 / LLM_FILE)
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
    ours = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
    for i in range(config.num_hidden_layers):
        expected |= {f"blk.{i}.{theirs}.weight": f"model.layers.{i}.{mine}.weight"
                     for theirs, mine in ours.items()}
    assert set(tensors) == set(expected)
    for name, key in expected.items():
        array, kind = tensors[name]
        if ".attn_q." in name or ".attn_k." in name:
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            array = halve_rope_rows(torch.from_numpy(array), heads).numpy()
        assert kind == "F32" and np.array_equal(array, state[key].numpy()), name


def test_the_tokenizer_in_the_file_is_the_models(mini, mini_f32):
    tokenizer = mini[1]
    fields, _ = read(mini_f32 / LLM_FILE)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    assert all(types[i] == (gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
               for i in special | {5, 100})
    spec = json.loads((CHECKPOINT_DIR / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id


# -- the vision file ---------------------------------------------------------------------------
def test_the_vision_file_stores_every_layer_and_the_feature_layer(mini, mini_f32):
    model = mini[0]
    fields, tensors = read(mini_f32 / VISION_FILE)
    layers = model.vision_model.config.num_hidden_layers  # 4
    assert fields["general.architecture"] == "clip" and fields["clip.projector_type"] == "mlp"
    # tanh GELU, not quick
    assert fields["clip.has_vision_encoder"] is True and fields["clip.use_gelu"] is True
    assert fields["clip.vision.block_count"] == layers  # all of them: llama.cpp runs block_count - 1
    assert fields["clip.vision.feature_layer"] == [layers - 1]  # hidden_states[N - 1] = hidden_states[-2]
    assert (fields["clip.vision.image_size"], fields["clip.vision.patch_size"]) == (64, 8)
    assert fields["clip.vision.projection_dim"] == model.text_model.config.hidden_size
    assert fields["clip.vision.image_mean"] == fields["clip.vision.image_std"] == [0.5, 0.5, 0.5]
    assert {f"v.blk.{layers - 1}.attn_q.weight", "mm.0.weight", "mm.2.bias"} <= set(tensors)
    assert not any(name.startswith(("v.post_ln", "v.pre_ln", "v.class_embd")) for name in tensors)


def test_every_vision_tensor_is_the_weight(mini, mini_f32):
    model = mini[0]
    state = {k.removeprefix("vision_model."): v for k, v in model.vision_model.state_dict().items()}
    projector = model.mm_projector.state_dict()
    _, tensors = read(mini_f32 / VISION_FILE)
    expected = {
        "v.patch_embd.weight": state["embeddings.patch_embedding.weight"],  # (96, 3, 8, 8): a conv kernel
        "v.patch_embd.bias": state["embeddings.patch_embedding.bias"],
        "v.position_embd.weight": state["embeddings.position_embedding.weight"],
    }
    names = {"ln1": "layer_norm1", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj", "ln2": "layer_norm2",
             "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
    for i in range(model.vision_model.config.num_hidden_layers):
        for theirs, mine in names.items():
            for suffix in ("weight", "bias"):
                expected[f"v.blk.{i}.{theirs}.{suffix}"] = state[f"encoder.layers.{i}.{mine}.{suffix}"]
    for index in (0, 2):
        for suffix in ("weight", "bias"):
            expected[f"mm.{index}.{suffix}"] = projector[f"model.{index}.{suffix}"]
    assert set(tensors) == set(expected)
    for name, weight in expected.items():
        assert np.array_equal(tensors[name][0], weight.numpy()), name
    assert tensors["v.patch_embd.weight"][0].shape == (96, 3, 8, 8)


def test_f16_files_keep_norms_biases_and_positions_in_f32(mini, tmp_path):
    export_gguf(*mini, tmp_path, dtype="f16")
    for file in (LLM_FILE, VISION_FILE):
        fields, tensors = read(tmp_path / file)
        assert fields["general.file_type"] == 1  # mostly f16
        for name, (array, kind) in tensors.items():
            assert kind == ("F32" if array.ndim == 1 or name == "v.position_embd.weight" else "F16"), name
    weight = mini[0].text_model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    stored = read(tmp_path / LLM_FILE)[1]["blk.0.ffn_up.weight"][0]
    np.testing.assert_allclose(stored.astype(np.float32), weight, rtol=1e-3, atol=1e-6)


def test_the_scratch_towers_write_the_same_files(mini, mini_f32, tmp_path):
    export_gguf(load_mini(implementation="scratch")[0], mini[1], tmp_path, dtype="f32")
    for file in (LLM_FILE, VISION_FILE):
        assert (tmp_path / file).read_bytes() == (mini_f32 / file).read_bytes()


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_the_tiny_stand_ins_export(size, tiny_dir, small_dir, tmp_path):
    folder = {"tiny": tiny_dir, "small": small_dir}[size]
    model, tokenizer = LlamaVision.from_pretrained(folder), load_tokenizer(folder)
    export_gguf(model, tokenizer, tmp_path, dtype="f16")
    fields, tensors = read(tmp_path / LLM_FILE)
    vocab = model.text_model.config.vocab_size
    assert len(fields["tokenizer.ggml.tokens"]) == vocab and tensors["token_embd.weight"][0].shape[0] == vocab
    unused = [i for i, kind in enumerate(fields["tokenizer.ggml.token_type"])
              if kind == gguf.TokenType.UNUSED]
    # rows past the tokenizer's ids
    assert all(fields["tokenizer.ggml.tokens"][i] == f"[PAD{i}]" for i in unused)
    assert len(unused) == vocab - len(tokenizer)


def test_both_real_forms_and_a_swapped_llm_export(fake_hub, tmp_path):
    """The real ids from the fake Hub: the -hf form, and the alpha form with another Llama 3 as its LLM."""
    from llama3vision_min.tools.backend import REAL_LLM, REAL_PROJECTOR, REAL_VISION

    from fake_hub import OTHER_LLM, REAL_HF

    forms = {"hf": (LlamaVision.from_pretrained(REAL_HF, dtype=torch.float32), REAL_HF),
             "swapped": (LlamaVision.from_alpha(OTHER_LLM, REAL_VISION, REAL_PROJECTOR, dtype=torch.float32),
                         OTHER_LLM),
             "alpha": (LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, dtype=torch.float32),
                       REAL_LLM)}
    stored = {}
    for name, (model, source) in forms.items():
        export_gguf(model, load_tokenizer(source), tmp_path / name, dtype="f32")
        stored[name] = read(tmp_path / name / LLM_FILE)[1]["blk.0.attn_v.weight"][0]
        assert np.array_equal(stored[name],
                              model.text_model.state_dict()["model.layers.0.self_attn.v_proj.weight"])
    assert not np.array_equal(stored["swapped"], stored["alpha"])  # the swap reaches the file


# -- the pieces, on their own --------------------------------------------------------------------
def test_the_rope_row_order_keeps_attention_the_same():
    """transformers rotates component i with i + d/2 (rotate_half); llama.cpp's llama rotates 2i with 2i + 1.
    After ``interleave_rope_rows`` the second, applied to the reordered rows, gives the same q . k."""
    heads, head_dim, width = 3, 8, 5
    generator = torch.Generator().manual_seed(0)
    wq, wk = (torch.randn(heads * head_dim, width, generator=generator) for _ in range(2))
    inputs = torch.randn(2, width, generator=generator)  # two positions
    # (2, d/2)
    angles = torch.tensor([[0.7], [2.9]]) * (10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim))

    def halves(v, a):  # transformers: pairs (i, i + d/2)
        first, second = v[..., : head_dim // 2], v[..., head_dim // 2 :]
        return torch.cat([first * a.cos() - second * a.sin(), second * a.cos() + first * a.sin()], -1)

    def adjacent(v, a):  # llama.cpp: pairs (2i, 2i + 1)
        even, odd = v[..., 0::2], v[..., 1::2]
        return torch.stack([even * a.cos() - odd * a.sin(), odd * a.cos() + even * a.sin()], -1).flatten(-2)

    def scores(rotate, q_weight, k_weight):
        q = (inputs @ q_weight.T).view(2, heads, head_dim)
        k = (inputs @ k_weight.T).view(2, heads, head_dim)
        return torch.einsum("hd,hd->h", rotate(q[1], angles[1]), rotate(k[0], angles[0]))

    expected = scores(halves, wq, wk)
    torch.testing.assert_close(scores(adjacent, interleave_rope_rows(wq, heads),
                                      interleave_rope_rows(wk, heads)),
                               expected)
    assert not torch.allclose(scores(adjacent, wq, wk), expected)  # without the reordering: other scores
    assert torch.equal(halve_rope_rows(interleave_rope_rows(wq, heads), heads), wq)


def test_llama_3_1_rope_scaling_becomes_rope_freqs(tmp_path, mini):
    """The frequency divisors llama.cpp applies, against transformers' own Llama 3.1 frequencies."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = load_mini()[0]
    config = model.text_model.config
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    if int(transformers.__version__.split(".")[0]) >= 5:
        config.rope_parameters = scaling
    else:
        config.rope_scaling = scaling
    model.text_model = LlamaForCausalLM(config).eval()
    export_gguf(model, mini[1], tmp_path, dtype="f32")
    factors = read(tmp_path / LLM_FILE)[1]["rope_freqs.weight"][0]
    plain = 1.0 / 500000.0 ** (torch.arange(0, 24, 2, dtype=torch.float32) / 24)
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-6)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)


def test_llama_3s_pre_tokenizer_is_named_llama_bpe_and_others_are_refused():
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert _pre_tokenizer({"pre_tokenizer": llama3}) == "llama-bpe"
    assert _pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(ValueError, match="knows Llama 3's and GPT-2's pre-tokenizers"):
        _pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


# -- refusals ------------------------------------------------------------------------------------
def test_bad_exports_are_refused_and_nothing_is_overwritten(mini, mini_f32, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf(*mini, tmp_path / "a", dtype="bf16")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LLM_FILE).write_bytes(b"mine")
    with pytest.raises(ValueError, match="will not overwrite"):
        export_gguf(*mini, tmp_path / "b")
    assert (tmp_path / "b" / LLM_FILE).read_bytes() == b"mine" and not (tmp_path / "b" / VISION_FILE).exists()


def _fail_after(write, written, error):
    """A ``write_llm``/``write_vision`` that writes part of its file, then meets ``error`` (a full disk)."""
    def partial(*args):
        path = next(arg for arg in args if isinstance(arg, Path))
        path.write_bytes(b"GGUF" + b"\0" * written)
        raise error
    return partial


@pytest.mark.parametrize("failing", ["write_llm", "write_vision"])
def test_a_failed_export_leaves_nothing_half_written_and_the_retry_works(mini, tmp_path, monkeypatch,
                                                                          failing):
    from llama3vision_min.tools import gguf_export

    (tmp_path / "notes.txt").write_text("mine")  # what was there before stays
    monkeypatch.setattr(gguf_export, failing, _fail_after(getattr(gguf_export, failing), 1000,
                                                          OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        export_gguf(*mini, tmp_path, dtype="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(OSError):
        export_gguf(*mini, tmp_path / "new", dtype="f16")
    assert not (tmp_path / "new").exists()  # a folder this call made is removed too
    monkeypatch.undo()
    assert [p.name for p in export_gguf(*mini, tmp_path, dtype="f16")] == [LLM_FILE, VISION_FILE]


def test_a_rope_type_gguf_cannot_express_is_refused_before_writing(tmp_path):
    model, tokenizer = load_mini()
    config = model.text_model.config
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    setattr(config, "rope_parameters" if int(transformers.__version__.split(".")[0]) >= 5 else "rope_scaling",
            linear)
    with pytest.raises(ValueError, match="rope type 'linear'"):
        export_gguf(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_head_dim_llama_cpp_would_refuse_is_refused_before_writing(tmp_path):
    model, tokenizer = load_mini()
    model.text_model.config.head_dim = 32  # not hidden_size / num_attention_heads
    with pytest.raises(ValueError, match="head_dim = hidden_size / num_attention_heads"):
        export_gguf(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_a_4bit_model_is_refused(fake_hub, tmp_path):
    from llama3vision_min.tools.backend import REAL_LLM, REAL_PROJECTOR, REAL_VISION

    model = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, load_in_4bit=True)
    with pytest.raises(ValueError, match="llama-quantize"):
        export_gguf(model, load_tokenizer(REAL_LLM), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("options, words", [
    (["--dtype", "bfloat16"], "--format gguf writes f32 or f16, not bfloat16"),
    (["--vllm-names"], "--vllm-names belongs to --format llava"),
    (["--llm", "x", "--load-in-4bit"], "drop --load-in-4bit"),
])
def test_the_command_line_refuses_with_one_line(tmp_path, options, words):
    result = subprocess.run([sys.executable, "-m", "llama3vision_min", "export", "--format", "gguf", "--out",
                             str(tmp_path / "out"), *options], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_both_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llama3vision_min", "export", "--format", "gguf", "--out",
                             str(tmp_path / "out"), "--dtype", "f32"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "out" / LLM_FILE), str(tmp_path / "out" / VISION_FILE)]
    assert read(tmp_path / "out" / LLM_FILE)[0]["general.file_type"] == 0


# -- llama.cpp itself ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp_mini(mini_f32):
    from llama3vision_min.tools.llama_cpp_runner import LlamaCppVision

    with LlamaCppVision(mini_f32, n_threads=2) as runner:
        yield runner


def _ours(model, tokenizer, image, question, max_new_tokens=16):
    return model.answer_question(image, question, tokenizer, do_sample=False,
                                 max_new_tokens=max_new_tokens).tolist()


@needs_llama_cpp
def test_llama_cpp_answers_as_we_do_on_200_pictures_and_questions(mini, llama_cpp_mini):
    model, tokenizer = mini
    different = [(seed, question) for seed in SEEDS for question in QUESTIONS.values()
                 if llama_cpp_mini.answer_ids(render(scene(seed)), question, 16)
                 != _ours(model, tokenizer, render(scene(seed)), question)]
    assert not different, different
    image = render(scene(SEEDS[0]))
    assert llama_cpp_mini.answer(image, QUESTIONS["what"], 16) == tokenizer.decode(
        _ours(model, tokenizer, image, QUESTIONS["what"]), skip_special_tokens=True)


@needs_llama_cpp
def test_the_runner_refuses_what_our_model_refuses(mini_f32, llama_cpp_mini):
    """A question that is not text (llama-cpp-python would answer ``None`` as the word) or a picture that
    is not a picture; a context too small for the picture's rows (a numpy broadcast error before)."""
    from llama3vision_min.tools.llama_cpp_runner import LlamaCppVision

    picture = render(scene(SEEDS[0]))
    for call in (lambda: llama_cpp_mini.answer(picture, None), lambda: llama_cpp_mini.answer_ids(picture, 7),
                 lambda: llama_cpp_mini.prompt_ids(None)):
        with pytest.raises(ValueError, match="the question must be a str"):
            call()
    with pytest.raises(ValueError, match="expected a PIL.Image.Image, got str"):
        llama_cpp_mini.answer("picture.png", QUESTIONS["what"])
    with pytest.raises(ValueError, match=r"the picture's 64 rows and a prompt \(at least 96\)"):
        LlamaCppVision(mini_f32, n_ctx=80)


@needs_llama_cpp
def test_llama_cpp_reads_the_same_prompt(mini, llama_cpp_mini):
    for question in [*QUESTIONS.values(), "<|eot_id|> typed by a user?"]:
        if "<|" in question:  # llama-cpp-python's handler parses special tokens in the text; we do not
            assert llama_cpp_mini.prompt_ids(question) != question_ids(mini[1], question).tolist()
        else:
            assert llama_cpp_mini.prompt_ids(question) == question_ids(mini[1], question).tolist()


@needs_llama_cpp
def test_llama_cpps_image_embeddings_and_first_logits_are_ours(mini, llama_cpp_mini):
    model, tokenizer = mini
    worst_embedding = worst_logit = 0.0
    for seed in SEEDS[:20]:
        image = render(scene(seed))
        with torch.no_grad():
            embeddings = model.encode_images(model.preprocess([image]))[0].numpy()  # (64, 96)
            question = QUESTIONS["what"]
            logits = model(input_ids=question_ids(tokenizer, question)[None],
                           pixel_values=model.preprocess([image])).logits[0, -1].numpy()
        worst_embedding = max(worst_embedding,
                              np.abs(llama_cpp_mini.image_embeddings(image) - embeddings).max())
        worst_logit = max(worst_logit,
                          np.abs(llama_cpp_mini.first_token_logits(image, question) - logits).max())
    print(f"\n[llama.cpp] image embeddings within {worst_embedding:.1e}, "
          f"first-token logits within {worst_logit:.1e}")
    assert worst_embedding < 1e-2 and worst_logit < 5e-3  # measured 3.5e-3 and 1.5e-3 (module docstring)


@needs_llama_cpp
def test_the_old_converters_layer_changes_answers(mini, mini_f32, tmp_path):
    """Negative control: the vision file with hidden_states[-3] (what llama.cpp's older converter ends up
    computing) agrees far less often -- 151 of 200 measured."""
    from llama3vision_min.tools.llama_cpp_runner import LlamaCppVision

    (tmp_path / LLM_FILE).write_bytes((mini_f32 / LLM_FILE).read_bytes())
    write_vision(mini[0], tmp_path / VISION_FILE, np.float32, feature_layer=-3)
    with LlamaCppVision(tmp_path, n_threads=2) as runner:
        same = [runner.answer_ids(render(scene(s)), q, 16) == _ours(*mini, render(scene(s)), q)
                for s in SEEDS for q in QUESTIONS.values()]
    assert sum(same) / len(same) < 0.9


@needs_llama_cpp
def test_a_random_model_agrees_except_at_near_ties(tiny_dir, tmp_path):
    """Random weights make near-ties: where llama.cpp picks another token, our two best were close."""
    from llama3vision_min.tools.llama_cpp_runner import LlamaCppVision, square_picture

    model, tokenizer = LlamaVision.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    export_gguf(model, tokenizer, tmp_path, dtype="f32")
    agree, gaps = 0, []
    with LlamaCppVision(tmp_path, n_threads=2) as runner:
        for seed in SEEDS[:25]:
            image = square_picture(make_image(seed=seed), model.image_size)  # square: llama.cpp pads others
            for question in QUESTIONS.values():
                ours, theirs = (_ours(model, tokenizer, image, question, 8),
                                runner.answer_ids(image, question, 8))
                if ours == theirs:
                    agree += 1
                    continue
                step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
                ids = torch.cat([question_ids(tokenizer, question),
                                 torch.tensor(ours[:step], dtype=torch.long)])
                with torch.no_grad():
                    logits = model(input_ids=ids[None], pixel_values=model.preprocess([image])).logits[0, -1]
                gaps.append((logits[ours[step]] - logits[theirs[step]]).item())
    print(f"\n[llama.cpp, tiny random] {agree}/100 identical; gaps where not: {[f'{g:.1e}' for g in gaps]}")
    assert agree >= 90 and all(0 <= gap < 2e-2 for gap in gaps)


@needs_llama_cpp
def test_non_square_pictures_agree_once_squared_our_way(mini, llama_cpp_mini):
    """llama.cpp pads a non-square picture to a square with grey; we stretch it. ``square_picture``
    stretches it first, as our image processor does, and then both read the same pixels."""
    from llama3vision_min.tools.llama_cpp_runner import square_picture

    model, tokenizer = mini
    padded = squared = 0
    for seed in range(10_000_100, 10_000_130):
        image = render(scene(seed)).resize((64, 90 + seed % 7))
        question = list(QUESTIONS.values())[seed % 4]
        ours = _ours(model, tokenizer, image, question)
        square = square_picture(image, model.image_size)
        assert torch.equal(model.preprocess([square]), model.preprocess([image]))
        padded += llama_cpp_mini.answer_ids(image, question, 16) == ours
        squared += llama_cpp_mini.answer_ids(square, question, 16) == ours
    assert squared == 30 and padded < 20  # measured: 9 of 50 agree unsquared


@needs_llama_cpp
def test_the_docs_python_example_runs(mini_f32, tmp_path):
    """docs/llama_cpp.md's llama-cpp-python snippet, as written, on the miniature's files and its demo
    picture."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    [block] = re.findall(r"```python\n(.*?)```", (root / "docs" / "llama_cpp.md").read_text(), re.S)
    picture = (root / "examples" / "two_green_stars.png").as_uri()
    code = block.replace("gguf-mini/", f"{mini_f32}/").replace("file:///path/to/picture.png", picture)
    result = subprocess.run([sys.executable, "-c", code + "\nllm.close()\n"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "two green stars"
