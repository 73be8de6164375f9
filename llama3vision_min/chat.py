"""Step 6, continued: a conversation about one picture, with the picture kept in context.

The original chat script re-tokenised the history *without* the image after the first turn, so
follow-up questions were answered blind (``follow_up_turn`` in ``llama3vision_original.py``). Both
classes here keep the picture in the first user turn of every prompt and give the same answers:

* ``ChatSession`` answers every turn from the whole prompt, so the picture's 729 rows and all earlier
  turns go through the LLM again on each follow-up: the simplest correct thing;
* ``CachedChat`` keeps the ``DynamicCache`` that ``generate`` filled (on the from-scratch towers: the
  ``KVCache`` of ``scratch/generate.py``), so a follow-up only runs the tokens the cache has not seen.

Get one with ``LlamaVision.chat(image, tokenizer)`` (``reuse_cache=True`` for the second). Sources: the
alpha form's chat script (https://huggingface.co/qresearch/llama-3-vision-alpha); transformers' KV cache
(https://huggingface.co/docs/transformers/kv_cache).
"""

import contextlib
import copy
import warnings

import torch

from .constants import EOT_TOKEN, IMAGE_TOKEN_INDEX
from .generation import OWN_LOOP, cut_at_stop, generation_kwargs, own_loop, stop_token_ids
from .prompt import follow_up_segments
from .scratch.generate import KVCache
from .scratch.generate import generate as scratch_generate
from .token_split import prompt_ids


class ChatSession:
    """A conversation about one picture that keeps the picture in context on every turn.

    Every turn is answered from the full prompt: the image in the first user turn, then all
    earlier questions and answers. Create one with ``LlamaVision.chat(image, tokenizer)``.
    """

    def __init__(self, model, image, tokenizer, **generate_kwargs):
        self.model = model
        self.image = image
        self.tokenizer = tokenizer
        self.generate_kwargs = generate_kwargs
        self.history = []  # [(question, answer), ...]

    def ask(self, question, **generate_kwargs):
        """Answer ``question`` about the picture, remembering the conversation so far; returns text."""
        conversation = self.history + [(question, None)]
        ids = self.model.generate_from_conversations([conversation], [self.image], self.tokenizer,
                                                     **{**self.generate_kwargs, **generate_kwargs})[0]
        answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        self.history.append((question, answer))
        return answer


@contextlib.contextmanager
def _old_cache_name():
    """transformers 5.x renames generate's ``past_key_values`` to ``cache`` (the old name works until 6.0);
    4.57 knows only the old name, so that one is passed and the rename notice silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        yield


class CachedChat(ChatSession):
    """A conversation about one picture that keeps the KV cache of the picture and the history.

    Turn 1 splices the picture into the prompt and generates with a fresh ``DynamicCache``.
    A follow-up turn feeds only the tokens the cache has not seen -- the last answer token
    (``generate`` never runs it through the model) and the new user turn -- so the 729 image
    rows and the history are never recomputed. The picture stays in context on every turn
    (unlike the original chat script). ``sequence`` holds the ids of everything in context,
    with the pad id standing in for the image rows (those positions are always cached, so
    their ids are never embedded).

    The answers are the exact tokens the model wrote (``ChatSession`` decodes them to text
    and re-tokenizes the history every turn instead).
    """

    def __init__(self, model, image, tokenizer, **generate_kwargs):
        super().__init__(model, image, tokenizer, **generate_kwargs)
        self.sequence = []  # ids in context (image rows as pad ids); the cache holds all but the last
        self.cache = None
        self.stops = stop_token_ids(tokenizer)
        self.eot_id = tokenizer.convert_tokens_to_ids(EOT_TOKEN)

    def fork(self):
        """A copy whose cache and history can grow without touching this one."""
        twin = copy.copy(self)
        twin.history, twin.sequence = list(self.history), list(self.sequence)
        twin.cache = copy.deepcopy(self.cache)
        return twin

    @torch.inference_mode()
    def ask(self, question, **generate_kwargs):
        """Answer ``question``; returns the answer text. Only uncached tokens are run through the LLM."""
        from transformers import DynamicCache

        kwargs = {**self.generate_kwargs, **generate_kwargs}
        special = kwargs.pop("special_tokens_in_text", False)  # as in generate_from_conversations
        kwargs = generation_kwargs(self.tokenizer, kwargs)
        text_model = self.model.text_model
        own = None if isinstance(self.cache, DynamicCache) else own_loop(text_model, kwargs)
        if own is None and isinstance(self.cache, KVCache):
            raise ValueError(f"this chat runs the from-scratch loop, which takes only {sorted(OWN_LOOP)}: "
                             f"start the chat with {sorted(set(kwargs) - OWN_LOOP)} to use them")
        if self.cache is None:  # turn 1: the picture and the first question
            (ids,), batch = self.model.prepare([[(question, None)]], [self.image], self.tokenizer, special)
            patches = batch.inputs_embeds.shape[1] - len(ids) + 1  # (1, L - 1 + P, hidden): ids hold one -200
            if own is not None:  # the from-scratch towers' own loop, and its cache
                new, self.cache = scratch_generate(text_model, batch.inputs_embeds, batch.attention_mask,
                                                   **own)
                new = new[0]  # (n_new,)
            else:
                self.cache = DynamicCache()
                with _old_cache_name():
                    new = text_model.generate(inputs_embeds=batch.inputs_embeds,  # (n_new,): new tokens only
                                              attention_mask=batch.attention_mask, past_key_values=self.cache,
                                              **kwargs)[0]
            pad = kwargs["pad_token_id"]
            for token_id in ids.tolist():
                self.sequence.extend([pad] * patches if token_id == IMAGE_TOKEN_INDEX else [token_id])
        else:  # a follow-up: only the last answer token and the new user turn are new to the cache
            turn = prompt_ids(follow_up_segments(question), self.tokenizer, special, continuation=True)
            turn = turn.tolist()
            limit = getattr(text_model.config, "max_position_embeddings", None)
            if limit and len(self.sequence) + len(turn) > limit:
                raise ValueError(f"the conversation would be {len(self.sequence) + len(turn)} positions "
                                 f"long, but the LLM reads at most {limit}: start a new chat")
            self.sequence += turn
            input_ids = torch.tensor([self.sequence], device=self.model.device)  # (1, T); cached part skipped
            if own is not None:
                uncached = input_ids[:, self.cache.length:]  # (1, new)
                embeds = text_model.get_input_embeddings()(uncached)  # (1, new, hidden)
                new, self.cache = scratch_generate(text_model, embeds, torch.ones_like(input_ids),
                                                   cache=self.cache, prompt_ids=input_ids.cpu(), **own)
                new = new[0]
            else:
                with _old_cache_name():
                    out = text_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                              past_key_values=self.cache, **kwargs)
                new = out[0, input_ids.shape[1]:]  # (n_new,)
        new = cut_at_stop(new, self.stops)
        self.sequence += new.tolist()
        if not new.numel() or new[-1].item() not in self.stops:
            self.sequence.append(self.eot_id)  # the turn ran out of tokens: close it, as the chat format asks
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        self.history.append((question, answer))
        return answer
