"""Meta's own Llama 3 tokenizer, built offline: the real ids (128000, 128006, ...) without the Hub.

    from llama3vision_min.tools.llama3_tokenizer import llama3_tokenizer
    tokenizer = llama3_tokenizer()          # a transformers PreTrainedTokenizerFast

The gated Hub repository is not needed: the PyPI package ``llama-models`` ships Meta's BPE ranks as
``llama_models/llama3/tokenizer.model`` (tiktoken's format, the same file as Meta-Llama-3-8B's
``original/tokenizer.model``). transformers' ``TikTokenConverter`` turns the ranks into a fast
tokenizer; to it we add what Llama 3's ``tokenizer.json`` and the Instruct model's config carry: the
split regex, the 256 special tokens under their Llama 3.0 names (llama-models names them as in 3.1),
a post-processor that prepends ``<|begin_of_text|>``, eos ``<|eot_id|>`` and the chat template.
The tests check its ids against Meta's own ``Tokenizer.encode``.

The conversion takes a few seconds, so its result is saved once, under
``$XDG_CACHE_HOME/llama3vision_min/llama3-tokenizer-<sha256 prefix>/`` (``~/.cache`` without it),
and read from there afterwards. Reading takes only ``tokenizer.json`` from that folder (the rest is
set here), so a cache written under transformers 4.57 serves 5.x and back; the folder also loads
with ``AutoTokenizer.from_pretrained`` under either.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..constants import EOT_TOKEN

MODEL_SIZE = 2_183_982
MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
"""``llama_models/llama3/tokenizer.model`` of llama-models 0.3.0: 128,000 ranks."""

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 3's pre-tokenizer regex (Meta's ``pat_str``): contractions, words, 1-3 digits, symbols, spaces."""

SPECIAL_TOKENS = (["<|begin_of_text|>", "<|end_of_text|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                  + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", EOT_TOKEN]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
"""The Llama 3.0 names of ids 128000-128255, in id order."""

BOS, EOS = "<|begin_of_text|>", EOT_TOKEN
MODEL_MAX_LENGTH = 8192
INSTALL_HINT = "pip install 'llama3vision-min[llama3-tokenizer]'"


def llama3_tokenizer(cache_dir=None):
    """Llama 3's tokenizer as a ``transformers.PreTrainedTokenizerFast``, from the cache or converted now.

    ``cache_dir``: the folder that holds the converted copies (default ``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``llama3vision_min``). A cached copy that cannot be read is rebuilt.
    Raises ``ValueError`` when llama-models is missing or its file is not the expected one.
    """
    model_file = _model_file()
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3vision_min"
    folder = Path(cache_dir) / f"llama3-tokenizer-{MODEL_SHA256[:12]}"
    if folder.exists():
        try:
            return _wrap(tokenizer_file=str(folder / "tokenizer.json"))
        except Exception:  # noqa: BLE001 -- tokenizers raises a bare Exception for a bad file
            # a damaged cache (truncated, edited, another format): rebuilt
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = _wrap(tokenizer_object=_convert(model_file))
    _save(tokenizer, folder)
    return tokenizer


def _save(tokenizer, folder):
    """Save into a temporary folder beside ``folder``, then rename it: the cache is complete or absent."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    except OSError:
        return  # a read-only cache: convert again next time
    try:
        tokenizer.save_pretrained(partial)
        config = json.loads((partial / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes its own class, unknown to 4.57
        (partial / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        partial.rename(folder)
    except OSError:
        pass  # another process saved it first, or the disk is full: the tokenizer in hand is still good
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _model_file():
    """The path of llama-models' ``tokenizer.model``, after checking it is the file we know."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"Llama 3's tokenizer is built from the llama-models package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    size = path.stat().st_size if path.is_file() else None
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if size == MODEL_SIZE else None
    if digest != MODEL_SHA256:
        raise ValueError(f"{path} is not the Llama 3 tokenizer.model this code knows ({MODEL_SIZE:,} bytes, "
                         f"sha256 {MODEL_SHA256[:12]}...); got {size} bytes, sha256 {digest}. "
                         f"Reinstall llama-models: {INSTALL_HINT}")
    return path


def _convert(model_file):
    """The ``tokenizers.Tokenizer`` of the ranks: BPE + Llama 3 split + special tokens + BOS."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # The converter's keyword for special tokens differs between 4.57 and 5.x, so they are added below;
    # the empty list keeps 4.57's converter from iterating None (5.x takes it as an unused keyword).
    core = TikTokenConverter(vocab_file=str(model_file), pattern=LLAMA3_SPLIT,
                             additional_special_tokens=[]).converted()
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    if core.token_to_id(BOS) != 128000 or core.get_vocab_size() != 128256:
        raise ValueError("the converted vocabulary does not put the special tokens at 128000-128255")
    core.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, 128000)]),
    ])
    return core


def _wrap(**source):
    """The transformers tokenizer around a converted core (``tokenizer_object=``) or its file."""
    from transformers import PreTrainedTokenizerFast

    from ..miniature.stand_ins import CHAT_TEMPLATE

    # No clean-up on decode: 4.57 would strip the space before punctuation ("a ." -> "a.");
    # Meta's decode does not.
    tokenizer = PreTrainedTokenizerFast(**source, bos_token=BOS, eos_token=EOS, chat_template=CHAT_TEMPLATE,
                                        model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False)
    if len(tokenizer) != 128256 or tokenizer(" a").input_ids[:1] != [128000]:
        raise ValueError("not Llama 3's tokenizer")
    return tokenizer
