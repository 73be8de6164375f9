"""Step 6 of the pipeline: the settings ``generate`` runs with.

The original samples at temperature 0.2 and stops on ``<|eot_id|>``. Llama 3's own
config names only ``<|end_of_text|>`` (or a list) as its end token, so unless
``<|eot_id|>`` is passed as an end token the model writes past the end of its turn.
The original did that by setting ``tokenizer.eos_token = "<|eot_id|>"`` -- which
changes the caller's tokenizer. Here both ids are passed to ``generate`` instead and
the tokenizer is left alone.

Sources: ``answer_question`` in the official ``modeling_llamavision.py``
(https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py) and the
alpha form's script (https://huggingface.co/qresearch/llama-3-vision-alpha); transformers' ``generate``
(https://huggingface.co/docs/transformers/main_classes/text_generation) runs the decoding loop.
Multi-turn chat, the rest of this step, is ``chat.py``.
"""

from .constants import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, EOT_TOKEN


def stop_token_ids(tokenizer):
    """The tokenizer's eos id and the id of ``<|eot_id|>`` (when the vocabulary has it)."""
    ids = []
    for token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT_TOKEN)):
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def reset_generation_config(text_model):
    """Keep only the token ids of an LLM's generation config: Llama 3's own sampling defaults would differ
    between the two checkpoint forms; the original's settings come from ``generation_kwargs`` instead."""
    from transformers import GenerationConfig

    config = text_model.config
    text_model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                                    eos_token_id=config.eos_token_id,
                                                    pad_token_id=getattr(config, "pad_token_id", None))
    return text_model


def _whole(low):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(test):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)


OVERRIDE_RULES = {  # generate itself takes max_new_tokens=2.5, top_p=1.5 or do_sample="yes" without a word
    "max_new_tokens": (_whole(1), "an int >= 1"),
    "min_new_tokens": (_whole(0), "an int >= 0"),
    "do_sample": (lambda v: isinstance(v, bool), "True or False"),
    "temperature": (_number(lambda v: v > 0), "a number > 0"),
    "top_p": (_number(lambda v: 0 < v <= 1), "a number in (0, 1]"),
    "top_k": (_whole(0), "an int >= 0"),
    "streamer": (lambda v: callable(getattr(v, "put", None)) and callable(getattr(v, "end", None)),
                 "a streamer with put() and end(), e.g. transformers.TextIteratorStreamer"),
    "eos_token_id": (lambda v: isinstance(v, int) or (isinstance(v, (list, tuple)) and v
                                                      and all(isinstance(i, int) for i in v)),
                     "a token id or a list of them"),
}


def generation_kwargs(tokenizer, overrides):
    """Keyword arguments for ``generate``: the original's defaults, then the caller's overrides (the common
    ones checked first, by name, before any picture is encoded)."""
    for name, (valid, expected) in OVERRIDE_RULES.items():
        if overrides.get(name) is not None and not valid(overrides[name]):
            raise ValueError(f"{name} must be {expected}, got {overrides[name]!r:.60}")
    stops = stop_token_ids(tokenizer)
    kwargs = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "do_sample": True,
        "temperature": DEFAULT_TEMPERATURE,
        "eos_token_id": stops,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
    }
    kwargs.update(overrides)
    if not kwargs["do_sample"] and "temperature" not in overrides:
        del kwargs["temperature"]  # greedy: a temperature would only trigger a warning
    return kwargs


OWN_LOOP = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "streamer",
            "eos_token_id", "pad_token_id"}


def own_loop(text_model, kwargs):
    """The keywords for the from-scratch Llama's own decoding loop (``scratch/generate.py``: the same ids,
    less overhead per token), or None where transformers' ``generate`` runs: other towers, or a keyword the
    loop does not take (beams, a repetition penalty, ...; ``generate`` drives the scratch towers too)."""
    from .scratch.llama import LlamaLM

    given = {name: value for name, value in kwargs.items() if value is not None}  # None: the default
    return given if isinstance(text_model, LlamaLM) and set(given) <= OWN_LOOP else None


def cut_at_stop(ids, stops):
    """Keep a row of generated ids up to and including its first stop token (drops batch padding)."""
    for i, token_id in enumerate(ids.tolist()):
        if token_id in stops:
            return ids[: i + 1]
    return ids
