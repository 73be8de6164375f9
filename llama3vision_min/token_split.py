"""Step 2 of the pipeline: turn the prompt text into ids, with -200 where the image goes.

The prompt is split on ``<image>``. Each chunk is tokenized on its own with the
tokenizer's default special tokens, so *every* chunk comes back starting with
``<|begin_of_text|>``. Only the first chunk keeps it: the BOS of every later chunk is
dropped (a BOS in the middle of a sequence would be a token the model never saw
there). The sentinel ``-200`` is put between chunks::

    "<|start_header_id|>user<|end_header_id|>\\n\\n<image>what is this?<|eot_id|>..."
    chunk 0 -> [BOS, start_header, "user", end_header, "\\n\\n"]
    chunk 1 -> [BOS, "what", " is", " this", "?", eot, ...]   (BOS dropped)
    ids     -> [BOS, start_header, "user", end_header, "\\n\\n", -200, "what", ...]

Tokenizing the chunks apart (instead of the whole prompt) is what the original does,
and it matters: a byte-level BPE may merge ``\\n\\n`` with the next word when they
touch, so the two ways can give different ids.

Sources: ``tokenizer_image_token`` in the official ``modeling_llamavision.py``
(https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py), itself
LLaVA's helper of the same name in ``llava/mm_utils.py``
(https://github.com/haotian-liu/LLaVA/blob/main/llava/mm_utils.py). The literal transcription is
``tokenizer_image_token`` in ``llama3vision_original.py`` at the top of this repository.
"""

import threading

import torch

from .constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

TOKENIZING = threading.RLock()
"""Held while a tokenizer runs here: ``split_special_tokens`` works by switching a setting of the fast
tokenizer itself, so a second thread tokenizing meanwhile would read ``<|eot_id|>`` as plain text (or the
other way round) -- prompts of the wrong length, answers and attention maps of the wrong prompt."""


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    """Tokenize ``prompt`` and put ``image_token_index`` where each ``<image>`` stands.

    Works for any number of ``<image>`` placeholders (zero included). Returns a 1-D
    ``torch.LongTensor``; ``return_tensors`` is accepted for compatibility with the
    official signature and may be ``None`` or ``"pt"``.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    _check_utf8(prompt)

    chunks = prompt.split(IMAGE_PLACEHOLDER)
    with TOKENIZING:
        chunk_ids = [list(tokenizer(chunk).input_ids) for chunk in chunks]

    ids = chunk_ids[0]
    adds_bos = len(ids) > 0 and ids[0] == tokenizer.bos_token_id
    for later in chunk_ids[1:]:
        ids.append(image_token_index)
        ids.extend(later[1:] if adds_bos else later)
    return torch.tensor(ids, dtype=torch.long)  # (seq_len,)


def prompt_ids(segments, tokenizer, special_tokens_in_text=False, continuation=False,
               image_token_index=IMAGE_TOKEN_INDEX):
    """Ids of a prompt given as ``prompt.chat_segments``: what people (and the model) wrote stays text.

    The chat format's own special tokens are read as such; a ``"text"`` piece is tokenized with
    ``split_special_tokens=True``, so ``<|eot_id|>`` or ``<image>`` typed in a question are plain
    characters, not the end of a turn or a second picture. For ordinary text the ids equal
    ``tokenizer_image_token`` of the joined prompt (the pieces are cut at special tokens, where a
    tokenizer never merges anyway). ``special_tokens_in_text=True`` is the original's behaviour, for
    parity: the joined prompt through ``tokenizer_image_token``. ``continuation=True`` drops the BOS
    (the prompt goes on an earlier sequence). Returns a 1-D ``torch.LongTensor``.
    """
    if special_tokens_in_text:
        prompt = "".join(text for _, text in segments)
        ids = tokenizer_image_token(prompt, tokenizer, image_token_index).tolist()
        return torch.tensor(_without_bos(ids, tokenizer) if continuation else ids, dtype=torch.long)
    ids = []
    for kind, text in segments:
        _check_utf8(text)
        if kind == "image":
            ids.append(image_token_index)
        else:
            with TOKENIZING:
                piece = list(tokenizer(text, split_special_tokens=(kind == "text")).input_ids)
            ids += _without_bos(piece, tokenizer) if ids or continuation else piece
    return torch.tensor(ids, dtype=torch.long)  # (seq_len,)


def _check_utf8(text):
    """Refuse text a tokenizer cannot encode: a lone surrogate (e.g. ``"\\udce9"``, what Python makes of
    bytes that are not UTF-8) is not a character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the text is not valid UTF-8: {text[error.start]!r} at position {error.start} "
                         "is a lone surrogate, not a character") from None


def _without_bos(ids, tokenizer):
    return ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids


def continuation_ids(text, tokenizer):
    """Ids of text that follows earlier text in a sequence: tokenized on its own, BOS dropped.

    The same rule as for the later chunks above; used wherever a prompt is built piece by
    piece (a chat's next turn, an answer appended to a prompt).
    """
    with TOKENIZING:
        return _without_bos(list(tokenizer(text).input_ids), tokenizer)
