"""Meta's Llama 3 tokenizer built offline (tools/llama3_tokenizer.py): Meta's ids, the 3.0 names, the cache.

Every test uses a cache folder under pytest's tmp_path, never the user's ~/.cache.
"""

import importlib
import importlib.machinery
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

import llama3vision_original as original
from llama3vision_min import tokenizer_image_token
from llama3vision_min.prompt import build_prompt
from llama3vision_min.tools import llama3_tokenizer as module
from llama3vision_min.tools.llama3_tokenizer import llama3_tokenizer

pytest.importorskip("tiktoken")
pytest.importorskip("llama_models")

FOLDER = f"llama3-tokenizer-{module.MODEL_SHA256[:12]}"

FRAGMENTS = [
    "안녕하세요", "세계", "한국어 문장입니다.", "こんにちは", "世界", "カタカナ",
    "ひらがなと漢字。", "你好，世界！",
    "😀", "👍🏽", "🇰🇷", "👨‍👩‍👧", "❤️", "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < n; ++i) {", "}", "print('hi')", "x=[1,2,3]",
    "   ", "\t", "\n", "\n\n", "\r\n", "  \n  ", "        ", "1234567", "3.14159", "-42", "1,000,000",
    "2024-05-01", "0x1F", "!?", "...", ";:", "—", "–", "“quoted”", "'", '"', "()[]{}", "<>", "@#$%^&*",
    "I'm", "don't", "WE'LL", "they'd", "It's", "naïve", "café", "Ærøskøbing", "Привет", "مرحبا", "שלום",
    "नमस्ते", "ภาษาไทย", "Hello", "world", "the", "a", " A", "HTTP", "camelCase", "snake_case", "user",
    "assistant",
]
SEPARATORS = ["", " ", "  ", "\n", "\t", " \n", "   "]


def varied_strings(count=400, seed=0):
    """``count`` strings from the fragments above, joined by random separators; the same every run."""
    rng = random.Random(seed)
    fixed = ["", " ", "\n", "   ", "\n\n\n", "a", "  leading", "trailing  ", "12345678901", "a\u00a0b"]
    made = ["".join(rng.choice(FRAGMENTS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 12)))
            for _ in range(count - len(fixed))]
    return fixed + made


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("llama3-cache")


@pytest.fixture(scope="module")
def tokenizer(cache):
    return llama3_tokenizer(cache)


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(Path(module._model_file()))


@pytest.fixture
def no_conversion(monkeypatch):
    """Conversion fails from here on: what a call returns must come from the cache."""
    # the module itself: ``import transformers.convert_slow_tokenizer as ...`` can give transformers 4.x's
    # function of that name, once something has imported it into the package's namespace
    convert = importlib.import_module("transformers.convert_slow_tokenizer")

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(convert, "TikTokenConverter", Refuse)


def test_ids_equal_metas_own_encode(tokenizer, meta):
    strings = varied_strings()
    assert len(set(strings)) > 350
    ours = tokenizer(strings).input_ids
    theirs = [meta.encode(text, bos=True, eos=False) for text in strings]
    differ = [text for text, a, b in zip(strings, ours, theirs, strict=True) if a != b]
    assert differ == []
    assert sum(map(len, theirs)) > 5000  # long enough to exercise the merges, not only single tokens
    # Decoding gives the text back, as Meta's decode does (no clean-up of spaces before punctuation).
    assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in ours] == strings
    assert [meta.decode(ids[1:]) for ids in theirs] == strings


def test_the_check_can_fail_without_the_split_regex(tokenizer, meta):
    from tokenizers import Tokenizer, pre_tokenizers

    strings = varied_strings()
    core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # same vocabulary
    differ = [text for text in strings if core.encode(text).ids != meta.encode(text, bos=True, eos=False)]
    assert len(differ) > len(strings) // 4
    assert core.encode("a").ids == meta.encode("a", bos=True, eos=False)  # the copy itself works


def test_special_token_text_is_read_as_meta_reads_it(tokenizer, meta):
    # Only names that Llama 3.0 and llama-models' 3.1 list share (the reserved ones moved).
    shared = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
    text = "x".join(shared) + " after<|eot_id|>\n\n"
    assert tokenizer(text).input_ids == meta.encode(text, bos=True, eos=False, allowed_special="all")
    plain = tokenizer(text, split_special_tokens=True).input_ids
    assert plain == meta.encode(text, bos=True, eos=False)  # Meta's default: special-token text is plain text
    assert 128009 not in plain


def test_special_tokens_bos_eos_and_size(tokenizer):
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
                "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_3|>": 128005,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                "<|reserved_special_token_4|>": 128008, "<|eot_id|>": 128009,
                "<|reserved_special_token_5|>": 128010, "<|reserved_special_token_250|>": 128255}
    assert {name: tokenizer.convert_tokens_to_ids(name) for name in expected} == expected
    names = tokenizer.convert_ids_to_tokens(list(range(128000, 128256)))
    assert names == module.SPECIAL_TOKENS and len(set(names)) == 256
    assert not any(name in names for name in ("<|eom_id|>", "<|python_tag|>", "<|image|>"))  # 3.1's names
    assert len(tokenizer) == 128256
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|eot_id|>", 128009)
    assert tokenizer.model_max_length == 8192
    for text in ["hello world", "", "<|eot_id|>", "\n\n"]:
        ids = tokenizer(text).input_ids
        assert ids[0] == 128000 and ids.count(128000) == 1
        assert tokenizer(text, add_special_tokens=False).input_ids == ids[1:]
    assert tokenizer("hello world").input_ids == [128000, 15339, 1917]


def test_chat_template_renders_the_prompt(tokenizer):
    for question in ["what is this?", "Describe the picture in detail.", "이것은 무엇입니까?"]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
        assert rendered == tokenizer.bos_token + build_prompt(question).replace("<image>", "")


PROMPTS = [build_prompt("what is this?"), build_prompt("a<image>b"), "no picture here", "<image>",
           "fo<image>o bar", "<image>\n\n<image>two\n\n"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_split_equals_the_original(tokenizer, prompt):
    ours = tokenizer_image_token(prompt, tokenizer).tolist()
    assert ours == original.tokenizer_image_token(prompt, tokenizer)
    assert ours.count(-200) == prompt.count("<image>") and ours.count(128000) == 1


def test_the_real_prompt_has_743_rows(tokenizer, meta):
    ids = tokenizer_image_token(build_prompt("what is this?"), tokenizer).tolist()
    sentinel = ids.index(-200)
    assert (sentinel, len(ids) - sentinel - 1) == (5, 9)
    assert sentinel + 729 + 9 == 743
    assert ids == [128000, 128006, 882, 128007, 271, -200,
                   12840, 374, 420, 30, 128009, 128006, 78191, 128007, 271]
    assert ids[:5] == meta.encode("<|start_header_id|>user<|end_header_id|>\n\n", bos=True, eos=False,
                                  allowed_special="all")


def test_second_call_reads_the_cache(tokenizer, cache, no_conversion):
    folder = cache / FOLDER
    assert (folder / "tokenizer.json").is_file()
    assert [p.name for p in cache.iterdir()] == [FOLDER]  # no temporary folder left behind
    again = llama3_tokenizer(cache)
    text = varied_strings(20, seed=1)
    assert again(text).input_ids == tokenizer(text).input_ids
    assert (again.eos_token_id, again.chat_template, len(again)) == (128009, tokenizer.chat_template, 128256)


def test_the_cache_folder_loads_with_auto_tokenizer(tokenizer, cache):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(cache / FOLDER)
    assert json.loads((cache / FOLDER / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"  # what 4.57 and 5.x both know
    text = varied_strings(20, seed=2)
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert (loaded.eos_token, loaded.model_max_length, len(loaded)) == ("<|eot_id|>", 8192, 128256)


def test_default_cache_is_under_xdg_cache_home(cache, tokenizer, tmp_path, monkeypatch, no_conversion):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    shutil.copytree(cache / FOLDER, tmp_path / "llama3vision_min" / FOLDER)
    assert llama3_tokenizer()("hello world").input_ids == [128000, 15339, 1917]  # read from there


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong vocabulary"])
def test_a_damaged_cache_is_rebuilt(tokenizer, cache, tmp_path, damage):
    folder = tmp_path / FOLDER
    shutil.copytree(cache / FOLDER, folder)
    saved = folder / "tokenizer.json"
    if damage == "truncated":
        saved.write_text(saved.read_text()[:100000])
    elif damage == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    else:
        spec = json.loads(saved.read_text())
        spec["added_tokens"] = spec["added_tokens"][:9]
        saved.write_text(json.dumps(spec))
    rebuilt = llama3_tokenizer(tmp_path)
    assert len(rebuilt) == 128256 and rebuilt("hello world").input_ids == [128000, 15339, 1917]
    assert json.loads(saved.read_text()) == json.loads((cache / FOLDER / "tokenizer.json").read_text())


def test_an_interrupted_write_leaves_no_cache(tokenizer, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    class Interrupted(BaseException):  # as KeyboardInterrupt: not an Exception
        pass

    def interrupted(self, folder, **kwargs):
        (Path(folder) / "tokenizer.json").write_text("{")
        raise Interrupted

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(Interrupted):
        llama3_tokenizer(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _fake_package(monkeypatch, location):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "llama_models":
            return real(name, *args, **kwargs)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_refuses_without_llama_models(tmp_path, monkeypatch):
    _fake_package(monkeypatch, None)
    words = r"llama-models package: pip install 'llama3vision-min\[llama3-tokenizer\]'"
    with pytest.raises(ValueError, match=words):
        llama3_tokenizer(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"not ranks", b"x" * module.MODEL_SIZE, None])
def test_refuses_another_tokenizer_model(tmp_path, monkeypatch, content):
    package = tmp_path / "llama_models"
    (package / "llama3").mkdir(parents=True)
    if content is not None:
        (package / "llama3" / "tokenizer.model").write_bytes(content)
    _fake_package(monkeypatch, package)
    with pytest.raises(ValueError, match="is not the Llama 3 tokenizer.model this code knows"):
        llama3_tokenizer(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_gguf_export_names_it_llama_bpe(tokenizer):
    from llama3vision_min.tools.gguf_export import _pre_tokenizer

    assert _pre_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str())) == "llama-bpe"
